-- Maintenance layer: work that must happen while no client calls in. The background worker
-- (src/maintenance.rs) calls pgflow.run_maintenance() every pgflow.maintenance_interval_ms;
-- it can also be called by hand, or from cron when pgflow is not preloaded.

CREATE FUNCTION pgflow.run_maintenance() RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    due_queues integer := 0;
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
    RETURN jsonb_build_object('due_queues', due_queues);
END
$$;
COMMENT ON FUNCTION pgflow.run_maintenance() IS
'One maintenance pass: announces delayed messages and retries that came due (wakes pgflow.read_with_poll, notifies message_due on channels of queues with notify on). Run every pgflow.maintenance_interval_ms by the pgflow maintenance worker when pgflow is preloaded; safe to call by hand. Returns what it did.';

-- Retention. The archive and the finished runs grow with every message and run. prune_archive
-- (here) and prune_runs (sql/workflow/runtime.sql) delete what is older than a given age, in
-- batches (max_rows) so that a large backlog is worked off in short transactions. Neither table
-- has an index on its time column (one would cost every archive and every completion a
-- write), so each call scans: the maintenance worker calls apply_retention() once a minute,
-- not on every pass.

CREATE FUNCTION pgflow._check_retention(older_than interval, max_rows integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF older_than IS NULL THEN
        RAISE EXCEPTION 'older_than must not be null' USING ERRCODE = '22004',
            HINT = 'Pass an interval such as ''7 days''.';
    ELSIF older_than < interval '0' THEN
        RAISE EXCEPTION 'older_than must not be negative, not %', older_than USING ERRCODE = '22023';
    END IF;
    IF max_rows IS NOT NULL AND max_rows < 1 THEN
        RAISE EXCEPTION 'max_rows must be at least 1 (or NULL for no limit), not %', max_rows USING ERRCODE = '22023';
    END IF;
END
$$;

CREATE FUNCTION pgflow.prune_archive(older_than interval, queue_name text DEFAULT NULL, max_rows integer DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
    n bigint;
BEGIN
    PERFORM pgflow._check_retention(older_than, max_rows);
    IF prune_archive.queue_name IS NOT NULL THEN
        q := pgflow._queue(prune_archive.queue_name);
    END IF;
    WITH doomed AS (
        SELECT a.ctid FROM pgflow.archive a
         WHERE a.archived_at < clock_timestamp() - older_than
           AND (q.queue_id IS NULL OR a.queue_id = q.queue_id)
         LIMIT max_rows
    )
    DELETE FROM pgflow.archive a USING doomed WHERE a.ctid = doomed.ctid;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION pgflow.prune_archive(interval, text, integer) IS
'Delete archived messages archived more than older_than ago, of one queue or (queue_name NULL) of all; at most max_rows of them (NULL: no limit). Returns how many were deleted. pgflow.archive_retention has the maintenance worker do this once a minute.';

CREATE FUNCTION pgflow.apply_retention() RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    archive_s integer := pgflow._archive_retention_s();
    runs_s integer := pgflow._run_retention_s();
    archived bigint := 0;
    runs bigint := 0;
BEGIN
    IF archive_s > 0 THEN
        archived := pgflow.prune_archive(make_interval(secs => archive_s), NULL, 10000);
    END IF;
    IF runs_s > 0 THEN
        runs := pgflow.prune_runs(make_interval(secs => runs_s), NULL, 1000);
    END IF;
    RETURN jsonb_build_object('archived_messages_deleted', archived, 'runs_deleted', runs);
END
$$;
COMMENT ON FUNCTION pgflow.apply_retention() IS
'Apply the retention settings once: delete up to 10000 archived messages older than pgflow.archive_retention and up to 1000 finished runs older than pgflow.run_retention (0, the default, keeps them forever). The maintenance worker calls it once a minute; call it from cron when pgflow is not preloaded. Returns what it deleted.';
