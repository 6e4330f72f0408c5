-- Schedules: a message sent to a queue, or a run of a flow started, at the times a five-field
-- cron expression names, in UTC or a given time zone. The cron rule is in src/schedules.rs
-- (pgflow._cron_next); the maintenance pass fires due schedules (pgflow._fire_schedules).
--
-- Each tick fires at most once: the pass locks the schedule's row, fires, and moves
-- next_fire_at on in the same transaction, so a crash before commit leaves the tick due and a
-- second pass (another worker, run_maintenance() by hand) skips the locked row and then finds
-- it no longer due. After downtime a schedule fires once (last_due_at names the first tick it
-- missed), then goes on from now: one catch-up fire, never a burst.

CREATE TABLE pgflow.schedules (
    schedule_name   text PRIMARY KEY,
    cron            text NOT NULL,
    time_zone       text NOT NULL,
    queue_id        bigint REFERENCES pgflow.queues (queue_id) ON DELETE CASCADE,
    message         jsonb,
    flow_slug       text REFERENCES pgflow.flows (flow_slug) ON DELETE CASCADE,
    input           jsonb,
    -- the next tick in the schedule's wall-clock time, and as an instant
    next_fire_local timestamp NOT NULL,
    next_fire_at    timestamptz NOT NULL,
    -- the tick fired last, when it fired, what it made, and why it failed if it did
    last_due_at     timestamptz,
    last_fire_at    timestamptz,
    last_msg_id     bigint,
    last_run_id     uuid,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT schedules_one_target CHECK ((queue_id IS NULL) <> (flow_slug IS NULL)),
    CONSTRAINT schedules_payload CHECK ((queue_id IS NULL OR message IS NOT NULL)
                                        AND (flow_slug IS NULL OR input IS NOT NULL))
);
CREATE INDEX schedules_next_fire_at ON pgflow.schedules (next_fire_at);
CREATE INDEX schedules_queue_id ON pgflow.schedules (queue_id);
CREATE INDEX schedules_flow_slug ON pgflow.schedules (flow_slug);
COMMENT ON TABLE pgflow.schedules IS 'pgflow: cron schedules that send a message to a queue or start a run of a flow.';

-- 22004 for NULL, 22023 naming the argument for a time zone PostgreSQL does not know.
CREATE FUNCTION pgflow._check_time_zone(time_zone text) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF time_zone IS NULL THEN
        RAISE EXCEPTION 'time_zone must not be null' USING ERRCODE = '22004',
            HINT = 'Pass ''UTC'' or a name from pg_timezone_names.';
    END IF;
    BEGIN
        PERFORM now() AT TIME ZONE time_zone;
    EXCEPTION WHEN data_exception THEN
        RAISE EXCEPTION 'time_zone "%" is not a time zone PostgreSQL knows', left(time_zone, 64)
            USING ERRCODE = '22023', HINT = 'Use a name from pg_timezone_names, such as UTC or Europe/Berlin.';
    END;
END
$$;

CREATE FUNCTION pgflow.create_schedule(schedule_name text, cron text, queue_name text DEFAULT NULL,
                                       message jsonb DEFAULT NULL, flow_slug text DEFAULT NULL,
                                       input jsonb DEFAULT NULL, time_zone text DEFAULT 'UTC')
RETURNS timestamptz
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
    f pgflow.flows;
    next_local timestamp;
    next_at timestamptz;
BEGIN
    PERFORM pgflow._check_name(create_schedule.schedule_name, 'schedule_name');
    PERFORM pgflow._check_time_zone(create_schedule.time_zone);
    next_local := pgflow._cron_next(create_schedule.cron, now() AT TIME ZONE create_schedule.time_zone);
    next_at := next_local AT TIME ZONE create_schedule.time_zone;
    IF (create_schedule.queue_name IS NULL) = (create_schedule.flow_slug IS NULL) THEN
        RAISE EXCEPTION 'give either queue_name or flow_slug, not %',
            CASE WHEN create_schedule.queue_name IS NULL THEN 'neither' ELSE 'both' END
            USING ERRCODE = '22023',
            HINT = 'A schedule sends message to queue_name, or starts a run of flow_slug with input.';
    END IF;
    IF create_schedule.queue_name IS NOT NULL THEN
        IF create_schedule.input IS NOT NULL THEN
            RAISE EXCEPTION 'input goes with flow_slug; a queue''s schedule sends message'
                USING ERRCODE = '22023';
        END IF;
        -- shared: a drop_queue under way finishes first, and then the queue is gone (42704)
        PERFORM pgflow._lock_queue_name(create_schedule.queue_name, false);
        q := pgflow._api_queue(create_schedule.queue_name, 'create_schedule');
    ELSE
        IF create_schedule.message IS NOT NULL THEN
            RAISE EXCEPTION 'message goes with queue_name; a flow''s schedule starts runs with input'
                USING ERRCODE = '22023';
        END IF;
        PERFORM pgflow._lock_flow(create_schedule.flow_slug, false);
        f := pgflow._flow(create_schedule.flow_slug);
    END IF;
    INSERT INTO pgflow.schedules AS s (schedule_name, cron, time_zone, queue_id, message, flow_slug,
                                       input, next_fire_local, next_fire_at)
    VALUES (create_schedule.schedule_name, create_schedule.cron, create_schedule.time_zone, q.queue_id,
            CASE WHEN q.queue_id IS NOT NULL THEN coalesce(create_schedule.message, '{}') END,
            f.flow_slug,
            CASE WHEN f.flow_slug IS NOT NULL THEN coalesce(create_schedule.input, '{}') END,
            next_local, next_at)
    ON CONFLICT (schedule_name) DO UPDATE
       SET cron = excluded.cron, time_zone = excluded.time_zone, queue_id = excluded.queue_id,
           message = excluded.message, flow_slug = excluded.flow_slug, input = excluded.input,
           next_fire_local = excluded.next_fire_local, next_fire_at = excluded.next_fire_at;
    RETURN next_at;
END
$$;
COMMENT ON FUNCTION pgflow.create_schedule(text, text, text, jsonb, text, jsonb, text) IS
'Create (or replace) a schedule: at each time the five-field cron expression names (minute hour day-of-month month day-of-week, or @hourly, @daily, @weekly, @monthly, @yearly), evaluated in time_zone (default UTC), the maintenance pass sends message (default {}) to queue_name, or starts a run of flow_slug with input (default {}). Returns the first fire time. Schedule names: ASCII letters, digits, underscore, 1-48 bytes. A tick fires at most once; after downtime a schedule fires once and goes on from now. The schedule goes with its queue or flow when that is dropped.';

CREATE FUNCTION pgflow.drop_schedule(schedule_name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM pgflow._check_name(drop_schedule.schedule_name, 'schedule_name');
    DELETE FROM pgflow.schedules WHERE schedule_name = drop_schedule.schedule_name;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION pgflow.drop_schedule(text) IS
'Drop a schedule; returns false if there was none. A fire under way finishes first.';

CREATE FUNCTION pgflow.list_schedules()
RETURNS TABLE (schedule_name text, cron text, time_zone text, queue_name text, flow_slug text,
               payload jsonb, next_fire_at timestamptz, last_due_at timestamptz,
               last_fire_at timestamptz, last_msg_id bigint, last_run_id uuid, last_error text,
               created_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.schedule_name, s.cron, s.time_zone, q.queue_name, s.flow_slug,
           coalesce(s.message, s.input), s.next_fire_at, s.last_due_at, s.last_fire_at,
           s.last_msg_id, s.last_run_id, s.last_error, s.created_at
      FROM pgflow.schedules s LEFT JOIN pgflow.queues q ON q.queue_id = s.queue_id
     ORDER BY s.schedule_name;
$$;
COMMENT ON FUNCTION pgflow.list_schedules() IS
'The schedules by name: their cron expression and time zone, target (queue_name or flow_slug) and payload (the message or the run input), the next fire time, and of the last fire: the tick it was for (last_due_at), when it fired, the msg_id or run_id it made, and its error (SQLSTATE and message) if it failed.';

-- Fire the due schedules, each in a subtransaction of its own: a failing fire (its flow has no
-- steps, say) is recorded in last_error and logged with the schedule's name and SQLSTATE, and
-- the schedule moves on to its next tick all the same. Returns how many fired.
CREATE FUNCTION pgflow._fire_schedules() RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s record;
    fired integer := 0;
    msg bigint;
    run uuid;
    failure text;
    next_local timestamp;
BEGIN
    FOR s IN
        SELECT sc.*, q.queue_name
          FROM pgflow.schedules sc LEFT JOIN pgflow.queues q ON q.queue_id = sc.queue_id
         WHERE sc.next_fire_at <= now()
         ORDER BY sc.next_fire_at
           FOR UPDATE OF sc SKIP LOCKED
    LOOP
        msg := NULL;
        run := NULL;
        failure := NULL;
        BEGIN
            IF s.queue_id IS NOT NULL THEN
                msg := pgflow.send(s.queue_name, s.message, 0, 0,
                    jsonb_build_object('schedule', s.schedule_name, 'due_at', s.next_fire_at));
            ELSE
                run := (pgflow.start_flow(s.flow_slug, s.input)).run_id;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            failure := SQLSTATE || ': ' || SQLERRM;
            RAISE WARNING 'pgflow schedule "%" failed to fire: SQLSTATE %', s.schedule_name, SQLSTATE;
        END;
        -- the next tick after both the one fired and now: one fire, however late
        next_local := pgflow._cron_next(s.cron, greatest(s.next_fire_local, now() AT TIME ZONE s.time_zone));
        UPDATE pgflow.schedules
           SET last_due_at = s.next_fire_at, last_fire_at = clock_timestamp(), last_msg_id = msg,
               last_run_id = run, last_error = failure,
               next_fire_local = next_local, next_fire_at = next_local AT TIME ZONE s.time_zone
         WHERE schedule_name = s.schedule_name;
        fired := fired + 1;
    END LOOP;
    RETURN fired;
END
$$;
