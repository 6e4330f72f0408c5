-- Maintenance layer: work that must happen while no client calls in. The background worker
-- (src/maintenance.rs) calls pgflow.run_maintenance() every pgflow.maintenance_interval_ms;
-- it can also be called by hand, or from cron when pgflow is not preloaded.

CREATE FUNCTION pgflow.run_maintenance() RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    due_queues integer := 0;
    fired integer := 0;
    expired integer := 0;
    r record;
BEGIN
    -- Delayed messages and retries that came due: wake blocked readers of their queues, and
    -- announce them on the channels of queues with notify on.
    BEGIN
        FOR r IN
            WITH due AS (
                DELETE FROM pgflow.due_wakeups WHERE due_at <= clock_timestamp() RETURNING queue_id
            )
            SELECT DISTINCT q.queue_id, q.queue_name, q.notify
              FROM due JOIN pgflow.queues q ON q.queue_id = due.queue_id
        LOOP
            due_queues := due_queues + 1;
            PERFORM pgflow._on_commit_wake(r.queue_id);
            IF r.notify THEN
                PERFORM pgflow._on_commit_notify(pgflow.queue_channel(r.queue_name),
                    jsonb_build_object('event', 'message_due', 'queue', r.queue_name));
            END IF;
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pgflow maintenance: announcing due messages failed: %', SQLERRM;
    END;
    -- Schedules that came due (sql/maintenance/schedules.sql).
    BEGIN
        fired := pgflow._fire_schedules();
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pgflow maintenance: firing schedules failed: SQLSTATE %', SQLSTATE;
    END;
    -- Signal steps whose wait ran out (sql/workflow/runtime.sql).
    BEGIN
        expired := pgflow._expire_signal_waits();
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pgflow maintenance: ending signal waits failed: SQLSTATE %', SQLSTATE;
    END;
    RETURN jsonb_build_object('due_queues', due_queues, 'schedules_fired', fired, 'signal_timeouts', expired);
END
$$;
COMMENT ON FUNCTION pgflow.run_maintenance() IS
'One maintenance pass: announces delayed messages and retries that came due (wakes pgflow.read_with_poll, notifies message_due on channels of queues with notify on) , fires the schedules that came due, and ends the waits of signal steps whose timeout ran out (when_exhausted applies). Run every pgflow.maintenance_interval_ms by the pgflow maintenance worker when pgflow is preloaded; safe to call by hand. Returns what it did.';
