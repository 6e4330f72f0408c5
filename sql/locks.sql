-- pgflow's advisory locks. Their key spaces, how a key is derived and the code taking them live
-- in src/locks.rs; these are the same locks for the PL/pgSQL side. Each is transaction-scoped,
-- keyed by (space, hashtext(key)), and takes nothing but the lock manager: nothing is written.
-- Raw C functions without SET clauses: they run no statement, and a SET clause would cost
-- every send_batch a save and restore of settings. A NULL key takes no lock.

-- The queue-name lock: keeps a queue from being dropped under a caller that uses its message
-- sequence (send, send_batch, nack, bind_topic, get_queue_stats): taken shared by them,
-- exclusive by create_queue and drop_queue. Take it in its own statement BEFORE looking the
-- queue up, so the look-up's snapshot already sees a drop that committed meanwhile (42704)
-- instead of a sequence that is gone.
CREATE FUNCTION pgflow._lock_queue_name(queue_name text, exclusive boolean) RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'pgflow_lock_queue_name';

-- The queue-name lock, shared, only if it can be had at once (get_queue_stats passes over a
-- queue being dropped rather than waiting for it).
CREATE FUNCTION pgflow._try_lock_queue_name(queue_name text) RETURNS boolean
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'pgflow_try_lock_queue_name';

-- The flow lock: exclusive by what defines or drops a flow (create_flow, create_flow_from_shape,
-- drop_flow), shared by what starts or ends its work (start_flow, complete_task, fail_task).
-- It comes first in the lock order, before the run lock: a drop_flow waits for the work under
-- way, and work that comes after it finds the flow gone (42704). Claims (poll_for_tasks,
-- start_tasks) do not take it, since a poll may wait for minutes: drop_flow deletes the flow's
-- messages first, which waits for the claims holding them and leaves later claims nothing to
-- take.
CREATE FUNCTION pgflow._lock_flow(flow_slug text, exclusive boolean) RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'pgflow_lock_flow';

-- The run lock (see the lock order in sql/workflow/runtime.sql): exclusive, waiting for it
-- (returns true) or, with wait = false, only trying (returns whether it was had).
CREATE FUNCTION pgflow._lock_run(run_id uuid, wait boolean) RETURNS boolean
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'pgflow_lock_run';
