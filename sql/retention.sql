-- Retention, in one place. The archive and the finished runs grow with every message and run.
-- prune_archive and prune_runs delete what is older than a given age, in batches (max_rows) so
-- that a large backlog is worked off in short transactions. Neither table has an index on its
-- time column (one would cost every archive and every completion a write), so each call scans:
-- the maintenance worker (src/maintenance.rs) calls apply_retention() once a minute, not on
-- every pass.

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
    ELSIF older_than > interval '1000 years' THEN
        -- now() minus more than this leaves the range of timestamptz, or comes near it
        RAISE EXCEPTION 'older_than must be at most 1000 years, not %', older_than USING ERRCODE = '22023';
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

CREATE FUNCTION pgflow.prune_runs(older_than interval, flow_slug text DEFAULT NULL, max_rows integer DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    f pgflow.flows;
    ids uuid[];
    n bigint;
BEGIN
    PERFORM pgflow._check_retention(older_than, max_rows);
    IF prune_runs.flow_slug IS NOT NULL THEN
        f := pgflow._flow(prune_runs.flow_slug);
    END IF;
    -- Only finished runs: a finished run has no messages left (its tasks' messages were
    -- deleted as they completed, or all at once when it failed), so nothing else refers to it.
    ids := ARRAY(SELECT r.run_id FROM pgflow.runs r
                  WHERE r.status IN ('completed', 'failed', 'cancelled')
                    AND coalesce(r.completed_at, r.failed_at, r.cancelled_at) < clock_timestamp() - older_than
                    AND (f.flow_slug IS NULL OR r.flow_slug = f.flow_slug)
                  LIMIT max_rows);
    IF cardinality(ids) = 0 THEN
        RETURN 0;
    END IF;
    -- The runs first, each only if still finished: a retry_run that took one meanwhile (it
    -- holds the run's row lock) keeps it, and this delete, waiting for it, passes it over.
    WITH gone AS (
        DELETE FROM pgflow.runs r
         WHERE r.run_id = ANY (ids) AND r.status IN ('completed', 'failed', 'cancelled')
        RETURNING r.run_id
    )
    SELECT array_agg(gone.run_id) INTO ids FROM gone;
    n := coalesce(cardinality(ids), 0);
    DELETE FROM pgflow.step_tasks t WHERE t.run_id = ANY (ids);
    DELETE FROM pgflow.step_states s WHERE s.run_id = ANY (ids);
    DELETE FROM pgflow.run_retries rr WHERE rr.run_id = ANY (ids);
    DELETE FROM pgflow.signals sg WHERE sg.run_id = ANY (ids);
    RETURN n;
END
$$;
COMMENT ON FUNCTION pgflow.prune_runs(interval, text, integer) IS
'Delete workflow runs that completed, failed or were cancelled more than older_than ago, with their step states, tasks, signals and retry history, of one flow or (flow_slug NULL) of all; at most max_rows runs (NULL: no limit). Runs still under way are never touched. Returns how many runs were deleted. A late complete_task or fail_task for a deleted run gets 42704, and its run_id can be started again. pgflow.run_retention has the maintenance worker do this once a minute.';

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
