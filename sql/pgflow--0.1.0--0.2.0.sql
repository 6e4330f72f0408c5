-- pgflow 0.1.0 -> 0.2.0, run by ALTER EXTENSION pgflow UPDATE inside one transaction: an error
-- anywhere leaves the database at 0.1.0, whole.
--
-- Every change to an SQL object since 0.1.0 is here, in the order the changes were made; the
-- upgrade tier (tests/upgrade) proves that a database updated by this script has the same
-- catalog as a fresh install of 0.2.0 and that its data carries on. The C symbols that 0.1.0's
-- SQL names stay in the library, so a database still at 0.1.0 keeps working beside the new
-- library until it is updated.
\echo Use "ALTER EXTENSION pgflow UPDATE TO '0.2.0'" to load this file. \quit

-- send and send_batch accept a delay time in the last 100 ms of the timestamptz range.
CREATE OR REPLACE FUNCTION pgflow._due_at(queue_id bigint, due timestamptz) RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pgflow.due_wakeups (queue_id, due_at)
    VALUES ($1, CASE WHEN $2 > timestamptz '294276-12-31 23:59:59.9+00' THEN $2
                     ELSE to_timestamp(ceil(extract(epoch FROM $2) * 10) / 10) END)
    ON CONFLICT DO NOTHING;
$$;

-- create_queue: the same call is a no-op, a call with other options fails with 42710 naming
-- them (as create_flow does).
CREATE OR REPLACE FUNCTION pgflow.create_queue(
    queue_name text,
    max_retries integer DEFAULT 3,
    retry_delay_ms integer DEFAULT 1000,
    max_retry_delay_ms integer DEFAULT 3600000,
    retry_jitter double precision DEFAULT 0,
    notify boolean DEFAULT false
) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
    new_id bigint;
    seq_name text;
    differing text;
BEGIN
    PERFORM pgflow._check_name(create_queue.queue_name, 'queue_name');
    PERFORM pgflow._check_queue_options(create_queue.max_retries, create_queue.retry_delay_ms,
        create_queue.max_retry_delay_ms, create_queue.retry_jitter, create_queue.notify);
    PERFORM pgflow._lock_queue_name(create_queue.queue_name, true);
    SELECT * INTO q FROM pgflow.queues WHERE queue_name = create_queue.queue_name;
    IF NOT FOUND THEN
        -- The sequence is named after the queue's id, never its name: nothing a user typed is
        -- spliced into SQL text.
        new_id := nextval(pg_get_serial_sequence('pgflow.queues', 'queue_id')::regclass);
        seq_name := 'queue_' || new_id::text || '_msg_seq';
        -- The schema outlives DROP EXTENSION, and so do the sequences of its queues; queue ids
        -- then start again at 1. A sequence of this name that no queue uses is such a leftover.
        IF to_regclass('pgflow.' || quote_ident(seq_name)) IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM pgflow.queues
                            WHERE msg_seq = to_regclass('pgflow.' || quote_ident(seq_name))) THEN
            EXECUTE format('DROP SEQUENCE pgflow.%I', seq_name);
        END IF;
        EXECUTE format('CREATE SEQUENCE pgflow.%I AS bigint', seq_name);
        INSERT INTO pgflow.queues (queue_id, queue_name, msg_seq, max_retries, retry_delay_ms,
                                   max_retry_delay_ms, retry_jitter, notify)
        OVERRIDING SYSTEM VALUE
        VALUES (new_id, create_queue.queue_name, ('pgflow.' || seq_name)::regclass,
                create_queue.max_retries, create_queue.retry_delay_ms,
                create_queue.max_retry_delay_ms, create_queue.retry_jitter, create_queue.notify)
        ON CONFLICT (queue_name) DO NOTHING;
        IF FOUND THEN
            RETURN true;
        END IF;
        -- A concurrent create_queue of the same name committed first: theirs stands.
        EXECUTE format('DROP SEQUENCE pgflow.%I', seq_name);
        SELECT * INTO q FROM pgflow.queues WHERE queue_name = create_queue.queue_name;
    END IF;
    -- The queue exists: the same call is a no-op, a call asking for other options an error
    -- (as for create_flow), never a silent success that keeps options the caller did not ask for.
    SELECT string_agg(format('%s %s (asked: %s)', o.name, o.has, o.asked), ', ' ORDER BY o.n)
      INTO differing
      FROM (VALUES (1, 'max_retries', q.max_retries::text, create_queue.max_retries::text),
                   (2, 'retry_delay_ms', q.retry_delay_ms::text, create_queue.retry_delay_ms::text),
                   (3, 'max_retry_delay_ms', q.max_retry_delay_ms::text, create_queue.max_retry_delay_ms::text),
                   (4, 'retry_jitter', q.retry_jitter::text, create_queue.retry_jitter::text),
                   (5, 'notify', q.notify::text, create_queue.notify::text)) o(n, name, has, asked)
     WHERE o.has IS DISTINCT FROM o.asked;
    IF differing IS NOT NULL THEN
        RAISE EXCEPTION 'queue "%" already exists with other options', create_queue.queue_name
            USING ERRCODE = '42710',
                  DETAIL = format('It has %s.', differing),
                  HINT = 'Change a queue''s options with pgflow.alter_queue; create_queue with the options the queue has is a no-op.';
    END IF;
    RETURN false;
END
$$;
COMMENT ON FUNCTION pgflow.create_queue(text, integer, integer, integer, double precision, boolean) IS
'Create a queue. Returns true if created; false, changing nothing, if a queue of that name already exists with the same options; fails with 42710 naming the differing options if it exists with others (change them with pgflow.alter_queue). Names: ASCII letters, digits, underscore, 1-48 bytes. max_retries: deliveries after the first before a message is dead-lettered (0-100); retry_delay_ms: first backoff, doubled per attempt up to max_retry_delay_ms; retry_jitter: 0-1, fraction of the backoff randomly taken off; notify: announce every committed send on pgflow.queue_channel(queue_name).';

-- A flow's queue is moved only by the workflow functions: queues.managed_by marks it (set for
-- the queues of existing flows), and every function of the queue API that sends, acknowledges,
-- drops, delays, fails, reconfigures or redrives messages refuses it (55000) through
-- pgflow._check_unmanaged. create_flow marks its queue; drop_flow unmarks it before dropping it.
ALTER TABLE pgflow.queues
    ADD COLUMN managed_by text CONSTRAINT queues_managed_by_known CHECK (managed_by = 'flow');
COMMENT ON COLUMN pgflow.queues.managed_by IS 'pgflow: ''flow'' for the queue carrying a flow''s tasks, whose messages only the workflow functions move; NULL for other queues.';
UPDATE pgflow.queues q SET managed_by = 'flow'
 WHERE EXISTS (SELECT 1 FROM pgflow.flows f WHERE f.flow_slug = q.queue_name);

CREATE FUNCTION pgflow."_check_unmanaged"(
	"queue_name" TEXT, /* & str */
	"managed_by" TEXT, /* Option < & str > */
	"operation" TEXT /* & str */
) RETURNS void
IMMUTABLE PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'check_unmanaged_sql_wrapper';

CREATE FUNCTION pgflow._api_queue(queue_name text, operation text) RETURNS pgflow.queues
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q pgflow.queues;
BEGIN
    q := pgflow._queue(queue_name);
    PERFORM pgflow._check_unmanaged(q.queue_name, q.managed_by, operation);
    RETURN q;
END
$$;
CREATE OR REPLACE FUNCTION pgflow.drop_queue(queue_name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
BEGIN
    PERFORM pgflow._check_name(drop_queue.queue_name, 'queue_name');
    PERFORM pgflow._lock_queue_name(drop_queue.queue_name, true);
    SELECT * INTO q FROM pgflow.queues WHERE queue_name = drop_queue.queue_name FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pgflow._check_unmanaged(q.queue_name, q.managed_by, 'drop_queue');
    DELETE FROM pgflow.messages WHERE queue_id = q.queue_id;
    DELETE FROM pgflow.archive WHERE queue_id = q.queue_id;
    DELETE FROM pgflow.due_wakeups WHERE queue_id = q.queue_id;
    DELETE FROM pgflow.queues WHERE queue_id = q.queue_id;
    EXECUTE format('DROP SEQUENCE %s', q.msg_seq::text);
    -- Dead-lettered messages stay: they can be retried once a queue of that name exists again.
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgflow.drop_queue(text) IS
'Drop a queue with its live and archived messages; waits for transactions sending to it, and takes their messages along. Returns false if no such queue. Its dead-lettered messages are kept (pgflow.list_dlq_messages) and can be retried into a queue of the same name created later.';
CREATE OR REPLACE FUNCTION pgflow.purge_queue(queue_name text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
    n bigint;
BEGIN
    q := pgflow._api_queue(purge_queue.queue_name, 'purge_queue');
    DELETE FROM pgflow.messages WHERE queue_id = q.queue_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM pgflow.due_wakeups WHERE queue_id = q.queue_id;
    RETURN n;
END
$$;
COMMENT ON FUNCTION pgflow.purge_queue(text) IS
'Delete every live message of a queue (waiting, delayed or leased); archive and dead-letter queue are untouched. Returns how many were deleted.';
-- pop is the claim of read (src/queue/) followed by a delete of what it claimed: one home for
-- the claim (0.1.0's pop had a claim of its own).
CREATE OR REPLACE FUNCTION pgflow.pop(queue_name text, qty integer DEFAULT 1)
RETURNS SETOF pgflow.message_record
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_pop';
COMMENT ON FUNCTION pgflow.pop(text, integer) IS
'Read and delete up to qty visible messages at once (at-most-once delivery: a consumer that fails after pop has lost the message).';
CREATE OR REPLACE FUNCTION pgflow.delete(queue_name text, msg_ids bigint[], read_cts integer[] DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_delete_many';
COMMENT ON FUNCTION pgflow.delete(text, bigint[], integer[]) IS
'Delete several messages; returns the ids deleted. With read_cts (one per id, null for any), a message whose read_ct differs is left alone.';
CREATE OR REPLACE FUNCTION pgflow.archive(queue_name text, msg_ids bigint[], read_cts integer[] DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_archive_many';
COMMENT ON FUNCTION pgflow.archive(text, bigint[], integer[]) IS
'Archive several messages; returns the ids archived. With read_cts, a message whose read_ct differs is left alone.';
CREATE OR REPLACE FUNCTION pgflow.set_vt(queue_name text, msg_id bigint, vt integer, read_ct integer DEFAULT NULL)
RETURNS SETOF pgflow.message_record
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
BEGIN
    IF set_vt.msg_id IS NULL THEN
        RAISE EXCEPTION 'msg_id must not be null' USING ERRCODE = '22004';
    END IF;
    PERFORM pgflow._check_lease(set_vt.vt, 1);
    q := pgflow._api_queue(set_vt.queue_name, 'set_vt');
    RETURN QUERY
    UPDATE pgflow.messages m
       SET vt = clock_timestamp() + make_interval(secs => set_vt.vt)
     WHERE m.queue_id = q.queue_id AND m.msg_id = set_vt.msg_id
       AND (set_vt.read_ct IS NULL OR m.read_ct = set_vt.read_ct)
    RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.vt, m.message, m.headers, m.priority;
END
$$;
COMMENT ON FUNCTION pgflow.set_vt(text, bigint, integer, integer) IS
'Set a message''s visibility timeout to vt seconds from now (extend or end a lease). Returns the updated message, or no row if there is no such message or read_ct is stale.';
CREATE OR REPLACE FUNCTION pgflow.nack(queue_name text, msg_id bigint, error text DEFAULT NULL, read_ct integer DEFAULT NULL)
RETURNS pgflow.nack_result
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
    m record;
    delay_ms double precision;
    at timestamptz;
    entry jsonb;
BEGIN
    IF nack.msg_id IS NULL THEN
        RAISE EXCEPTION 'msg_id must not be null' USING ERRCODE = '22004';
    END IF;
    -- Shared lock first (see pgflow._lock_queue_name): a drop_queue committing meanwhile then
    -- shows as 42704 here, not as an error about the queue's vanished message sequence below.
    PERFORM pgflow._lock_queue_name(nack.queue_name, false);
    q := pgflow._api_queue(nack.queue_name, 'nack');
    SELECT mm.msg_id, mm.read_ct INTO m FROM pgflow.messages mm
     WHERE mm.queue_id = q.queue_id AND mm.msg_id = nack.msg_id
       FOR UPDATE;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM pgflow.archive a WHERE a.queue_id = q.queue_id AND a.msg_id = nack.msg_id)
           OR nack.msg_id BETWEEN 1 AND coalesce(pg_sequence_last_value(q.msg_seq), 0) THEN
            -- It existed: acked, archived or dead-lettered by someone else. A late nack is a no-op.
            RETURN ROW(nack.msg_id, 'stale', NULL, NULL, NULL)::pgflow.nack_result;
        END IF;
        RAISE EXCEPTION 'message % does not exist in queue "%"', nack.msg_id, q.queue_name
            USING ERRCODE = '42704', HINT = 'Pass the msg_id returned by pgflow.read.';
    END IF;
    IF nack.read_ct IS NOT NULL AND m.read_ct <> nack.read_ct THEN
        RETURN ROW(nack.msg_id, 'stale', m.read_ct, NULL, NULL)::pgflow.nack_result;
    END IF;
    IF m.read_ct = 0 THEN
        RAISE EXCEPTION 'message % of queue "%" has not been delivered', nack.msg_id, q.queue_name
            USING ERRCODE = '55000', HINT = 'Only a message returned by pgflow.read can be nacked.';
    END IF;
    entry := jsonb_build_object('attempt', m.read_ct, 'error', pgflow._error_text(nack.error), 'at', clock_timestamp());
    IF m.read_ct > q.max_retries THEN
        UPDATE pgflow.messages mm SET errors = coalesce(mm.errors, '[]'::jsonb) || jsonb_build_array(entry)
         WHERE mm.queue_id = q.queue_id AND mm.msg_id = nack.msg_id;
        RETURN ROW(nack.msg_id, 'dead_lettered', m.read_ct, NULL,
                   pgflow._dead_letter(q, nack.msg_id, coalesce(nack.error, 'nacked without an error')))::pgflow.nack_result;
    END IF;
    -- retry_delay_ms * 2^(attempt-1), capped, then up to retry_jitter of it taken off at random.
    delay_ms := least(q.retry_delay_ms * power(2::double precision, m.read_ct - 1), q.max_retry_delay_ms::double precision);
    delay_ms := delay_ms * (1 - q.retry_jitter * random());
    at := clock_timestamp() + make_interval(secs => delay_ms / 1000.0);
    UPDATE pgflow.messages mm
       SET vt = at, errors = coalesce(mm.errors, '[]'::jsonb) || jsonb_build_array(entry)
     WHERE mm.queue_id = q.queue_id AND mm.msg_id = nack.msg_id;
    IF delay_ms > 0 THEN
        PERFORM pgflow._due_at(q.queue_id, at);
    ELSE
        -- Due at once: no maintenance pass will announce it, so announce it here, at commit.
        PERFORM pgflow._on_commit_wake(q.queue_id);
        IF q.notify THEN
            PERFORM pgflow._on_commit_notify(pgflow.queue_channel(q.queue_name),
                jsonb_build_object('event', 'message_due', 'queue', q.queue_name));
        END IF;
    END IF;
    RETURN ROW(nack.msg_id, 'retrying', m.read_ct, at, NULL)::pgflow.nack_result;
END
$$;
COMMENT ON FUNCTION pgflow.nack(text, bigint, text, integer) IS
'Report a failed attempt. The message becomes visible again after retry_delay_ms * 2^(attempt-1) ms (capped by max_retry_delay_ms, less up to retry_jitter of it at random), or, if this was its last allowed delivery (max_retries + 1), moves to the dead-letter queue. Returns outcome retrying (with visible_at), dead_lettered (with dlq_id) or stale (read_ct no longer matches, or the message was already acked: nothing changed). The error text is kept with the message, truncated to 2000 characters.';
CREATE OR REPLACE FUNCTION pgflow._redrive(dlq_ids bigint[]) RETURNS TABLE (dlq_id bigint, msg_id bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    d record;
    q pgflow.queues;
BEGIN
    FOR d IN SELECT x.* FROM pgflow.dlq x WHERE x.dlq_id = ANY (dlq_ids) ORDER BY x.dlq_id FOR UPDATE LOOP
        -- Shared lock before the look-up, so a queue dropped meanwhile is reported below (42704)
        -- rather than met in _send as a sequence that is gone.
        PERFORM pgflow._lock_queue_name(d.queue_name, false);
        SELECT * INTO q FROM pgflow.queues WHERE queue_name = d.queue_name;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'queue "%" of dead-lettered message % no longer exists', d.queue_name, d.dlq_id
                USING ERRCODE = '42704',
                      HINT = 'Create the queue again with pgflow.create_queue, then retry; the message stays in the dead-letter queue.';
        END IF;
        PERFORM pgflow._check_unmanaged(q.queue_name, q.managed_by, 'retry_dlq_message');
        DELETE FROM pgflow.dlq x WHERE x.dlq_id = d.dlq_id;
        dlq_id := d.dlq_id;
        msg_id := pgflow._send(q, d.message, clock_timestamp(), d.priority, d.headers);
        RETURN NEXT;
    END LOOP;
END
$$;
CREATE OR REPLACE FUNCTION pgflow.retry_dlq(queue_name text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n bigint;
BEGIN
    PERFORM pgflow._api_queue(retry_dlq.queue_name, 'retry_dlq');
    SELECT count(*) INTO n FROM pgflow._redrive(ARRAY(
        SELECT d.dlq_id FROM pgflow.dlq d WHERE d.queue_name = retry_dlq.queue_name));
    RETURN n;
END
$$;
COMMENT ON FUNCTION pgflow.retry_dlq(text) IS
'Put every dead-lettered message of a queue back on it, oldest first, as new messages; returns how many.';
CREATE OR REPLACE FUNCTION pgflow.send_with_notify(queue_name text, message jsonb, delay integer DEFAULT 0,
                                        priority integer DEFAULT 0, headers jsonb DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    q pgflow.queues;
    id bigint;
BEGIN
    PERFORM pgflow._check_send(delay, priority, headers);
    -- As in pgflow.send: wait out a drop_queue in progress, so the look-up sees it (42704).
    PERFORM pgflow._lock_queue_name(queue_name, false);
    q := pgflow._api_queue(queue_name, 'send_with_notify');
    id := pgflow._send(q, message, clock_timestamp() + make_interval(secs => delay), priority, headers);
    -- count 0: the trigger already counted this message; this only turns the announcement on.
    PERFORM pgflow._on_commit_sent(q.queue_id, q.queue_name, id, id, 0, true);
    RETURN id;
END
$$;
COMMENT ON FUNCTION pgflow.send_with_notify(text, jsonb, integer, integer, jsonb) IS
'pgflow.send, and announce the message on pgflow.queue_channel(queue_name) when the transaction commits, whatever the queue''s notify setting. Payload: {"event":"message_sent","queue","first_msg_id","last_msg_id","count"}; several sends in one transaction make one notification covering their id range. A notification is a hint: read the queue to get the messages.';
CREATE OR REPLACE FUNCTION pgflow.create_flow(flow_slug text, max_attempts integer DEFAULT 3, base_delay integer DEFAULT 1,
                                   timeout integer DEFAULT 60)
RETURNS pgflow.flows
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    f pgflow.flows;
    created boolean;
BEGIN
    PERFORM pgflow._check_name(create_flow.flow_slug, 'flow_slug');
    PERFORM pgflow._check_option('max_attempts', create_flow.max_attempts, 1, 100, false);
    PERFORM pgflow._check_option('base_delay', create_flow.base_delay, 0, 86400, false);
    PERFORM pgflow._check_option('timeout', create_flow.timeout, 1, 86400, false);
    -- Concurrent definitions of one slug are serialised, so the second sees the first's flow.
    PERFORM pgflow._lock_flow(create_flow.flow_slug, true);
    SELECT * INTO f FROM pgflow.flows WHERE flow_slug = create_flow.flow_slug FOR UPDATE;
    IF FOUND THEN
        IF (f.opt_max_attempts, f.opt_base_delay, f.opt_timeout)
           IS DISTINCT FROM (create_flow.max_attempts, create_flow.base_delay, create_flow.timeout) THEN
            RAISE EXCEPTION 'flow "%" already exists with other options', create_flow.flow_slug
                USING ERRCODE = '42710',
                      DETAIL = format('It has max_attempts %s, base_delay %s, timeout %s.',
                                      f.opt_max_attempts, f.opt_base_delay, f.opt_timeout),
                      HINT = 'A flow''s definition does not change: drop it with pgflow.drop_flow, or create the new definition under another slug.';
        END IF;
        RETURN f;
    END IF;
    -- The flow's tasks travel through the queue of the same name. Attempts are counted by the
    -- workflow layer, so the queue itself never dead-letters them (max_retries at its maximum,
    -- above any max_attempts).
    -- An existing queue of that name is refused whatever its options (create_queue would
    -- accept one with the same options, or raise its own error for other options).
    IF EXISTS (SELECT 1 FROM pgflow.queues WHERE queue_name = create_flow.flow_slug) THEN
        created := false;
    ELSE
        created := pgflow.create_queue(create_flow.flow_slug, max_retries => 100, retry_delay_ms => 0,
                                       max_retry_delay_ms => 0);
    END IF;
    IF NOT created THEN
        RAISE EXCEPTION 'a queue named "%" already exists', create_flow.flow_slug
            USING ERRCODE = '42710',
                  HINT = 'A flow delivers its tasks through a queue of its own name: choose another flow_slug, or drop that queue.';
    END IF;
    -- From now on only the workflow functions move the queue's messages (pgflow._check_unmanaged).
    UPDATE pgflow.queues SET managed_by = 'flow' WHERE queue_name = create_flow.flow_slug;
    INSERT INTO pgflow.flows (flow_slug, opt_max_attempts, opt_base_delay, opt_timeout)
    VALUES (create_flow.flow_slug, create_flow.max_attempts, create_flow.base_delay, create_flow.timeout)
    RETURNING * INTO f;
    RETURN f;
END
$$;
COMMENT ON FUNCTION pgflow.create_flow(text, integer, integer, integer) IS
'Create a flow and the queue of the same name that delivers its tasks; returns the flow row. Slug: ASCII letters, digits, underscore, 1-48 bytes. Task options, which steps may override: max_attempts (1-100, the first attempt included), base_delay (0-86400 s; retry n waits base_delay * 2^(n-1) s, capped at 86400 s), timeout (1-86400 s before a started task may be claimed again). Creating an existing flow with the same options is a no-op; with other options it fails with 42710.';
CREATE OR REPLACE FUNCTION pgflow.drop_flow(flow_slug text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM pgflow._check_name(drop_flow.flow_slug, 'flow_slug');
    -- first in the lock order: waits for start_flow, complete_task and fail_task under way
    PERFORM pgflow._lock_flow(drop_flow.flow_slug, true);
    PERFORM 1 FROM pgflow.flows WHERE flow_slug = drop_flow.flow_slug FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    -- Then its messages, before its tasks: a claim locks messages, then their tasks, so this
    -- waits for the claims under way instead of deadlocking with them, and a claim that comes
    -- later finds nothing to take.
    DELETE FROM pgflow.messages m USING pgflow.queues q
     WHERE q.queue_name = drop_flow.flow_slug AND m.queue_id = q.queue_id;
    DELETE FROM pgflow.step_tasks t USING pgflow.runs r
     WHERE r.flow_slug = drop_flow.flow_slug AND t.run_id = r.run_id;
    DELETE FROM pgflow.step_states s USING pgflow.runs r
     WHERE r.flow_slug = drop_flow.flow_slug AND s.run_id = r.run_id;
    DELETE FROM pgflow.run_retries rr USING pgflow.runs r
     WHERE r.flow_slug = drop_flow.flow_slug AND rr.run_id = r.run_id;
    DELETE FROM pgflow.signals sg USING pgflow.runs r
     WHERE r.flow_slug = drop_flow.flow_slug AND sg.run_id = r.run_id;
    DELETE FROM pgflow.signal_waits w WHERE w.flow_slug = drop_flow.flow_slug;
    DELETE FROM pgflow.runs WHERE flow_slug = drop_flow.flow_slug;
    DELETE FROM pgflow.deps WHERE flow_slug = drop_flow.flow_slug;
    DELETE FROM pgflow.steps WHERE flow_slug = drop_flow.flow_slug;
    DELETE FROM pgflow.flows WHERE flow_slug = drop_flow.flow_slug;
    UPDATE pgflow.queues SET managed_by = NULL WHERE queue_name = drop_flow.flow_slug;
    PERFORM pgflow.drop_queue(drop_flow.flow_slug);
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgflow.drop_flow(text) IS
'Drop a flow with its steps, all its runs, their step states, tasks, signals and retry history, and its queue (with the queue''s messages). Returns false if there is no such flow.';

-- Workflow event payloads carry identifiers, never user data (any role that can connect can
-- LISTEN): no run input in workflow_started, no error text in task_failed and workflow_failed
-- (task_failed says why: "reason": "error" or "timeout"). With them went 0.1.0's XX000 for a
-- deeply nested run input, which the event code parsed.
DROP FUNCTION pgflow._event_error(text);
CREATE OR REPLACE FUNCTION pgflow._fail_run(r pgflow.runs, queue_id bigint, failed_step text, error text) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    UPDATE pgflow.runs SET status = 'failed', failed_at = clock_timestamp() WHERE run_id = r.run_id;
    DELETE FROM pgflow.signal_waits w WHERE w.run_id = r.run_id;
    PERFORM pgflow._emit(r.flow_slug, jsonb_build_object(
        'event', 'workflow_failed', 'run_id', r.run_id, 'flow_slug', r.flow_slug,
        'failed_step', failed_step));
END
$$;
CREATE OR REPLACE FUNCTION pgflow.start_flow(flow_slug text, input jsonb, run_id uuid DEFAULT NULL)
RETURNS pgflow.runs
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
#variable_conflict use_column
DECLARE
    f pgflow.flows;
    q pgflow.queues;
    r pgflow.runs;
    st pgflow.steps;
BEGIN
    -- shared: a drop_flow under way finishes first, and then the flow is gone (42704)
    PERFORM pgflow._lock_flow(start_flow.flow_slug, false);
    f := pgflow._flow(start_flow.flow_slug);
    IF start_flow.input IS NULL THEN
        RAISE EXCEPTION 'input must not be null' USING ERRCODE = '22004',
            HINT = 'Pass ''{}''::jsonb (or JSON null, ''null''::jsonb) for a run without input.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgflow.steps s WHERE s.flow_slug = f.flow_slug) THEN
        RAISE EXCEPTION 'flow "%" has no steps', f.flow_slug USING ERRCODE = '55000',
            HINT = 'Add steps with pgflow.add_step before starting runs.';
    END IF;
    q := pgflow._queue(f.flow_slug);
    INSERT INTO pgflow.runs (run_id, flow_slug, input)
    VALUES (coalesce(start_flow.run_id, pgflow._time_ordered_uuid()), f.flow_slug, start_flow.input)
    ON CONFLICT (run_id) DO NOTHING
    RETURNING * INTO r;
    IF NOT FOUND THEN
        -- An explicit run_id works as an idempotency key: starting the same run again returns it.
        SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = start_flow.run_id;
        IF r.flow_slug = f.flow_slug AND r.input = start_flow.input THEN
            RETURN r;
        END IF;
        RAISE EXCEPTION 'run % already exists with another flow or input', start_flow.run_id
            USING ERRCODE = '42710', HINT = 'Pass a new run_id, or NULL to have one generated.';
    END IF;
    PERFORM pgflow._emit(f.flow_slug, jsonb_build_object(
        'event', 'workflow_started', 'run_id', r.run_id, 'flow_slug', f.flow_slug));
    INSERT INTO pgflow.step_states (flow_slug, run_id, step_slug, remaining_deps)
    SELECT f.flow_slug, r.run_id, s.step_slug, s.deps_count
      FROM pgflow.steps s WHERE s.flow_slug = f.flow_slug AND s.deps_count > 0
     ORDER BY s.step_index;
    FOR st IN SELECT * FROM pgflow.steps s WHERE s.flow_slug = f.flow_slug AND s.deps_count = 0 ORDER BY s.step_index LOOP
        EXIT WHEN NOT pgflow._start_step(r, q, st);
    END LOOP;
    SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = r.run_id;
    RETURN r;
END
$$;
COMMENT ON FUNCTION pgflow.start_flow(text, jsonb, uuid) IS
'Start a run of a flow with the given input (any JSON value, not SQL NULL); returns the run row. Creates the state of every step and queues the tasks of the root steps (after their start_delay). A given run_id acts as an idempotency key: starting it again with the same flow and input returns the existing run; with another flow or input fails with 42710. A root map step over an input that is not an array fails the run at once.';
CREATE OR REPLACE FUNCTION pgflow._task_timed_out(f pgflow.flows, q pgflow.queues, st pgflow.steps, msg_id bigint,
                                       run_id uuid, task_index integer, read_ct integer) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r pgflow.runs;
    tstatus text;
    err text;
    now_ timestamptz := clock_timestamp();
BEGIN
    IF pgflow._lock_run(_task_timed_out.run_id, false) THEN
        SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = _task_timed_out.run_id;
    END IF;
    IF r.run_id IS NULL THEN
        UPDATE pgflow.messages m SET vt = now_ + interval '1 second'
         WHERE m.queue_id = q.queue_id AND m.msg_id = _task_timed_out.msg_id;
        RETURN;
    END IF;
    SELECT t.status INTO tstatus FROM pgflow.step_tasks t
     WHERE t.run_id = r.run_id AND t.step_slug = st.step_slug AND t.task_index = _task_timed_out.task_index;
    IF r.status <> 'started' OR tstatus IS DISTINCT FROM 'started' THEN
        DELETE FROM pgflow.messages m WHERE m.queue_id = q.queue_id AND m.msg_id = _task_timed_out.msg_id;
        RETURN;
    END IF;
    err := format('timed out: not completed within %s s on its last attempt (%s of %s)',
                  coalesce(st.opt_timeout, f.opt_timeout), read_ct - 1, coalesce(st.opt_max_attempts, f.opt_max_attempts));
    DELETE FROM pgflow.messages m WHERE m.queue_id = q.queue_id AND m.msg_id = _task_timed_out.msg_id;
    PERFORM pgflow._task_exhausted(r, q, st, task_index, read_ct - 1, err, 'timeout');
END
$$;

-- add_step's error for a step depending on itself names the argument (deps_slugs[i]).
DROP FUNCTION pgflow.add_step(text, text, text[], integer, integer, integer, integer, text);
CREATE FUNCTION pgflow.add_step(flow_slug text, step_slug text, deps_slugs text[] DEFAULT '{}',
                                max_attempts integer DEFAULT NULL, base_delay integer DEFAULT NULL,
                                timeout integer DEFAULT NULL, start_delay integer DEFAULT NULL,
                                step_type text DEFAULT 'single', if_input jsonb DEFAULT NULL,
                                if_not_input jsonb DEFAULT NULL, when_unmet text DEFAULT 'skip',
                                when_exhausted text DEFAULT 'fail')
RETURNS pgflow.steps
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    f pgflow.flows;
    s pgflow.steps;
    old_deps text[];
    i integer;
    d text;
BEGIN
    PERFORM pgflow._check_name(add_step.flow_slug, 'flow_slug');
    PERFORM pgflow._check_name(add_step.step_slug, 'step_slug');
    IF add_step.step_slug = 'run' THEN
        RAISE EXCEPTION 'step_slug "run" is reserved' USING ERRCODE = '22023',
            HINT = 'A task''s input holds the run input under the key "run"; choose another step_slug.';
    END IF;
    IF add_step.deps_slugs IS NULL THEN
        RAISE EXCEPTION 'deps_slugs must not be null' USING ERRCODE = '22004',
            HINT = 'Pass ''{}'' for a root step.';
    ELSIF array_ndims(add_step.deps_slugs) > 1 THEN
        RAISE EXCEPTION 'deps_slugs must be a one-dimensional array' USING ERRCODE = '22023';
    END IF;
    i := 0;
    FOREACH d IN ARRAY add_step.deps_slugs LOOP
        i := i + 1;
        IF d IS NULL THEN
            RAISE EXCEPTION 'deps_slugs[%] is null', i USING ERRCODE = '22004';
        END IF;
        PERFORM pgflow._check_name(d, format('deps_slugs[%s]', i));
        IF d = add_step.step_slug THEN
            RAISE EXCEPTION 'deps_slugs[%] names step "%" itself: a step cannot depend on itself', i, d
                USING ERRCODE = '22023';
        END IF;
        IF array_position(add_step.deps_slugs, d) < i THEN
            RAISE EXCEPTION 'deps_slugs names "%" twice', d USING ERRCODE = '22023';
        END IF;
    END LOOP;
    PERFORM pgflow._check_option('max_attempts', add_step.max_attempts, 1, 100, true);
    PERFORM pgflow._check_option('base_delay', add_step.base_delay, 0, 86400, true);
    -- a signal step's timeout bounds a wait for a person or a system: up to a year
    PERFORM pgflow._check_option('timeout', add_step.timeout, 1,
                                 CASE WHEN add_step.step_type = 'signal' THEN 31536000 ELSE 86400 END, true);
    PERFORM pgflow._check_option('start_delay', add_step.start_delay, 0, 31536000, true);
    IF add_step.step_type IS NULL THEN
        RAISE EXCEPTION 'step_type must not be null' USING ERRCODE = '22004';
    ELSIF add_step.step_type NOT IN ('single', 'map', 'signal') THEN
        RAISE EXCEPTION 'step_type must be ''single'', ''map'' or ''signal'', not "%"', left(add_step.step_type, 64)
            USING ERRCODE = '22023';
    ELSIF add_step.step_type = 'signal' AND num_nonnulls(add_step.max_attempts, add_step.base_delay, add_step.start_delay) > 0 THEN
        RAISE EXCEPTION 'signal step "%" takes no max_attempts, base_delay or start_delay: it has no tasks', add_step.step_slug
            USING ERRCODE = '22023',
            HINT = 'A signal step waits for pgflow.signal; its timeout (optional) bounds the wait.';
    ELSIF add_step.step_type = 'map' AND cardinality(add_step.deps_slugs) > 1 THEN
        RAISE EXCEPTION 'map step "%" has % dependencies; a map step has at most one', add_step.step_slug,
            cardinality(add_step.deps_slugs) USING ERRCODE = '22023',
            HINT = 'A map step maps over the run input (no dependency) or over the array output of its one dependency.';
    END IF;
    PERFORM pgflow._check_condition(add_step.if_input, add_step.if_not_input, add_step.when_unmet,
                                    add_step.when_exhausted,
                                    ARRAY['if_input', 'if_not_input', 'when_unmet', 'when_exhausted']);

    -- Definitions of one flow are serialised on its row.
    SELECT * INTO f FROM pgflow.flows WHERE flow_slug = add_step.flow_slug FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'flow "%" does not exist', add_step.flow_slug
            USING ERRCODE = '42704', HINT = 'Create it first with pgflow.create_flow(flow_slug).';
    END IF;

    SELECT * INTO s FROM pgflow.steps WHERE flow_slug = add_step.flow_slug AND step_slug = add_step.step_slug;
    IF FOUND THEN
        old_deps := ARRAY(SELECT dd.dep_slug FROM pgflow.deps dd
                           WHERE dd.flow_slug = add_step.flow_slug AND dd.step_slug = add_step.step_slug
                           ORDER BY dd.dep_index);
        IF (s.step_type, s.opt_max_attempts, s.opt_base_delay, s.opt_timeout, s.opt_start_delay, old_deps,
            s.if_input, s.if_not_input, s.when_unmet, s.when_exhausted)
           IS DISTINCT FROM (add_step.step_type, add_step.max_attempts, add_step.base_delay, add_step.timeout,
                             add_step.start_delay, add_step.deps_slugs, add_step.if_input, add_step.if_not_input,
                             add_step.when_unmet, add_step.when_exhausted) THEN
            RAISE EXCEPTION 'step "%" of flow "%" already exists with another definition', add_step.step_slug,
                add_step.flow_slug USING ERRCODE = '42710',
                HINT = 'A flow''s definition does not change: drop it with pgflow.drop_flow, or use another step_slug.';
        END IF;
        RETURN s;
    END IF;

    FOREACH d IN ARRAY add_step.deps_slugs LOOP
        IF NOT EXISTS (SELECT 1 FROM pgflow.steps x WHERE x.flow_slug = add_step.flow_slug AND x.step_slug = d) THEN
            RAISE EXCEPTION 'dependency "%" of step "%" is not a step of flow "%"', d, add_step.step_slug,
                add_step.flow_slug USING ERRCODE = '42704',
                HINT = 'Add a step''s dependencies before the step itself.';
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pgflow.runs r WHERE r.flow_slug = add_step.flow_slug) THEN
        RAISE EXCEPTION 'flow "%" already has runs; its steps can no longer change', add_step.flow_slug
            USING ERRCODE = '55000',
                  HINT = 'Create the new definition under another flow_slug, or drop the flow with its runs.';
    END IF;

    INSERT INTO pgflow.steps (flow_slug, step_slug, step_type, step_index, deps_count, opt_max_attempts,
                              opt_base_delay, opt_timeout, opt_start_delay, if_input, if_not_input, when_unmet,
                              when_exhausted)
    VALUES (add_step.flow_slug, add_step.step_slug, add_step.step_type,
            (SELECT count(*) FROM pgflow.steps x WHERE x.flow_slug = add_step.flow_slug),
            cardinality(add_step.deps_slugs), add_step.max_attempts, add_step.base_delay, add_step.timeout,
            add_step.start_delay, add_step.if_input, add_step.if_not_input, add_step.when_unmet,
            add_step.when_exhausted)
    RETURNING * INTO s;
    INSERT INTO pgflow.deps (flow_slug, dep_slug, step_slug, dep_index)
    SELECT add_step.flow_slug, x.dep, add_step.step_slug, x.i - 1
      FROM unnest(add_step.deps_slugs) WITH ORDINALITY AS x(dep, i);
    RETURN s;
END
$$;
COMMENT ON FUNCTION pgflow.add_step(text, text, text[], integer, integer, integer, integer, text, jsonb, jsonb, text, text) IS
'Add a step to a flow; returns the step row. deps_slugs: steps of the flow, already added, that must complete (or be skipped) first (so a flow is a DAG by construction). Options left NULL inherit the flow''s; start_delay (0-31536000 s) delays the step''s tasks after it becomes ready. step_type ''map'': one task per element of an array, the run input (no dependency) or the output of its one dependency; its output is the array of its task outputs. step_type ''signal'': no task; once ready it waits for pgflow.signal, whose payload is its output; timeout (optional, not inherited) bounds the wait, after which when_exhausted applies. Condition: when the step becomes ready, its input ({"run": ..., "<dep>": <output>, ...}) must contain if_input and must not contain if_not_input (JSON objects, jsonb @>); when_unmet: skip (default; dependents run without its key), skip_cascade (it and every step after it are skipped) or fail (the run fails). when_exhausted: what running out of attempts (or fail_task with retry => false) does: fail (default: the run fails), skip or skip_cascade. Adding an identical step again is a no-op; a different one fails with 42710; a flow that has runs can take no new steps (55000).';

-- Every attempt leaves its entry in a message's errors: a delivery whose lease ran out gets
-- "visibility timeout expired" when the message is claimed again (the claim of src/queue/,
-- which read_with_poll now uses too), and the dead-letter move adds the last attempt's entry
-- only if that claim has not. pgflow._claim's leasing branch is gone; pop claims through the
-- same Rust claim (below).
DROP FUNCTION pgflow._claim(pgflow.queues, integer, integer, boolean);
CREATE OR REPLACE FUNCTION pgflow.read_with_poll(queue_name text, vt integer, qty integer DEFAULT 1,
                                      max_poll_seconds integer DEFAULT 5, poll_interval_ms integer DEFAULT 100)
RETURNS SETOF pgflow.message_record
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    q pgflow.queues;
    deadline timestamptz;
    epoch bigint;
    left_ms integer;
BEGIN
    PERFORM pgflow._check_lease(vt, qty);
    PERFORM pgflow._check_poll(max_poll_seconds, poll_interval_ms);
    q := pgflow._queue(queue_name);
    deadline := clock_timestamp() + make_interval(secs => max_poll_seconds);
    LOOP
        -- Taken before looking, so a send committing between the look and the wait wakes us.
        epoch := pgflow._wake_epoch(q.queue_id);
        -- the claim of pgflow.read (src/queue/): one home for the lease and DLQ rules
        RETURN QUERY SELECT * FROM pgflow.read(q.queue_name, vt, qty);
        IF FOUND THEN
            RETURN;
        END IF;
        left_ms := ceil(extract(epoch FROM deadline - clock_timestamp()) * 1000);
        EXIT WHEN left_ms <= 0;
        PERFORM pgflow._wait_for_wake(q.queue_id, epoch, least(left_ms, poll_interval_ms));
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgflow.read_with_poll(text, integer, integer, integer, integer) IS
'Like pgflow.read, but waits up to max_poll_seconds for messages. With pgflow in shared_preload_libraries it wakes as soon as a send to the queue commits; otherwise it looks again every poll_interval_ms (which also bounds how late it notices expired leases and due delayed messages). Returns nothing if none came in time.';
CREATE OR REPLACE FUNCTION pgflow._dead_letter(q pgflow.queues, msg_id bigint, error text) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    id bigint;
BEGIN
    WITH gone AS (
        DELETE FROM pgflow.messages m
         WHERE m.queue_id = q.queue_id AND m.msg_id = _dead_letter.msg_id
        RETURNING m.*
    )
    INSERT INTO pgflow.dlq (queue_name, msg_id, message, headers, priority, attempts, last_error, errors, enqueued_at)
    SELECT q.queue_name, g.msg_id, g.message, g.headers, g.priority, g.read_ct,
           coalesce(pgflow._error_text(error), 'visibility timeout expired without ack or nack'),
           -- the last attempt's lease ran out: its entry, unless the claim that found the message
           -- exhausted wrote it already (each earlier attempt has its own, see src/queue/)
           coalesce(g.errors, '[]'::jsonb) || CASE WHEN error IS NULL AND g.read_ct > 0 AND NOT coalesce(
               g.errors @> jsonb_build_array(jsonb_build_object('attempt', g.read_ct)), false)
               THEN jsonb_build_array(jsonb_build_object(
                   'attempt', g.read_ct, 'error', 'visibility timeout expired without ack or nack',
                   'at', clock_timestamp())) ELSE '[]'::jsonb END,
           g.enqueued_at
      FROM gone g
    RETURNING dlq_id INTO id;
    RETURN id;
END
$$;

-- drop_flow under load: the flow lock (pgflow._lock_flow, which replaces _lock_flow_slug) is
-- taken exclusive by drop_flow and the definitions, shared by start_flow, complete_task and
-- fail_task before the run lock; drop_flow deletes the flow's messages before its tasks.
DROP FUNCTION pgflow._lock_flow_slug(text);
CREATE FUNCTION pgflow._lock_flow(flow_slug text, exclusive boolean) RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'pgflow_lock_flow';
CREATE OR REPLACE FUNCTION pgflow.create_flow_from_shape(flow_slug text, shape jsonb) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    canon jsonb;
    st jsonb;
BEGIN
    PERFORM pgflow._check_name(create_flow_from_shape.flow_slug, 'flow_slug');
    canon := pgflow._canonical_shape(create_flow_from_shape.shape);
    PERFORM pgflow._check_option('max_attempts', (canon ->> 'max_attempts')::integer, 1, 100, false);
    PERFORM pgflow._check_option('base_delay', (canon ->> 'base_delay')::integer, 0, 86400, false);
    PERFORM pgflow._check_option('timeout', (canon ->> 'timeout')::integer, 1, 86400, false);
    PERFORM pgflow._lock_flow(create_flow_from_shape.flow_slug, true);
    PERFORM 1 FROM pgflow.flows WHERE flow_slug = create_flow_from_shape.flow_slug FOR UPDATE;
    IF FOUND THEN
        IF pgflow.get_flow_shape(create_flow_from_shape.flow_slug) = canon THEN
            RETURN false;
        END IF;
        RAISE EXCEPTION 'flow "%" already exists with another shape', create_flow_from_shape.flow_slug
            USING ERRCODE = '42710',
                  HINT = 'Compare with pgflow.get_flow_shape(flow_slug); drop the flow with pgflow.drop_flow, or use another flow_slug.';
    END IF;
    PERFORM pgflow.create_flow(create_flow_from_shape.flow_slug, (canon ->> 'max_attempts')::integer,
                               (canon ->> 'base_delay')::integer, (canon ->> 'timeout')::integer);
    FOR st IN SELECT value FROM jsonb_array_elements(canon -> 'steps') LOOP
        PERFORM pgflow.add_step(create_flow_from_shape.flow_slug, st ->> 'slug',
                                ARRAY(SELECT jsonb_array_elements_text(st -> 'deps')),
                                (st ->> 'max_attempts')::integer, (st ->> 'base_delay')::integer,
                                (st ->> 'timeout')::integer, (st ->> 'start_delay')::integer, st ->> 'type',
                                st -> 'if', st -> 'if_not', coalesce(st ->> 'when_unmet', 'skip'),
                                coalesce(st ->> 'when_exhausted', 'fail'));
    END LOOP;
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgflow.create_flow_from_shape(text, jsonb) IS
'Create a whole flow from one JSON document, in one step: {"max_attempts","base_delay","timeout" (optional, defaults 3, 1, 60), "steps":[{"slug", "type" ("single", "map" or "signal", default single), "deps" (default []), "max_attempts","base_delay","timeout","start_delay", "if","if_not","when_unmet","when_exhausted" (optional; as add_step''s if_input, if_not_input, when_unmet and when_exhausted)}]}. Steps may be listed in any order that has no cycle. Returns true if created, false if the flow exists with the same shape; another shape fails with 42710. An invalid shape (unknown key, bad slug or option, duplicate step, unknown dependency, cycle) fails with 22023 naming the problem and creates nothing.';

-- Waiting without a snapshot: a procedure that commits between its looks.
CREATE PROCEDURE pgflow.wait_for_messages(queue_name text, max_poll_seconds integer DEFAULT 5,
                                          poll_interval_ms integer DEFAULT 100)
LANGUAGE c
AS 'MODULE_PATHNAME', 'pgflow_wait_for_messages';
COMMENT ON PROCEDURE pgflow.wait_for_messages(text, integer, integer) IS
'Wait up to max_poll_seconds until the queue (or a flow''s queue, named by its flow slug) has a message to read, holding no snapshot while waiting, so VACUUM goes on; then call pgflow.read or pgflow.poll_for_tasks. CALL it outside a transaction block (it commits between its looks). Wakes at the commit of a send with pgflow preloaded, else looks every poll_interval_ms.';


-- Topics: bindings of queues to patterns, publish and publish_batch.
-- Topic bindings: a message published with a routing key matching `pattern` is sent to the
-- queue (sql/queue/topics.sql). They go with their queue.
CREATE TABLE pgflow.topic_bindings (
    pattern  text NOT NULL,
    queue_id bigint NOT NULL REFERENCES pgflow.queues (queue_id) ON DELETE CASCADE,
    bound_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pattern, queue_id)
);
CREATE INDEX topic_bindings_queue_id ON pgflow.topic_bindings (queue_id);
COMMENT ON TABLE pgflow.topic_bindings IS 'pgflow: which queues a topic pattern routes published messages to.';

SELECT pg_catalog.pg_extension_config_dump('pgflow.topic_bindings', '');

CREATE FUNCTION pgflow."_check_topic"(
	"value" TEXT, /* core::option::Option<&str> */
	"arg" TEXT, /* &str */
	"wildcards" bool /* bool */
) RETURNS void
IMMUTABLE PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'check_topic_sql_wrapper';

CREATE FUNCTION pgflow."_topic_matches"(
	"pattern" TEXT, /* &str */
	"routing_key" TEXT /* &str */
) RETURNS bool
IMMUTABLE STRICT PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'topic_matches_wrapper';

-- 22004 for a NULL message: the rule of send, in src/queue/.
CREATE FUNCTION pgflow._check_message(message jsonb) RETURNS void
LANGUAGE c IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgflow_check_message';

CREATE FUNCTION pgflow.bind_topic(pattern text, queue_name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
BEGIN
    PERFORM pgflow._check_topic(bind_topic.pattern, 'pattern', true);
    PERFORM pgflow._lock_queue_name(bind_topic.queue_name, false);
    q := pgflow._api_queue(bind_topic.queue_name, 'bind_topic');
    INSERT INTO pgflow.topic_bindings (pattern, queue_id) VALUES (bind_topic.pattern, q.queue_id)
        ON CONFLICT DO NOTHING;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION pgflow.bind_topic(text, text) IS
'Bind a queue to a topic pattern: messages published with a matching routing key are sent to it. A pattern is dot-separated words of letters, digits, _ and -; a word may be * (exactly one word) or # (zero or more words). Returns true if bound, false if it already was. The binding goes with the queue when it is dropped.';

CREATE FUNCTION pgflow.unbind_topic(pattern text, queue_name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
BEGIN
    PERFORM pgflow._check_topic(unbind_topic.pattern, 'pattern', true);
    q := pgflow._queue(unbind_topic.queue_name);
    DELETE FROM pgflow.topic_bindings WHERE pattern = unbind_topic.pattern AND queue_id = q.queue_id;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION pgflow.unbind_topic(text, text) IS
'Remove a queue''s binding to a topic pattern; returns false if there was none.';

-- SQL, not PL/pgSQL: the argument and a result column share the name queue_name. A named queue
-- must exist (pgflow._queue's 42704).
CREATE FUNCTION pgflow.list_topic_bindings(queue_name text DEFAULT NULL)
RETURNS TABLE (pattern text, queue_name text, bound_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT b.pattern, q.queue_name, b.bound_at
      FROM pgflow.topic_bindings b JOIN pgflow.queues q ON q.queue_id = b.queue_id
     WHERE $1 IS NULL OR q.queue_id = (pgflow._queue($1)).queue_id
     ORDER BY q.queue_name, b.pattern;
$$;
COMMENT ON FUNCTION pgflow.list_topic_bindings(text) IS
'The topic bindings, of one queue or (NULL) of all, by queue name and pattern.';

-- The queues a routing key reaches, each once, in name order (the order the copies are sent in,
-- so that two publishers take the queues' locks in the same order). PL/pgSQL, which keeps its
-- plan: a SQL function with a SET clause is planned again at every call.
CREATE FUNCTION pgflow._topic_queues(routing_key text) RETURNS SETOF text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
        SELECT DISTINCT q.queue_name
          FROM pgflow.topic_bindings b JOIN pgflow.queues q ON q.queue_id = b.queue_id
         WHERE pgflow._topic_matches(b.pattern, _topic_queues.routing_key)
         ORDER BY 1;
END
$$;

CREATE FUNCTION pgflow.publish(routing_key text, message jsonb, delay integer DEFAULT 0,
                               priority integer DEFAULT 0, headers jsonb DEFAULT NULL,
                               dedup_key text DEFAULT NULL, group_id text DEFAULT NULL)
RETURNS TABLE (queue_name text, msg_id bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    target text;
BEGIN
    PERFORM pgflow._check_topic(publish.routing_key, 'routing_key', false);
    PERFORM pgflow._check_message(publish.message);
    PERFORM pgflow._check_send(publish.delay, publish.priority, publish.headers);
    PERFORM pgflow._check_dedup_key(publish.dedup_key);
    PERFORM pgflow._check_group_id(publish.group_id);
    FOR target IN SELECT pgflow._topic_queues(publish.routing_key) LOOP
        queue_name := target;
        msg_id := pgflow.send(target, publish.message, publish.delay, publish.priority, publish.headers,
                              publish.dedup_key, publish.group_id);
        RETURN NEXT;
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgflow.publish(text, jsonb, integer, integer, jsonb, text, text) IS
'Send a copy of a message to every queue bound to a pattern matching routing_key (dot-separated words, no wildcards), in this transaction: all copies or none. Returns one row per queue reached (queue_name, msg_id), by queue name; none if no binding matches. Queues with notify on announce the copy as for send. dedup_key: per queue, as for send (a queue already holding a live message with that key returns its msg_id). group_id: each copy joins that message group of its queue.';

CREATE FUNCTION pgflow.publish_batch(routing_key text, messages jsonb[], delay integer DEFAULT 0,
                                     priority integer DEFAULT 0, group_id text DEFAULT NULL)
RETURNS TABLE (queue_name text, msg_id bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    target text;
BEGIN
    PERFORM pgflow._check_topic(publish_batch.routing_key, 'routing_key', false);
    PERFORM pgflow._check_send(publish_batch.delay, publish_batch.priority, NULL);
    PERFORM pgflow._check_group_id(publish_batch.group_id);
    FOR target IN SELECT pgflow._topic_queues(publish_batch.routing_key) LOOP
        RETURN QUERY SELECT target, id
                       FROM pgflow.send_batch(target, publish_batch.messages, publish_batch.delay,
                                              publish_batch.priority, NULL, publish_batch.group_id) id;
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgflow.publish_batch(text, jsonb[], integer, integer, text) IS
'publish for several messages: each queue bound to a pattern matching routing_key gets the whole batch through send_batch, in this transaction. Returns (queue_name, msg_id) per message copy, by queue name and then in array order. group_id: each queue''s copies join that message group, in array order.';

-- One home for three rules of the queue layer, in src/queue/: the ids checks, the message
-- check and a send's options (0.1.0 had PL/pgSQL twins of all three).
CREATE OR REPLACE FUNCTION pgflow._check_send(delay_seconds integer, priority integer, headers jsonb) RETURNS void
LANGUAGE c IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgflow_check_send';

CREATE OR REPLACE FUNCTION pgflow._check_ids(msg_ids bigint[], read_cts integer[],
                                  ids_arg text DEFAULT 'msg_ids', cts_arg text DEFAULT 'read_cts')
RETURNS void
LANGUAGE c IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgflow_check_ids';

-- Acking several messages is the Rust rule of the hot path (src/queue/ ack), called by the
-- array forms of delete and archive above; its PL/pgSQL twin is gone.
DROP FUNCTION pgflow._ack(pgflow.queues, bigint[], integer[], boolean);

-- One home for pgflow's advisory locks (src/locks.rs): the lock functions become C functions
-- over it (0.1.0 had them in PL/pgSQL beside the Rust key spaces), and get_queue_stats tries the
-- queue-name lock through it.
-- The queue-name lock: keeps a queue from being dropped under a caller that uses its message
-- sequence (send, send_batch, nack, bind_topic, get_queue_stats): taken shared by them,
-- exclusive by create_queue and drop_queue. Take it in its own statement BEFORE looking the
-- queue up, so the look-up's snapshot already sees a drop that committed meanwhile (42704)
-- instead of a sequence that is gone.
CREATE OR REPLACE FUNCTION pgflow._lock_queue_name(queue_name text, exclusive boolean) RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'pgflow_lock_queue_name';

-- The queue-name lock, shared, only if it can be had at once (get_queue_stats passes over a
-- queue being dropped rather than waiting for it).
CREATE FUNCTION pgflow._try_lock_queue_name(queue_name text) RETURNS boolean
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'pgflow_try_lock_queue_name';

-- The run lock (see the lock order in sql/workflow/runtime.sql): exclusive, waiting for it
-- (returns true) or, with wait = false, only trying (returns whether it was had).
CREATE OR REPLACE FUNCTION pgflow._lock_run(run_id uuid, wait boolean) RETURNS boolean
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'pgflow_lock_run';

CREATE OR REPLACE FUNCTION pgflow.get_queue_stats() RETURNS SETOF pgflow.queue_stats
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    name text;
    q pgflow.queues;
BEGIN
    FOR name IN SELECT x.queue_name FROM pgflow.queues x ORDER BY x.queue_name LOOP
        CONTINUE WHEN NOT pgflow._try_lock_queue_name(name);
        SELECT * INTO q FROM pgflow.queues x WHERE x.queue_name = name;
        IF FOUND THEN
            RETURN NEXT pgflow._stats(q);
        END IF;
    END LOOP;
END
$$;

-- One home for the task-ending outcomes (src/workflow/ task_outcome): the PL/pgSQL checks call
-- it as pgflow._task_outcome instead of a CASE of their own.
CREATE FUNCTION pgflow."_task_outcome"(
	"run_status" TEXT, /* Option < & str > */
	"task_status" TEXT, /* Option < & str > */
	"worker_id" uuid, /* Option < pgrx :: Uuid > */
	"last_worker_id" uuid, /* Option < pgrx :: Uuid > */
	"delivery_gone" bool /* Option < bool > */
) RETURNS TEXT /* Option < & '_ str > */
IMMUTABLE PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'task_outcome_sql_wrapper';

-- One home for the task_failed event's shape (src/workflow/ TaskFailed): fail_task and a last
-- attempt timing out announce it through pgflow._emit_task_failed.
CREATE FUNCTION pgflow."_emit_task_failed"(
	"run_id" uuid, /* pgrx :: Uuid */
	"flow_slug" TEXT, /* & str */
	"step_slug" TEXT, /* & str */
	"task_index" INT, /* i32 */
	"attempt" INT, /* i32 */
	"will_retry" bool, /* bool */
	"reason" TEXT /* & str */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'emit_task_failed_sql_wrapper';

CREATE OR REPLACE FUNCTION pgflow._end_task_check(run_id uuid, step_slug text, task_index integer, worker_id uuid,
                                       OUT r pgflow.runs, OUT t pgflow.step_tasks, OUT outcome text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF _end_task_check.run_id IS NULL THEN
        RAISE EXCEPTION 'run_id must not be null' USING ERRCODE = '22004';
    END IF;
    IF _end_task_check.step_slug IS NULL THEN
        RAISE EXCEPTION 'step_slug must not be null' USING ERRCODE = '22004';
    END IF;
    IF _end_task_check.task_index IS NULL THEN
        RAISE EXCEPTION 'task_index must not be null' USING ERRCODE = '22004';
    END IF;
    PERFORM pgflow._lock_run(_end_task_check.run_id, true);
    SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = _end_task_check.run_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % does not exist', _end_task_check.run_id USING ERRCODE = '42704',
            HINT = 'Pass the run_id returned by pgflow.start_tasks or pgflow.poll_for_tasks.';
    END IF;
    SELECT * INTO t FROM pgflow.step_tasks x
     WHERE x.run_id = _end_task_check.run_id AND x.step_slug = _end_task_check.step_slug
       AND x.task_index = _end_task_check.task_index;
    IF NOT FOUND THEN
        PERFORM pgflow._check_name(_end_task_check.step_slug, 'step_slug');
        IF NOT EXISTS (SELECT 1 FROM pgflow.steps s WHERE s.flow_slug = r.flow_slug AND s.step_slug = _end_task_check.step_slug) THEN
            RAISE EXCEPTION 'flow "%" of run % has no step "%"', r.flow_slug, _end_task_check.run_id,
                _end_task_check.step_slug USING ERRCODE = '42704',
                HINT = 'Pass the step_slug returned with the task.';
        END IF;
        RAISE EXCEPTION 'run % has no task % of step "%"', _end_task_check.run_id, _end_task_check.task_index,
            _end_task_check.step_slug USING ERRCODE = '42704',
            HINT = 'Tasks exist once their step has started; pass the task_index returned with the task.';
    END IF;
    outcome := pgflow._task_outcome(r.status, t.status, _end_task_check.worker_id, t.last_worker_id, false);
END
$$;

CREATE OR REPLACE FUNCTION pgflow._end_task_recheck(run_id uuid, step_slug text, task_index integer, worker_id uuid,
                                         attempt integer) RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    t pgflow.step_tasks;
BEGIN
    SELECT * INTO t FROM pgflow.step_tasks x
     WHERE x.run_id = _end_task_recheck.run_id AND x.step_slug = _end_task_recheck.step_slug
       AND x.task_index = _end_task_recheck.task_index;
    RETURN pgflow._task_outcome(NULL, t.status, NULL, NULL, true);
END
$$;

-- One home for starting a single step (src/workflow/ SingleStep): pgflow._start_step calls it
-- for root and delayed single steps instead of a statement of its own; map steps stay there.
CREATE FUNCTION pgflow._start_single_step(run_id uuid, flow_slug text, queue_id bigint, msg_seq regclass,
                                          step_slug text, step_index integer, start_delay integer,
                                          root boolean) RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'pgflow_start_single_step';

CREATE OR REPLACE FUNCTION pgflow._start_step(r pgflow.runs, q pgflow.queues, st pgflow.steps) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := clock_timestamp();
    visible_at timestamptz := now_ + make_interval(secs => coalesce(st.opt_start_delay, 0));
    arr jsonb;
    n integer;
    dep text;
    inp jsonb;
BEGIN
    IF st.if_input IS NOT NULL OR st.if_not_input IS NOT NULL THEN
        inp := pgflow._step_input(r.run_id, r.flow_slug, st.step_slug);
        IF NOT (coalesce(inp @> st.if_input, true) AND NOT coalesce(inp @> st.if_not_input, false)) THEN
            IF st.when_unmet = 'fail' THEN
                PERFORM pgflow._fail_step_start(r, q, st, format('the condition of step "%s" is not met', st.step_slug));
                RETURN false;
            END IF;
            RETURN pgflow._skip_step(r, q, st, st.when_unmet = 'skip_cascade', 'condition', 'its condition is not met');
        END IF;
    END IF;
    IF st.step_type = 'signal' THEN
        RETURN pgflow._start_signal_step(r, q, st);
    END IF;
    IF st.step_type = 'single' THEN
        PERFORM pgflow._start_single_step(r.run_id, r.flow_slug, q.queue_id, q.msg_seq, st.step_slug,
                                          st.step_index, coalesce(st.opt_start_delay, 0), st.deps_count = 0);
        RETURN true;
    END IF;

    -- A map step: the array it maps over, the run input or its one dependency's output.
    SELECT m.dep, m.arr INTO dep, arr FROM pgflow._map_array(r, st) m;
    IF arr IS NULL AND dep IS NOT NULL
       AND EXISTS (SELECT 1 FROM pgflow.step_states ss
                    WHERE ss.run_id = r.run_id AND ss.step_slug = dep AND ss.status = 'skipped') THEN
        RETURN pgflow._skip_step(r, q, st, false, 'no_input',
                                 format('step "%s", whose output it maps over, was skipped', dep));
    END IF;
    IF jsonb_typeof(arr) IS DISTINCT FROM 'array' THEN
        PERFORM pgflow._fail_step_start(r, q, st, format(
            'map step "%s" needs an array to map over, but %s is a JSON %s',
            st.step_slug, CASE WHEN dep IS NULL THEN 'the run input' ELSE format('the output of step "%s"', dep) END,
            coalesce(jsonb_typeof(arr), 'null')));
        RETURN false;
    END IF;
    n := jsonb_array_length(arr);

    -- A root step's state is created here, a dependent's (created by start_flow) updated: one
    -- write either way (no INSERT ... ON CONFLICT, which would lock the row before updating it).
    IF st.deps_count = 0 THEN
        INSERT INTO pgflow.step_states (flow_slug, run_id, step_slug, status, remaining_deps, remaining_tasks,
                                        initial_tasks, created_at, started_at, completed_at, output)
        VALUES (r.flow_slug, r.run_id, st.step_slug, CASE WHEN n = 0 THEN 'completed' ELSE 'started' END, 0, n, n,
                now_, now_, CASE WHEN n = 0 THEN now_ END, CASE WHEN n = 0 THEN '[]'::jsonb END);
    ELSE
        UPDATE pgflow.step_states
           SET status = CASE WHEN n = 0 THEN 'completed' ELSE 'started' END, remaining_deps = 0,
               remaining_tasks = n, initial_tasks = n, started_at = now_,
               completed_at = CASE WHEN n = 0 THEN now_ END, output = CASE WHEN n = 0 THEN '[]'::jsonb END
         WHERE run_id = r.run_id AND step_slug = st.step_slug;
    END IF;

    IF n = 0 THEN
        RETURN pgflow._step_completed(r.run_id, q.queue_id, st.step_slug);
    END IF;

    -- One message and one task per element, in element order, in two set-based statements
    -- (no batch limit applies: this is not pgflow.send_batch).
    WITH m AS (
        INSERT INTO pgflow.messages (queue_id, msg_id, vt, priority, message)
        SELECT q.queue_id, nextval(q.msg_seq), visible_at, st.step_index,
               jsonb_build_object('run_id', r.run_id, 'step_slug', st.step_slug, 'task_index', e.i - 1,
                                  'input', e.v)
          FROM jsonb_array_elements(arr) WITH ORDINALITY AS e(v, i)
         ORDER BY e.i
        RETURNING msg_id, (message ->> 'task_index')::integer AS task_index
    )
    INSERT INTO pgflow.step_tasks (flow_slug, run_id, step_slug, task_index, message_id, queued_at)
    SELECT r.flow_slug, r.run_id, st.step_slug, m.task_index, m.msg_id, now_ FROM m;
    IF visible_at > now_ THEN
        PERFORM pgflow._due_at(q.queue_id, visible_at);
    END IF;
    RETURN true;
END
$$;

-- The modules moved (src/workflow.rs is now src/workflow/): a comment in this body says so.
CREATE OR REPLACE FUNCTION pgflow._claimed_not_startable(f pgflow.flows, q pgflow.queues, msg_id bigint, read_ct integer,
                                              rid uuid, sslug text, tidx integer)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    st pgflow.steps;
    rstatus text;
    tstatus text;
BEGIN
    -- rid, sslug and tidx: the task the message names, NULL where its body is not a
    -- well-formed task (parsed by the claim statement in src/workflow/)
    IF rid IS NOT NULL AND sslug IS NOT NULL AND tidx IS NOT NULL THEN
        SELECT * INTO st FROM pgflow.steps s WHERE s.flow_slug = f.flow_slug AND s.step_slug = sslug;
    END IF;
    IF st.step_slug IS NULL THEN
        PERFORM pgflow._dead_letter(q, _claimed_not_startable.msg_id, format('not a task of flow "%s"', f.flow_slug));
        RETURN;
    END IF;
    SELECT x.status, t.status INTO rstatus, tstatus
      FROM pgflow.runs x
      LEFT JOIN pgflow.step_tasks t ON t.run_id = x.run_id AND t.step_slug = sslug AND t.task_index = tidx
     WHERE x.run_id = rid;
    IF rstatus IS DISTINCT FROM 'started' OR tstatus IS NULL OR tstatus NOT IN ('queued', 'started') THEN
        -- the run failed or the task is done: nothing to hand out
        DELETE FROM pgflow.messages m WHERE m.queue_id = q.queue_id AND m.msg_id = _claimed_not_startable.msg_id;
    ELSIF _claimed_not_startable.read_ct > coalesce(st.opt_max_attempts, f.opt_max_attempts) THEN
        PERFORM pgflow._task_timed_out(f, q, st, _claimed_not_startable.msg_id, rid, tidx,
                                       _claimed_not_startable.read_ct);
    ELSE
        UPDATE pgflow.messages m SET vt = clock_timestamp()
         WHERE m.queue_id = q.queue_id AND m.msg_id = _claimed_not_startable.msg_id;
    END IF;
END
$$;

-- Monitoring from SQL: alert thresholds per queue, how long the oldest visible message has
-- waited (queue_stats), pgflow.queue_health and pgflow.metrics().
ALTER TABLE pgflow.queues
    ADD COLUMN alert_dlq_depth integer NOT NULL DEFAULT 0,
    ADD COLUMN alert_oldest_age integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT queues_alert_dlq_depth_range CHECK (alert_dlq_depth BETWEEN 0 AND 1000000000),
    ADD CONSTRAINT queues_alert_oldest_age_range CHECK (alert_oldest_age BETWEEN 0 AND 31536000);
ALTER TYPE pgflow.queue_stats ADD ATTRIBUTE oldest_visible_age_sec double precision;
CREATE OR REPLACE FUNCTION pgflow._stats(q pgflow.queues) RETURNS pgflow.queue_stats
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT q.queue_name,
           count(m.msg_id),
           count(m.msg_id) FILTER (WHERE m.vt <= t.now),
           count(m.msg_id) FILTER (WHERE m.vt > t.now AND m.read_ct > 0),
           count(m.msg_id) FILTER (WHERE m.vt > t.now AND m.read_ct = 0),
           (SELECT count(*) FROM pgflow.archive a WHERE a.queue_id = q.queue_id),
           (SELECT count(*) FROM pgflow.dlq d WHERE d.queue_name = q.queue_name),
           extract(epoch FROM t.now - min(m.enqueued_at))::double precision,
           extract(epoch FROM t.now - max(m.enqueued_at))::double precision,
           coalesce(pg_sequence_last_value(q.msg_seq), 0),
           t.now,
           coalesce(extract(epoch FROM t.now - min(m.vt) FILTER (WHERE m.vt <= t.now))::double precision, 0)
      FROM (SELECT clock_timestamp() AS now) t
      LEFT JOIN pgflow.messages m ON m.queue_id = q.queue_id
     GROUP BY t.now;
$$;
COMMENT ON FUNCTION pgflow.get_queue_stats(text) IS
'Statistics of one queue: depth (live messages), visible now, in_flight (leased, or waiting out a retry backoff), delayed (never delivered, not yet due), archived, dead_lettered, age in seconds of the oldest and newest live message, total_sent (msg_ids issued: like pgmq, a rolled-back send counts), the time of the count, and oldest_visible_age_sec: how long the oldest visible message has been waiting to be read (0 if none).';

-- The alert thresholds of pgflow.queue_health: 0 (none) or a positive bound.
CREATE FUNCTION pgflow._check_alerts(alert_dlq_depth integer, alert_oldest_age integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF alert_dlq_depth IS NULL THEN
        RAISE EXCEPTION 'alert_dlq_depth must not be null' USING ERRCODE = '22004';
    ELSIF alert_dlq_depth < 0 OR alert_dlq_depth > 1000000000 THEN
        RAISE EXCEPTION 'alert_dlq_depth must be between 0 and 1000000000, not %', alert_dlq_depth
            USING ERRCODE = '22023', HINT = '0 turns the alert off.';
    END IF;
    IF alert_oldest_age IS NULL THEN
        RAISE EXCEPTION 'alert_oldest_age must not be null' USING ERRCODE = '22004';
    ELSIF alert_oldest_age < 0 OR alert_oldest_age > 31536000 THEN
        RAISE EXCEPTION 'alert_oldest_age must be between 0 and 31536000 seconds, not %', alert_oldest_age
            USING ERRCODE = '22023', HINT = '0 turns the alert off.';
    END IF;
END
$$;

DROP FUNCTION pgflow.alter_queue(text, integer, integer, integer, double precision, boolean);
CREATE FUNCTION pgflow.alter_queue(
    queue_name text,
    max_retries integer DEFAULT NULL,
    retry_delay_ms integer DEFAULT NULL,
    max_retry_delay_ms integer DEFAULT NULL,
    retry_jitter double precision DEFAULT NULL,
    notify boolean DEFAULT NULL,
    alert_dlq_depth integer DEFAULT NULL,
    alert_oldest_age integer DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
BEGIN
    q := pgflow._api_queue(alter_queue.queue_name, 'alter_queue');
    q.max_retries := coalesce(alter_queue.max_retries, q.max_retries);
    q.retry_delay_ms := coalesce(alter_queue.retry_delay_ms, q.retry_delay_ms);
    q.max_retry_delay_ms := coalesce(alter_queue.max_retry_delay_ms, q.max_retry_delay_ms);
    q.retry_jitter := coalesce(alter_queue.retry_jitter, q.retry_jitter);
    q.notify := coalesce(alter_queue.notify, q.notify);
    q.alert_dlq_depth := coalesce(alter_queue.alert_dlq_depth, q.alert_dlq_depth);
    q.alert_oldest_age := coalesce(alter_queue.alert_oldest_age, q.alert_oldest_age);
    PERFORM pgflow._check_queue_options(q.max_retries, q.retry_delay_ms, q.max_retry_delay_ms,
                                        q.retry_jitter, q.notify);
    PERFORM pgflow._check_alerts(q.alert_dlq_depth, q.alert_oldest_age);
    UPDATE pgflow.queues
       SET max_retries = q.max_retries, retry_delay_ms = q.retry_delay_ms,
           max_retry_delay_ms = q.max_retry_delay_ms, retry_jitter = q.retry_jitter, notify = q.notify,
           alert_dlq_depth = q.alert_dlq_depth, alert_oldest_age = q.alert_oldest_age
     WHERE queue_id = q.queue_id;
END
$$;
COMMENT ON FUNCTION pgflow.alter_queue(text, integer, integer, integer, double precision, boolean, integer, integer) IS
'Change options of an existing queue; a NULL argument keeps the current value. Takes effect for messages read or failed from then on. alert_dlq_depth (dead-lettered messages) and alert_oldest_age (seconds the oldest visible message has waited) are the thresholds of pgflow.queue_health: warning at the threshold, critical at twice it; 0 turns an alert off.';

-- The health rule, for one queue's figures and thresholds: a threshold reached is a warning,
-- twice the threshold critical; the worst of a queue's alerts is its status, and reason says
-- which alerts fired (NULL when ok). A threshold of 0 is off. Used by get_queue_health and
-- metrics, each over the one count of get_queue_stats() it made.
CREATE FUNCTION pgflow._health(s pgflow.queue_stats, alert_dlq_depth integer, alert_oldest_age integer,
                               OUT status text, OUT reason text)
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN a.dlq >= 2 OR a.age >= 2 THEN 'critical'
                WHEN a.dlq >= 1 OR a.age >= 1 THEN 'warning'
                ELSE 'ok' END,
           nullif(concat_ws('; ',
               CASE WHEN a.dlq >= 1 THEN format('%s dead-lettered messages, alert at %s', s.dead_lettered, $2) END,
               CASE WHEN a.age >= 1 THEN format('oldest visible message waiting %s s, alert at %s s',
                                                round(s.oldest_visible_age_sec::numeric, 1), $3) END), '')
      FROM (SELECT
               -- how many times its threshold each figure has reached (0, 1, or 2 for twice)
               CASE WHEN $2 = 0 THEN 0 ELSE least(2, floor(s.dead_lettered::double precision / $2)) END AS dlq,
               CASE WHEN $3 = 0 THEN 0 ELSE least(2, floor(s.oldest_visible_age_sec / $3)) END AS age) a;
$$;

CREATE FUNCTION pgflow.get_queue_health()
RETURNS TABLE (queue_name text, status text, reason text, dlq_depth bigint,
               oldest_visible_age_sec double precision, alert_dlq_depth integer, alert_oldest_age integer)
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.queue_name, h.status, h.reason, s.dead_lettered, s.oldest_visible_age_sec,
           q.alert_dlq_depth, q.alert_oldest_age
      FROM pgflow.get_queue_stats() s
      JOIN pgflow.queues q ON q.queue_name = s.queue_name
     CROSS JOIN LATERAL pgflow._health(s, q.alert_dlq_depth, q.alert_oldest_age) h
     ORDER BY s.queue_name;
$$;
COMMENT ON FUNCTION pgflow.get_queue_health() IS
'Health of every queue against its alert thresholds (pgflow.alter_queue alert_dlq_depth, alert_oldest_age): status ok, warning (a threshold reached) or critical (twice a threshold), the reason naming what fired, and the figures compared. The view pgflow.queue_health shows the same.';

CREATE VIEW pgflow.queue_health AS
SELECT * FROM pgflow.get_queue_health();
COMMENT ON VIEW pgflow.queue_health IS
'pgflow: health of every queue against its alert thresholds (see pgflow.get_queue_health).';

-- The metric families, then every sample as a row (family, labels, value); each family with
-- samples is printed as its HELP and TYPE lines followed by them. Labels need no escaping: queue
-- names and flow slugs are ASCII letters, digits and underscores (pgflow._check_name), states
-- and statuses fixed words. A family without samples (no queue, no run) is left out.
CREATE FUNCTION pgflow.metrics() RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH families (ord, name, kind, help) AS (VALUES
        (1, 'pgflow_queue_depth', 'gauge', 'Live messages of a queue, in any state.'),
        (2, 'pgflow_queue_messages', 'gauge',
         'Live messages of a queue by state: visible (can be read now), in_flight (leased, or waiting out a retry backoff), delayed (not yet due).'),
        (3, 'pgflow_queue_dlq_messages', 'gauge',
         'Dead-lettered messages of a queue, kept in pgflow.dlq until retried or purged.'),
        (4, 'pgflow_queue_archived_messages', 'gauge',
         'Archived messages of a queue, kept in pgflow.archive until retention deletes them.'),
        (5, 'pgflow_queue_oldest_visible_age_seconds', 'gauge',
         'How long the oldest visible message of a queue has waited to be read (0: none visible).'),
        (6, 'pgflow_queue_oldest_message_age_seconds', 'gauge',
         'Age of the oldest live message of a queue, in any state (0: none).'),
        (7, 'pgflow_queue_sent_total', 'counter',
         'Messages sent to a queue: the ids its sequence issued (a rolled-back send counts; starts again if the queue is dropped and created again).'),
        (8, 'pgflow_queue_health', 'gauge',
         'Health of a queue against its alert thresholds (pgflow.queue_health): 0 ok, 1 warning, 2 critical.'),
        (9, 'pgflow_flow_runs', 'gauge',
         'Workflow runs by flow and status (runs kept until pgflow.run_retention deletes finished ones).'),
        (10, 'pgflow_flow_tasks', 'gauge', 'Workflow tasks by flow and status.')
    ), stats AS (
        -- one count of every queue, for the figures and for their health
        SELECT s.*, h.status AS health
          FROM pgflow.get_queue_stats() s
          JOIN pgflow.queues q ON q.queue_name = s.queue_name
         CROSS JOIN LATERAL pgflow._health(s, q.alert_dlq_depth, q.alert_oldest_age) h
    ), samples (ord, labels, value) AS (
        SELECT m.* FROM stats s CROSS JOIN LATERAL (VALUES
            (1, format('queue="%s"', s.queue_name), s.depth::numeric),
            (2, format('queue="%s",state="visible"', s.queue_name), s.visible),
            (2, format('queue="%s",state="in_flight"', s.queue_name), s.in_flight),
            (2, format('queue="%s",state="delayed"', s.queue_name), s.delayed),
            (3, format('queue="%s"', s.queue_name), s.dead_lettered),
            (4, format('queue="%s"', s.queue_name), s.archived),
            (5, format('queue="%s"', s.queue_name), round(s.oldest_visible_age_sec::numeric, 3)),
            (6, format('queue="%s"', s.queue_name), round(coalesce(s.oldest_msg_age_sec, 0)::numeric, 3)),
            (7, format('queue="%s"', s.queue_name), s.total_sent)) m
        UNION ALL
        SELECT 8, format('queue="%s"', s.queue_name), CASE s.health WHEN 'ok' THEN 0 WHEN 'warning' THEN 1 ELSE 2 END
          FROM stats s
        UNION ALL
        SELECT 9, format('flow="%s",status="%s"', r.flow_slug, r.status), count(*)
          FROM pgflow.runs r GROUP BY r.flow_slug, r.status
        UNION ALL
        SELECT 10, format('flow="%s",status="%s"', t.flow_slug, t.status), count(*)
          FROM pgflow.step_tasks t GROUP BY t.flow_slug, t.status
    )
    SELECT coalesce(string_agg(format(E'# HELP %s %s\n# TYPE %s %s\n', f.name, f.help, f.name, f.kind) || x.lines,
                               '' ORDER BY f.ord), '')
      FROM families f
      JOIN (SELECT p.ord, string_agg(format(E'%s{%s} %s\n', g.name, p.labels, p.value), '' ORDER BY p.labels) AS lines
              FROM samples p JOIN families g ON g.ord = p.ord GROUP BY p.ord) x ON x.ord = f.ord;
$$;
COMMENT ON FUNCTION pgflow.metrics() IS
'Every queue''s and flow''s figures in the Prometheus text exposition format (version 0.0.4): depth, messages by state, dead-lettered, archived, age of the oldest visible and oldest live message, messages sent, health, and runs and tasks by flow and status. Counted when called (nothing is counted on the send path); serve it from an HTTP exporter or a scrape job that runs SELECT pgflow.metrics().';

-- One home for sending a single message (src/queue/ insert_message): pgflow._send, the insert of
-- the PL/pgSQL paths, is a C function over the insert send uses.
DROP FUNCTION pgflow._send(pgflow.queues, jsonb, timestamptz, integer, jsonb);
CREATE FUNCTION pgflow._send(q pgflow.queues, message jsonb, visible_at timestamptz, priority integer, headers jsonb,
                             dedup_key text DEFAULT NULL, group_id text DEFAULT NULL)
RETURNS bigint
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'pgflow_send_internal';

-- Deduplication: a send's dedup_key (pgflow.messages.dedup_key, unique per queue among live
-- messages). send (both forms), pgflow._send and publish take it as a last argument.
ALTER TABLE pgflow.messages ADD COLUMN dedup_key text;
CREATE FUNCTION pgflow."_check_dedup_key"(
	"dedup_key" TEXT /* Option < & str > */
) RETURNS void
IMMUTABLE PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'check_dedup_key_sql_wrapper';
-- At most one live message per deduplication key and queue. Partial: a send without a key
-- writes no entry, and a read (vt, read_ct) leaves the column alone, so it stays HOT.
CREATE UNIQUE INDEX messages_dedup_key ON pgflow.messages (queue_id, dedup_key) WHERE dedup_key IS NOT NULL;
DROP FUNCTION pgflow.send(text, jsonb, integer, integer, jsonb);
CREATE FUNCTION pgflow.send(queue_name text, message jsonb, delay integer DEFAULT 0,
                            priority integer DEFAULT 0, headers jsonb DEFAULT NULL,
                            dedup_key text DEFAULT NULL, group_id text DEFAULT NULL)
RETURNS bigint
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_send';
COMMENT ON FUNCTION pgflow.send(text, jsonb, integer, integer, jsonb, text, text) IS
'Send a message; returns its msg_id. It becomes readable when the sending transaction commits and delay seconds have passed. Higher priority is delivered first, FIFO by msg_id within a priority. headers: a JSON object or null. dedup_key (1-128 bytes): while a message sent with that key is live in the queue (visible, delayed or leased), a send with the same key sends nothing and returns that message''s msg_id; concurrent sends of one key send one message. group_id (1-128 bytes): messages of one group are delivered in send order, one at a time (a later one waits while an earlier one is live: visible, leased, delayed or waiting out a retry); other groups and ungrouped messages are not held up.';
DROP FUNCTION pgflow.send(text, jsonb, timestamptz, integer, jsonb);
CREATE FUNCTION pgflow.send(queue_name text, message jsonb, delay timestamptz,
                            priority integer DEFAULT 0, headers jsonb DEFAULT NULL,
                            dedup_key text DEFAULT NULL, group_id text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
BEGIN
    IF delay IS NULL THEN
        RAISE EXCEPTION 'delay must not be null' USING ERRCODE = '22004',
            HINT = 'Pass the time at which the message becomes readable.';
    ELSIF NOT isfinite(delay) THEN
        RAISE EXCEPTION 'delay must be a finite time, not %', delay USING ERRCODE = '22023',
            HINT = 'Pass the time at which the message becomes readable.';
    END IF;
    PERFORM pgflow._check_send(0, priority, headers);
    PERFORM pgflow._lock_queue_name(queue_name, false);
    RETURN pgflow._send(pgflow._api_queue(queue_name, 'send'), message, delay, priority, headers, dedup_key,
                        group_id);
END
$$;
COMMENT ON FUNCTION pgflow.send(text, jsonb, timestamptz, integer, jsonb, text, text) IS
'Send a message that becomes readable at the given time (a finite timestamptz; a time in the past means now); returns its msg_id. dedup_key and group_id as for send with a delay in seconds.';

-- Message groups: a send's group_id (pgflow.messages.group_id); the claim delivers a group's
-- messages in order, one at a time. send (both forms), pgflow._send, send_batch (both forms),
-- publish and publish_batch take it as a last argument.
ALTER TABLE pgflow.messages ADD COLUMN group_id text;
-- A group's messages in order, for the claim's test that no earlier message of the group is
-- live. Partial, like the one above.
CREATE INDEX messages_group_order ON pgflow.messages (queue_id, group_id, msg_id) WHERE group_id IS NOT NULL;
CREATE FUNCTION pgflow."_check_group_id"(
	"group_id" TEXT /* Option < & str > */
) RETURNS void
IMMUTABLE PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'check_group_id_sql_wrapper';
DROP FUNCTION pgflow._send_batch(pgflow.queues, jsonb[], timestamptz, integer, jsonb[]);
CREATE FUNCTION pgflow._send_batch(q pgflow.queues, messages jsonb[], visible_at timestamptz,
                                   priority integer, headers jsonb[], group_id text DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    n integer := cardinality(messages);
    bad integer;
BEGIN
    IF messages IS NULL THEN
        RAISE EXCEPTION 'messages must not be null' USING ERRCODE = '22004';
    ELSIF n = 0 THEN
        RAISE EXCEPTION 'messages must not be empty' USING ERRCODE = '22023',
            HINT = 'Send at least one message.';
    ELSIF n > pgflow._max_batch_size() THEN
        RAISE EXCEPTION 'messages holds % messages, more than the batch limit of %', n, pgflow._max_batch_size()
            USING ERRCODE = '54000', HINT = 'Split the batch, or raise pgflow.max_batch_size.';
    ELSIF array_ndims(messages) > 1 THEN
        RAISE EXCEPTION 'messages must be a one-dimensional array' USING ERRCODE = '22023';
    END IF;
    bad := array_position(messages, NULL);
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'messages[%] is null', bad USING ERRCODE = '22004';
    END IF;
    IF headers IS NOT NULL THEN
        IF array_ndims(headers) > 1 THEN
            RAISE EXCEPTION 'headers must be a one-dimensional array' USING ERRCODE = '22023';
        ELSIF cardinality(headers) <> n THEN
            RAISE EXCEPTION 'headers has % elements but messages has %', cardinality(headers), n
                USING ERRCODE = '22023', HINT = 'Give one headers object (or null) per message.';
        END IF;
        SELECT i INTO bad FROM unnest(headers) WITH ORDINALITY AS h(v, i)
         WHERE v IS NOT NULL AND jsonb_typeof(v) <> 'object' LIMIT 1;
        IF bad IS NOT NULL THEN
            RAISE EXCEPTION 'headers[%] must be a JSON object or null', bad USING ERRCODE = '22023';
        END IF;
    END IF;
    IF visible_at > clock_timestamp() THEN
        PERFORM pgflow._due_at(q.queue_id, visible_at);
    END IF;
    RETURN QUERY
    INSERT INTO pgflow.messages (queue_id, msg_id, vt, priority, message, headers, group_id)
    -- headers are matched by position, whatever the arrays' lower bounds ('[0:1]={...}').
    SELECT q.queue_id, nextval(q.msg_seq), visible_at, _send_batch.priority, m.body,
           headers[array_lower(headers, 1) + m.i - 1], _send_batch.group_id
      FROM unnest(messages) WITH ORDINALITY AS m(body, i)
     ORDER BY m.i
    RETURNING msg_id;
END
$$;
DROP FUNCTION pgflow.send_batch(text, jsonb[], integer, integer, jsonb[]);
CREATE FUNCTION pgflow.send_batch(queue_name text, messages jsonb[], delay integer DEFAULT 0,
                                  priority integer DEFAULT 0, headers jsonb[] DEFAULT NULL,
                                  group_id text DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
BEGIN
    PERFORM pgflow._check_send(delay, priority, NULL);
    PERFORM pgflow._check_group_id(group_id);
    PERFORM pgflow._lock_queue_name(queue_name, false);
    RETURN QUERY SELECT pgflow._send_batch(pgflow._api_queue(queue_name, 'send_batch'), messages,
                        clock_timestamp() + make_interval(secs => delay), priority, headers, group_id);
END
$$;
COMMENT ON FUNCTION pgflow.send_batch(text, jsonb[], integer, integer, jsonb[], text) IS
'Send several messages in one statement; returns their msg_ids in array order (ids ascend in that order, so FIFO keeps it). At most pgflow.max_batch_size (default 10000) messages; headers, if given, has one object or null per message. group_id: all of them in that message group, in array order.';
DROP FUNCTION pgflow.send_batch(text, jsonb[], timestamptz, integer, jsonb[]);
CREATE FUNCTION pgflow.send_batch(queue_name text, messages jsonb[], delay timestamptz,
                                  priority integer DEFAULT 0, headers jsonb[] DEFAULT NULL,
                                  group_id text DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
BEGIN
    IF delay IS NULL THEN
        RAISE EXCEPTION 'delay must not be null' USING ERRCODE = '22004';
    ELSIF NOT isfinite(delay) THEN
        RAISE EXCEPTION 'delay must be a finite time, not %', delay USING ERRCODE = '22023';
    END IF;
    PERFORM pgflow._check_send(0, priority, NULL);
    PERFORM pgflow._check_group_id(group_id);
    PERFORM pgflow._lock_queue_name(queue_name, false);
    RETURN QUERY SELECT pgflow._send_batch(pgflow._api_queue(queue_name, 'send_batch'), messages, delay, priority, headers,
                                           group_id);
END
$$;
COMMENT ON FUNCTION pgflow.send_batch(text, jsonb[], timestamptz, integer, jsonb[], text) IS
'Send several messages in one statement, readable from the given time (a finite timestamptz; a time in the past means now); returns their msg_ids in array order. group_id: all of them in that message group, in array order.';

-- Permanent failures: fail_task(..., retry => false) fails the task for good now, whatever
-- attempts are left (task_failed's reason: permanent).
DROP FUNCTION pgflow.fail_task(uuid, text, integer, text, uuid);
CREATE OR REPLACE FUNCTION pgflow.fail_task(run_id uuid, step_slug text, task_index integer, error_message text,
                                 worker_id uuid DEFAULT NULL, retry boolean DEFAULT true)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
SET plan_cache_mode = force_generic_plan SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
#variable_conflict use_column
DECLARE
    r pgflow.runs;
    t pgflow.step_tasks;
    outcome text;
    chk record;
    f pgflow.flows;
    st pgflow.steps;
    q pgflow.queues;
    err text := pgflow._error_text(fail_task.error_message);
    max_att integer;
    delay_s double precision;
    at timestamptz;
    now_ timestamptz;
BEGIN
    IF fail_task.retry IS NULL THEN
        RAISE EXCEPTION 'retry must not be null' USING ERRCODE = '22004',
            HINT = 'Pass false for an error no retry can fix, true (the default) to retry while attempts last.';
    END IF;
    -- the flow lock, shared, before the run lock (the order of complete_task in src/workflow/)
    PERFORM pgflow._lock_flow(x.flow_slug, false) FROM pgflow.runs x WHERE x.run_id = fail_task.run_id;
    SELECT * INTO chk FROM pgflow._end_task_check(fail_task.run_id, fail_task.step_slug, fail_task.task_index,
                                                  fail_task.worker_id);
    r := chk.r;
    t := chk.t;
    outcome := chk.outcome;
    IF outcome IS NOT NULL THEN
        RETURN outcome;
    END IF;
    now_ := clock_timestamp();
    SELECT * INTO f FROM pgflow.flows x WHERE x.flow_slug = r.flow_slug;
    SELECT * INTO st FROM pgflow.steps s WHERE s.flow_slug = r.flow_slug AND s.step_slug = fail_task.step_slug;
    SELECT * INTO q FROM pgflow.queues x WHERE x.queue_name = r.flow_slug;
    max_att := coalesce(st.opt_max_attempts, f.opt_max_attempts);
    IF fail_task.retry AND t.attempts_count < max_att THEN
        -- retry after base_delay * 2^(attempt-1) seconds, at most one day
        delay_s := least(coalesce(st.opt_base_delay, f.opt_base_delay) * power(2::double precision, t.attempts_count - 1),
                         86400);
        at := now_ + make_interval(secs => delay_s);
        UPDATE pgflow.messages m SET vt = at
         WHERE m.queue_id = q.queue_id AND m.msg_id = t.message_id
           AND (fail_task.worker_id IS NULL OR m.read_ct = t.attempts_count);
        IF NOT FOUND AND fail_task.worker_id IS NOT NULL THEN
            RETURN pgflow._end_task_recheck(fail_task.run_id, fail_task.step_slug, fail_task.task_index,
                                            fail_task.worker_id, t.attempts_count);
        END IF;
        UPDATE pgflow.step_tasks x SET status = 'queued', error_message = err
         WHERE x.run_id = fail_task.run_id AND x.step_slug = fail_task.step_slug AND x.task_index = fail_task.task_index;
        IF delay_s > 0 THEN
            PERFORM pgflow._due_at(q.queue_id, at);
        ELSE
            PERFORM pgflow._on_commit_wake(q.queue_id);
        END IF;
        PERFORM pgflow._emit_task_failed(r.run_id, r.flow_slug, st.step_slug, fail_task.task_index, t.attempts_count, true, 'error');
        RETURN 'retrying';
    END IF;
    -- Out of attempts, or a permanent error (retry => false): the task's message (only the
    -- caller's delivery, when it names its worker_id), then what when_exhausted says.
    DELETE FROM pgflow.messages m
     WHERE m.queue_id = q.queue_id AND m.msg_id = t.message_id
       AND (fail_task.worker_id IS NULL OR m.read_ct = t.attempts_count);
    IF NOT FOUND AND fail_task.worker_id IS NOT NULL THEN
        RETURN pgflow._end_task_recheck(fail_task.run_id, fail_task.step_slug, fail_task.task_index,
                                        fail_task.worker_id, t.attempts_count);
    END IF;
    RETURN pgflow._task_exhausted(r, q, st, fail_task.task_index, t.attempts_count, err,
                                  CASE WHEN fail_task.retry THEN 'error' ELSE 'permanent' END);
END
$$;
COMMENT ON FUNCTION pgflow.fail_task(uuid, text, integer, text, uuid, boolean) IS
'Report a failed attempt of a started task. Returns retrying (the task is queued again and becomes claimable after base_delay * 2^(attempt-1) seconds, capped at 86400) or failed (it was the last of max_attempts, or retry => false said no retry can fix it: the task, its step and its run fail, and the run''s other queued tasks are no longer handed out) or step_skipped (the same, for a step whose when_exhausted is skip or skip_cascade: the task fails, its step is skipped, its other tasks are cancelled, and the run goes on); or, changing nothing, the no-op outcomes of complete_task (already_completed, already_failed, not_started, run_failed, run_cancelled, step_skipped, stale). The error is kept on the task, truncated to 2000 characters.';

-- Cancelling runs: pgflow.cancel_run; runs, step states and tasks may be cancelled
-- (runs.cancelled_at); prune_runs takes cancelled runs too; get_run_with_states counts
-- cancelled tasks.
ALTER TABLE pgflow.runs
    ADD COLUMN cancelled_at timestamptz,
    DROP CONSTRAINT runs_status_allowed,
    ADD CONSTRAINT runs_status_allowed CHECK (status IN ('started', 'completed', 'failed', 'cancelled'));
ALTER TABLE pgflow.step_states
    ADD COLUMN skipped_at timestamptz,
    DROP CONSTRAINT step_states_status_allowed,
    ADD CONSTRAINT step_states_status_allowed CHECK (status IN ('created', 'started', 'completed', 'failed', 'cancelled', 'skipped', 'waiting'));
-- Conditions and skips: a step's condition and what an unmet one, or running out of
-- attempts, does; step states may be skipped (step_states.skipped_at).
ALTER TABLE pgflow.steps
    ADD COLUMN if_input jsonb,
    ADD COLUMN if_not_input jsonb,
    ADD COLUMN when_unmet text NOT NULL DEFAULT 'skip',
    ADD COLUMN when_exhausted text NOT NULL DEFAULT 'fail',
    ADD CONSTRAINT steps_when_unmet_allowed CHECK (when_unmet IN ('skip', 'skip_cascade', 'fail')),
    ADD CONSTRAINT steps_when_exhausted_allowed CHECK (when_exhausted IN ('fail', 'skip', 'skip_cascade'));
COMMENT ON TABLE pgflow.steps IS 'pgflow: the steps of each flow, in definition order, with their type, option overrides and condition.';
-- Signal steps: a third step type, whose timeout bounds a wait of up to a year; step states
-- may be waiting; the signals received and the waits under way.
ALTER TABLE pgflow.steps
    DROP CONSTRAINT steps_type_allowed,
    ADD CONSTRAINT steps_type_allowed CHECK (step_type IN ('single', 'map', 'signal')),
    DROP CONSTRAINT steps_map_deps,
    ADD CONSTRAINT steps_map_deps CHECK (step_type <> 'map' OR deps_count <= 1),
    DROP CONSTRAINT steps_timeout_range,
    ADD CONSTRAINT steps_timeout_range CHECK (opt_timeout BETWEEN 1 AND CASE WHEN step_type = 'signal' THEN 31536000 ELSE 86400 END);
-- Signals: the payload pgflow.signal gave a signal step of a run, kept from its arrival (also
-- before the step is ready) and applied when the step is ready (applied_at).
CREATE TABLE pgflow.signals (
    run_id       uuid NOT NULL,
    step_slug    text NOT NULL,
    payload      jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    applied_at   timestamptz,
    PRIMARY KEY (run_id, step_slug)
);
COMMENT ON TABLE pgflow.signals IS 'pgflow: the signal received for each signal step of a run (at most one), and when it was applied.';

-- The signal steps waiting now, one row each from the moment a step starts waiting until its
-- signal, its timeout or the end of its run: what pgflow.waiting_signals shows and what the
-- maintenance pass looks through for timeouts (deadline), without an index on step_states.
CREATE TABLE pgflow.signal_waits (
    run_id         uuid NOT NULL,
    step_slug      text NOT NULL,
    flow_slug      text NOT NULL,
    waiting_since  timestamptz NOT NULL DEFAULT clock_timestamp(),
    deadline       timestamptz,
    PRIMARY KEY (run_id, step_slug)
);
CREATE INDEX signal_waits_deadline ON pgflow.signal_waits (deadline) WHERE deadline IS NOT NULL;
COMMENT ON TABLE pgflow.signal_waits IS 'pgflow: the signal steps waiting for their signal, with the time their timeout ends.';

CREATE VIEW pgflow.waiting_signals AS
    SELECT w.flow_slug, w.run_id, w.step_slug, w.waiting_since, w.deadline
      FROM pgflow.signal_waits w;
COMMENT ON VIEW pgflow.waiting_signals IS 'pgflow: what each run waits for: its signal steps waiting for pgflow.signal, since when, and until when (deadline, NULL: no timeout).';

SELECT pg_catalog.pg_extension_config_dump('pgflow.signals', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.signal_waits', '');
ALTER TABLE pgflow.step_tasks
    DROP CONSTRAINT step_tasks_status_allowed,
    ADD CONSTRAINT step_tasks_status_allowed CHECK (status IN ('queued', 'started', 'completed', 'failed', 'cancelled'));
COMMENT ON TABLE pgflow.runs IS 'pgflow: one row per flow run: status started, completed, failed or cancelled; output {<leaf step>: <its output>} once completed.';
COMMENT ON TABLE pgflow.step_states IS 'pgflow: state of each step of each run: created (waiting for deps), started (tasks queued), completed, failed, cancelled (its run was cancelled before it finished) or skipped (its condition was not met, it ran out of attempts with when_exhausted skip, or a step it depends on was skipped with skip_cascade); a signal step is waiting while it waits for its signal.';
COMMENT ON TABLE pgflow.step_tasks IS 'pgflow: one row per task (one per single step, one per array element of a map step): queued, started, completed, failed or cancelled, with attempts, output and last error.';
CREATE FUNCTION pgflow.cancel_run(run_id uuid, reason text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r pgflow.runs;
    q pgflow.queues;
    why text := pgflow._error_text(coalesce(cancel_run.reason, 'cancelled'));
BEGIN
    IF cancel_run.run_id IS NULL THEN
        RAISE EXCEPTION 'run_id must not be null' USING ERRCODE = '22004';
    END IF;
    r := pgflow._steer_run(cancel_run.run_id, false);
    IF r.status <> 'started' THEN
        RETURN 'already_' || r.status;
    END IF;
    SELECT * INTO q FROM pgflow.queues x WHERE x.queue_name = r.flow_slug;
    PERFORM pgflow._drop_run_messages(r.run_id, q.queue_id);
    UPDATE pgflow.step_tasks t SET status = 'cancelled'
     WHERE t.run_id = r.run_id AND t.status IN ('queued', 'started');
    UPDATE pgflow.step_states s SET status = 'cancelled', error_message = why
     WHERE s.run_id = r.run_id AND s.status IN ('created', 'started', 'waiting');
    DELETE FROM pgflow.signal_waits w WHERE w.run_id = r.run_id;
    UPDATE pgflow.runs x SET status = 'cancelled', cancelled_at = clock_timestamp() WHERE x.run_id = r.run_id;
    PERFORM pgflow._emit(r.flow_slug, jsonb_build_object(
        'event', 'workflow_cancelled', 'run_id', r.run_id, 'flow_slug', r.flow_slug));
    RETURN 'cancelled';
END
$$;
COMMENT ON FUNCTION pgflow.cancel_run(uuid, text) IS
'Cancel a run under way: its queued and started tasks and its unfinished steps become cancelled (the steps keep the reason), its tasks'' messages are removed, and late complete_task or fail_task calls return run_cancelled and change nothing. Returns cancelled; for a run that has finished, changing nothing, already_completed, already_failed or already_cancelled. Unknown run: 42704.';

-- What each retry_run started again: the run's tasks as they were (status, attempts, last
-- error) before they were queued afresh, so a retried run's history stays readable.
CREATE TABLE pgflow.run_retries (
    run_id           uuid NOT NULL,
    retry_no         integer NOT NULL,
    previous_status  text NOT NULL,
    retried_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- [{"step_slug", "task_index", "status", "attempts", "error_message"}, ...]
    tasks            jsonb NOT NULL,
    PRIMARY KEY (run_id, retry_no)
);
COMMENT ON TABLE pgflow.run_retries IS 'pgflow: one row per retry_run of a run: its status before, and the tasks started again with their attempts and last errors.';

SELECT pg_catalog.pg_extension_config_dump('pgflow.run_retries', '');

-- Retry a failed or cancelled run from where it stopped, under the run lock and the run row's
-- lock (so prune_runs, which deletes only finished runs, cannot take it meanwhile). Completed
-- steps and tasks keep their outputs; every other task of a step that had started is queued
-- again with a fresh message (attempts start again from one, visible at once); steps cancelled
-- before they started wait again for their dependencies; a map step that failed before it had
-- tasks (its input was not an array) is started again. What was started again is recorded in
-- pgflow.run_retries first.
CREATE FUNCTION pgflow.retry_run(run_id uuid) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r pgflow.runs;
    q pgflow.queues;
    st record;
    step pgflow.steps;
    arr jsonb;
    n integer;
    now_ timestamptz := clock_timestamp();
BEGIN
    IF retry_run.run_id IS NULL THEN
        RAISE EXCEPTION 'run_id must not be null' USING ERRCODE = '22004';
    END IF;
    r := pgflow._steer_run(retry_run.run_id, true);
    IF r.status NOT IN ('failed', 'cancelled') THEN
        RETURN 'already_' || r.status;
    END IF;
    SELECT * INTO q FROM pgflow.queues x WHERE x.queue_name = r.flow_slug;
    n := coalesce((SELECT max(rr.retry_no) FROM pgflow.run_retries rr WHERE rr.run_id = r.run_id), 0) + 1;
    INSERT INTO pgflow.run_retries (run_id, retry_no, previous_status, retried_at, tasks)
    SELECT r.run_id, n, r.status, now_, coalesce(jsonb_agg(jsonb_build_object(
               'step_slug', t.step_slug, 'task_index', t.task_index, 'status', t.status,
               'attempts', t.attempts_count, 'error_message', t.error_message)
               ORDER BY s.step_index, t.task_index), '[]'::jsonb)
      FROM pgflow.step_tasks t
      JOIN pgflow.step_states ss ON ss.run_id = t.run_id AND ss.step_slug = t.step_slug
      JOIN pgflow.steps s ON s.flow_slug = r.flow_slug AND s.step_slug = t.step_slug
     WHERE t.run_id = r.run_id AND t.status <> 'completed' AND ss.status NOT IN ('completed', 'skipped');
    UPDATE pgflow.runs x SET status = 'started', failed_at = NULL, cancelled_at = NULL WHERE x.run_id = r.run_id;
    r.status := 'started';
    FOR st IN
        SELECT s AS step, ss.status AS state_status, ss.started_at AS state_started_at,
               EXISTS (SELECT 1 FROM pgflow.step_tasks t WHERE t.run_id = r.run_id AND t.step_slug = s.step_slug) AS has_tasks
          FROM pgflow.step_states ss
          JOIN pgflow.steps s ON s.flow_slug = r.flow_slug AND s.step_slug = ss.step_slug
         WHERE ss.run_id = r.run_id AND ss.status NOT IN ('completed', 'skipped')
         ORDER BY s.step_index
    LOOP
        step := st.step;
        IF NOT st.has_tasks AND (st.state_status = 'failed'
                                 OR step.step_type = 'signal' AND st.state_started_at IS NOT NULL) THEN
            -- a map step that failed before it had tasks, or a signal step that was waiting:
            -- start it again (a root step's state is created by the start)
            IF step.deps_count = 0 THEN
                DELETE FROM pgflow.step_states ss WHERE ss.run_id = r.run_id AND ss.step_slug = step.step_slug;
            ELSE
                UPDATE pgflow.step_states ss SET status = 'created', error_message = NULL, failed_at = NULL
                 WHERE ss.run_id = r.run_id AND ss.step_slug = step.step_slug;
            END IF;
            IF NOT pgflow._start_step(r, q, step) THEN
                RETURN 'failed';
            END IF;
        ELSIF st.state_started_at IS NULL THEN
            -- not started (cancelled before it did): it starts when its dependencies complete
            UPDATE pgflow.step_states ss SET status = 'created', error_message = NULL, failed_at = NULL
             WHERE ss.run_id = r.run_id AND ss.step_slug = step.step_slug;
        ELSE
            arr := NULL;
            IF step.step_type = 'map' THEN
                SELECT m.arr INTO arr FROM pgflow._map_array(r, step) m;
            END IF;
            WITH todo AS (
                SELECT t.task_index FROM pgflow.step_tasks t
                 WHERE t.run_id = r.run_id AND t.step_slug = step.step_slug AND t.status <> 'completed'
            ), m AS (
                INSERT INTO pgflow.messages (queue_id, msg_id, vt, priority, message)
                SELECT q.queue_id, nextval(q.msg_seq), now_, step.step_index,
                       jsonb_build_object('run_id', r.run_id, 'step_slug', step.step_slug, 'task_index', todo.task_index)
                       || CASE WHEN step.step_type = 'map' THEN jsonb_build_object('input', arr -> todo.task_index)
                               ELSE '{}'::jsonb END
                  FROM todo ORDER BY todo.task_index
                RETURNING msg_id, (message ->> 'task_index')::integer AS task_index
            )
            UPDATE pgflow.step_tasks t
               SET status = 'queued', message_id = m.msg_id, attempts_count = 0, error_message = NULL,
                   queued_at = now_, started_at = NULL, failed_at = NULL, last_worker_id = NULL
              FROM m
             WHERE t.run_id = r.run_id AND t.step_slug = step.step_slug AND t.task_index = m.task_index;
            UPDATE pgflow.step_states ss
               SET status = 'started', error_message = NULL, failed_at = NULL,
                   remaining_tasks = (SELECT count(*) FROM pgflow.step_tasks t
                                       WHERE t.run_id = r.run_id AND t.step_slug = step.step_slug
                                         AND t.status <> 'completed')
             WHERE ss.run_id = r.run_id AND ss.step_slug = step.step_slug;
        END IF;
    END LOOP;
    PERFORM pgflow._on_commit_wake(q.queue_id);
    PERFORM pgflow._emit(r.flow_slug, jsonb_build_object(
        'event', 'workflow_retried', 'run_id', r.run_id, 'flow_slug', r.flow_slug, 'retry', n));
    RETURN 'retried';
END
$$;
COMMENT ON FUNCTION pgflow.retry_run(uuid) IS
'Carry on a failed or cancelled run from where it stopped, under the same run_id: completed steps and tasks keep their outputs; its failed, cancelled and unfinished tasks are queued again with fresh attempts (visible at once); steps that never started start when their dependencies complete. The tasks started again, with their attempts and last errors, are recorded in pgflow.run_retries (get_run_with_states shows them under "retries"). Returns retried (or failed, when a map step started again fails the run at once: its input is still not an array); for a run under way or completed, changing nothing, already_started or already_completed. Unknown run: 42704.';
COMMENT ON FUNCTION pgflow.complete_task(uuid, text, integer, jsonb, uuid) IS
'Complete a started task with its output (any JSON value, not SQL NULL). Returns the outcome: completed; or, changing nothing: already_completed (the first completion wins), already_failed, not_started (queued, e.g. waiting for a retry), run_failed, run_cancelled, stale (worker_id given and the task was since handed to another worker). When its step''s last task completes, the step completes (a map step with the array of its task outputs), the dependents whose deps are all complete start, and once every step is complete the run completes with output {<leaf step>: <output>, ...}. Unknown run, step or task: 42704.';
CREATE OR REPLACE FUNCTION pgflow.get_run_with_states(run_id uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r pgflow.runs;
BEGIN
    IF get_run_with_states.run_id IS NULL THEN
        RAISE EXCEPTION 'run_id must not be null' USING ERRCODE = '22004';
    END IF;
    SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = get_run_with_states.run_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % does not exist', get_run_with_states.run_id USING ERRCODE = '42704';
    END IF;
    -- the run's fields at the top level, and also under "run" (the layout of the pgflow SQL
    -- project), then "steps"
    RETURN to_jsonb(r) || jsonb_build_object('run', to_jsonb(r), 'steps', coalesce((
        SELECT jsonb_agg(jsonb_build_object(
                   'step_slug', s.step_slug, 'step_type', s.step_type, 'status', ss.status,
                   'remaining_deps', ss.remaining_deps,
                   -- a started map step's state is not counted down task by task: count its tasks
                   'remaining_tasks', CASE WHEN s.step_type = 'map' AND ss.status = 'started'
                                           THEN (SELECT count(*)::integer FROM pgflow.step_tasks t
                                                  WHERE t.run_id = r.run_id AND t.step_slug = s.step_slug
                                                    AND t.status <> 'completed')
                                           ELSE ss.remaining_tasks END,
                   'initial_tasks', ss.initial_tasks, 'error_message', ss.error_message,
                   'created_at', ss.created_at, 'started_at', ss.started_at,
                   'completed_at', ss.completed_at, 'failed_at', ss.failed_at, 'skipped_at', ss.skipped_at,
                   'signal', CASE WHEN s.step_type = 'signal' THEN (
                       SELECT jsonb_build_object('received_at', sg.received_at, 'applied_at', sg.applied_at,
                                                 'deadline', w.deadline)
                         FROM (SELECT 1) one
                         LEFT JOIN pgflow.signals sg ON sg.run_id = r.run_id AND sg.step_slug = s.step_slug
                         LEFT JOIN pgflow.signal_waits w ON w.run_id = r.run_id AND w.step_slug = s.step_slug) END,
                   'tasks', (SELECT jsonb_build_object(
                                 'queued', count(*) FILTER (WHERE t.status = 'queued'),
                                 'started', count(*) FILTER (WHERE t.status = 'started'),
                                 'completed', count(*) FILTER (WHERE t.status = 'completed'),
                                 'failed', count(*) FILTER (WHERE t.status = 'failed'),
                                 'cancelled', count(*) FILTER (WHERE t.status = 'cancelled'),
                                 'attempts', coalesce(sum(t.attempts_count), 0))
                               FROM pgflow.step_tasks t WHERE t.run_id = r.run_id AND t.step_slug = s.step_slug))
                 ORDER BY s.step_index)
          FROM pgflow.steps s
          JOIN pgflow.step_states ss ON ss.run_id = r.run_id AND ss.step_slug = s.step_slug
         WHERE s.flow_slug = r.flow_slug), '[]'::jsonb),
        'retries', coalesce((
        SELECT jsonb_agg(jsonb_build_object('retry', rr.retry_no, 'previous_status', rr.previous_status,
                                            'retried_at', rr.retried_at, 'tasks', rr.tasks)
                         ORDER BY rr.retry_no)
          FROM pgflow.run_retries rr WHERE rr.run_id = r.run_id), '[]'::jsonb));
END
$$;
COMMENT ON FUNCTION pgflow.get_run_with_states(uuid) IS
'A run as one JSON document for psql and dashboards: the run row (status, input, output, times; at the top level and again under "run") and "steps", in definition order, each with its state (status, remaining_deps, remaining_tasks, initial_tasks, error_message, times) and task counts per status ("tasks": {"queued","started","completed","failed","cancelled","attempts"}), and "retries": what each retry_run started again (pgflow.run_retries).';
CREATE OR REPLACE FUNCTION pgflow.prune_runs(older_than interval, flow_slug text DEFAULT NULL, max_rows integer DEFAULT NULL)
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

-- The cron rule (src/schedules.rs).
CREATE FUNCTION pgflow."_cron_next"(
	"cron" TEXT, /* Option < & str > */
	"after" timestamp /* Option < Timestamp > */
) RETURNS timestamp /* Timestamp */
IMMUTABLE PARALLEL SAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'cron_next_wrapper';

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
SELECT pg_catalog.pg_extension_config_dump('pgflow.schedules', '');

-- The maintenance pass fires the schedules that came due.
CREATE OR REPLACE FUNCTION pgflow.run_maintenance() RETURNS jsonb
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

-- Diagrams: a flow, or a run of it, as a Mermaid flowchart (https://mermaid.js.org), for
-- documentation, dashboards and psql (paste the text into any Mermaid renderer). Nodes are
-- named s<step_index>, never by slug (a slug such as "end" is a Mermaid keyword); labels hold
-- slugs, step types and statuses only, never inputs, outputs or error texts.

-- The one place diagrams are drawn: the flow's steps and edges, and when `run` (the document
-- of pgflow.get_run_with_states) is given, each step's status and a map step's task counts.
CREATE FUNCTION pgflow._mermaid(flow_slug text, run jsonb) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lines text[];
    st record;
    state jsonb;
    status text;
    label text;
BEGIN
    lines := ARRAY['---',
                   -- quoted: a YAML value may not hold ': ' bare
                   format('title: "%s"', CASE WHEN run IS NULL THEN 'flow ' || flow_slug
                                              ELSE format('run %s of %s: %s', run->>'run_id', flow_slug, run->>'status') END),
                   '---',
                   'flowchart TD'];
    FOR st IN
        SELECT s.step_slug, s.step_type, s.step_index, s.opt_start_delay,
               s.if_input IS NOT NULL OR s.if_not_input IS NOT NULL AS conditional
          FROM pgflow.steps s WHERE s.flow_slug = _mermaid.flow_slug ORDER BY s.step_index
    LOOP
        label := st.step_slug;
        IF st.step_type <> 'single' THEN
            label := label || '<br/>' || st.step_type;
        END IF;
        IF st.conditional THEN
            label := label || '<br/>if condition';
        END IF;
        IF st.opt_start_delay > 0 THEN
            label := label || format('<br/>starts after %s s', st.opt_start_delay);
        END IF;
        IF run IS NULL THEN
            status := CASE WHEN st.step_type = 'single' THEN 'step' ELSE st.step_type END;
        ELSE
            SELECT e INTO state FROM jsonb_array_elements(run->'steps') e WHERE e->>'step_slug' = st.step_slug;
            status := coalesce(state->>'status', 'created');
            label := label || '<br/>' || status;
            IF st.step_type = 'map' AND state->>'initial_tasks' IS NOT NULL THEN
                label := label || format(': %s/%s tasks done', state->'tasks'->>'completed', state->>'initial_tasks');
            END IF;
            IF (state->'tasks'->>'attempts')::integer > 1 AND st.step_type = 'single' THEN
                label := label || format(', %s attempts', state->'tasks'->>'attempts');
            END IF;
        END IF;
        -- shapes: a map step is a subroutine box, a signal step a flag, a step with a condition
        -- a hexagon
        lines := lines || format('    s%s%s"%s"%s:::%s', st.step_index,
                                 CASE WHEN st.step_type = 'map' THEN '[[' WHEN st.step_type = 'signal' THEN '>'
                                      WHEN st.conditional THEN '{{' ELSE '[' END,
                                 label,
                                 CASE WHEN st.step_type = 'map' THEN ']]' WHEN st.step_type = 'signal' THEN ']'
                                      WHEN st.conditional THEN '}}' ELSE ']' END,
                                 status);
    END LOOP;
    lines := lines || ARRAY(
        SELECT format('    s%s --> s%s', dep.step_index, s.step_index)
          FROM pgflow.deps d
          JOIN pgflow.steps s ON s.flow_slug = d.flow_slug AND s.step_slug = d.step_slug
          JOIN pgflow.steps dep ON dep.flow_slug = d.flow_slug AND dep.step_slug = d.dep_slug
         WHERE d.flow_slug = _mermaid.flow_slug
         ORDER BY s.step_index, d.dep_index);
    lines := lines || ARRAY[
        '    classDef step fill:#f8fafc,stroke:#475569,color:#0f172a',
        '    classDef map fill:#eef2ff,stroke:#4f46e5,color:#1e1b4b,stroke-width:2px',
        '    classDef created fill:#f4f4f5,stroke:#a1a1aa,color:#3f3f46',
        '    classDef started fill:#dbeafe,stroke:#2563eb,color:#1e3a8a',
        '    classDef completed fill:#dcfce7,stroke:#16a34a,color:#14532d',
        '    classDef failed fill:#fee2e2,stroke:#dc2626,color:#7f1d1d',
        '    classDef cancelled fill:#e5e7eb,stroke:#4b5563,color:#374151,stroke-dasharray:4 3',
        '    classDef skipped fill:#fefce8,stroke:#ca8a04,color:#713f12,stroke-dasharray:2 2',
        '    classDef signal fill:#fdf4ff,stroke:#a21caf,color:#4a044e',
        '    classDef waiting fill:#fae8ff,stroke:#a21caf,color:#4a044e,stroke-width:3px'];
    RETURN array_to_string(lines, E'\n') || E'\n';
END
$$;

CREATE FUNCTION pgflow.flow_mermaid(flow_slug text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN pgflow._mermaid((pgflow._flow(flow_mermaid.flow_slug)).flow_slug, NULL);
END
$$;
COMMENT ON FUNCTION pgflow.flow_mermaid(text) IS
'The flow as a Mermaid flowchart (text): one node per step (map steps drawn as subroutines marked "map", signal steps as flags marked "signal", steps with a condition as hexagons marked "if condition", start delays noted), one edge per dependency. Render it with any Mermaid renderer.';

CREATE FUNCTION pgflow.run_mermaid(run_id uuid) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    run jsonb;
BEGIN
    run := pgflow.get_run_with_states(run_mermaid.run_id);
    RETURN pgflow._mermaid(run->>'flow_slug', run);
END
$$;
COMMENT ON FUNCTION pgflow.run_mermaid(uuid) IS
'A run as a Mermaid flowchart (text): its flow''s graph with each step coloured and labelled by its state (created, started, waiting for a signal, completed, failed, cancelled, skipped), map steps with their completed and total task counts, single steps with their attempts when more than one; the title holds the run id and status.';

-- The input a step's task would get, for a step's condition (src/workflow/).
CREATE FUNCTION pgflow."_step_input"(
	"run_id" uuid, /* pgrx :: Uuid */
	"flow_slug" TEXT, /* & str */
	"step_slug" TEXT /* & str */
) RETURNS jsonb /* Option < pgrx :: JsonB > */
STRICT STABLE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'step_input_sql_wrapper';

CREATE FUNCTION pgflow._check_condition(if_input jsonb, if_not_input jsonb, when_unmet text, when_exhausted text,
                                        names text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF jsonb_typeof(if_input) IS DISTINCT FROM 'object' AND if_input IS NOT NULL THEN
        RAISE EXCEPTION '% must be a JSON object, not a JSON %', names[1], jsonb_typeof(if_input)
            USING ERRCODE = '22023',
            HINT = 'A step''s input is an object, {"run": <run input>, "<dep>": <its output>, ...}; the condition is a part it must contain.';
    END IF;
    IF jsonb_typeof(if_not_input) IS DISTINCT FROM 'object' AND if_not_input IS NOT NULL THEN
        RAISE EXCEPTION '% must be a JSON object, not a JSON %', names[2], jsonb_typeof(if_not_input)
            USING ERRCODE = '22023',
            HINT = 'A step''s input is an object, {"run": <run input>, "<dep>": <its output>, ...}; the condition is a part it must not contain.';
    END IF;
    IF when_unmet IS NULL THEN
        RAISE EXCEPTION '% must not be null', names[3] USING ERRCODE = '22004';
    ELSIF when_unmet NOT IN ('skip', 'skip_cascade', 'fail') THEN
        RAISE EXCEPTION '% must be ''skip'', ''skip_cascade'' or ''fail'', not "%"', names[3], left(when_unmet, 64)
            USING ERRCODE = '22023';
    END IF;
    IF when_exhausted IS NULL THEN
        RAISE EXCEPTION '% must not be null', names[4] USING ERRCODE = '22004';
    ELSIF when_exhausted NOT IN ('fail', 'skip', 'skip_cascade') THEN
        RAISE EXCEPTION '% must be ''fail'', ''skip'' or ''skip_cascade'', not "%"', names[4], left(when_exhausted, 64)
            USING ERRCODE = '22023';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION pgflow.get_flow_shape(flow_slug text) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    f pgflow.flows;
BEGIN
    f := pgflow._flow(get_flow_shape.flow_slug);
    RETURN jsonb_build_object(
        'max_attempts', f.opt_max_attempts,
        'base_delay', f.opt_base_delay,
        'timeout', f.opt_timeout,
        'steps', coalesce((
            SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                       'slug', s.step_slug,
                       'type', s.step_type,
                       'max_attempts', s.opt_max_attempts,
                       'base_delay', s.opt_base_delay,
                       'timeout', s.opt_timeout,
                       'start_delay', s.opt_start_delay,
                       'if', s.if_input,
                       'if_not', s.if_not_input,
                       'when_unmet', nullif(s.when_unmet, 'skip'),
                       'when_exhausted', nullif(s.when_exhausted, 'fail')))
                   || jsonb_build_object('deps', coalesce((
                       SELECT jsonb_agg(d.dep_slug ORDER BY d.dep_index) FROM pgflow.deps d
                        WHERE d.flow_slug = s.flow_slug AND d.step_slug = s.step_slug), '[]'::jsonb))
                   ORDER BY s.step_index)
              FROM pgflow.steps s WHERE s.flow_slug = f.flow_slug), '[]'::jsonb));
END
$$;
COMMENT ON FUNCTION pgflow.get_flow_shape(text) IS
'The whole definition of a flow as one JSON document: {"max_attempts","base_delay","timeout","steps":[{"slug","type","deps":[...], and "max_attempts","base_delay","timeout","start_delay" where the step overrides the flow, and "if","if_not","when_unmet","when_exhausted" where the step has a condition or does not take the defaults}, ...]}, steps in definition order. pgflow.create_flow_from_shape accepts it back unchanged.';

CREATE OR REPLACE FUNCTION pgflow._canonical_shape(shape jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k text;
    st jsonb;
    i integer := 0;
    slugs text[] := '{}';
    steps jsonb[] := '{}';
    deps text[];
    d jsonb;
    t text;
    placed text[] := '{}';
    out_steps jsonb := '[]';
    progress boolean;
    n integer;
    where_ text;
BEGIN
    IF shape IS NULL THEN
        RAISE EXCEPTION 'shape must not be null' USING ERRCODE = '22004';
    ELSIF jsonb_typeof(shape) <> 'object' THEN
        RAISE EXCEPTION 'invalid flow shape: it must be a JSON object, not a JSON %', jsonb_typeof(shape)
            USING ERRCODE = '22023', HINT = 'See pgflow.get_flow_shape for the form.';
    END IF;
    FOR k IN SELECT jsonb_object_keys(shape) LOOP
        IF k NOT IN ('max_attempts', 'base_delay', 'timeout', 'steps') THEN
            RAISE EXCEPTION 'invalid flow shape: unknown key "%"', left(k, 64) USING ERRCODE = '22023',
                HINT = 'A shape has the keys max_attempts, base_delay, timeout and steps.';
        END IF;
    END LOOP;
    IF jsonb_typeof(shape -> 'steps') IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'invalid flow shape: steps must be an array' USING ERRCODE = '22023';
    END IF;
    FOR st IN SELECT value FROM jsonb_array_elements(shape -> 'steps') LOOP
        where_ := format('steps[%s].', i);
        IF jsonb_typeof(st) <> 'object' THEN
            RAISE EXCEPTION 'invalid flow shape: steps[%] must be an object', i USING ERRCODE = '22023';
        END IF;
        FOR k IN SELECT jsonb_object_keys(st) LOOP
            IF k NOT IN ('slug', 'type', 'deps', 'max_attempts', 'base_delay', 'timeout', 'start_delay',
                         'if', 'if_not', 'when_unmet', 'when_exhausted') THEN
                RAISE EXCEPTION 'invalid flow shape: unknown key "%" in steps[%]', left(k, 64), i
                    USING ERRCODE = '22023',
                    HINT = 'A step has the keys slug, type, deps, max_attempts, base_delay, timeout, start_delay, if, if_not, when_unmet and when_exhausted.';
            END IF;
        END LOOP;
        IF jsonb_typeof(st -> 'slug') IS DISTINCT FROM 'string' THEN
            RAISE EXCEPTION 'invalid flow shape: steps[%].slug must be a string', i USING ERRCODE = '22023';
        END IF;
        PERFORM pgflow._check_name(st ->> 'slug', format('steps[%s].slug', i));
        IF st ->> 'slug' = 'run' THEN
            RAISE EXCEPTION 'invalid flow shape: step slug "run" is reserved' USING ERRCODE = '22023',
                HINT = 'A task''s input holds the run input under the key "run".';
        END IF;
        IF st ->> 'slug' = ANY (slugs) THEN
            RAISE EXCEPTION 'invalid flow shape: step "%" is defined twice', st ->> 'slug' USING ERRCODE = '22023';
        END IF;
        t := coalesce(st ->> 'type', 'single');
        IF jsonb_typeof(st -> 'type') NOT IN ('string', 'null') OR t NOT IN ('single', 'map', 'signal') THEN
            RAISE EXCEPTION 'invalid flow shape: steps[%].type must be "single", "map" or "signal"', i USING ERRCODE = '22023';
        END IF;
        IF st -> 'deps' IS NULL OR st -> 'deps' = 'null'::jsonb THEN
            deps := '{}';
        ELSIF jsonb_typeof(st -> 'deps') <> 'array' THEN
            RAISE EXCEPTION 'invalid flow shape: steps[%].deps must be an array of step slugs', i USING ERRCODE = '22023';
        ELSE
            deps := '{}';
            FOR d IN SELECT value FROM jsonb_array_elements(st -> 'deps') LOOP
                IF jsonb_typeof(d) <> 'string' THEN
                    RAISE EXCEPTION 'invalid flow shape: steps[%].deps must be an array of step slugs', i
                        USING ERRCODE = '22023';
                END IF;
                PERFORM pgflow._check_name(d #>> '{}', format('steps[%s].deps', i));
                IF d #>> '{}' = ANY (deps) THEN
                    RAISE EXCEPTION 'invalid flow shape: step "%" names dependency "%" twice', st ->> 'slug', d #>> '{}'
                        USING ERRCODE = '22023';
                END IF;
                deps := deps || (d #>> '{}');
            END LOOP;
        END IF;
        IF t = 'map' AND cardinality(deps) > 1 THEN
            RAISE EXCEPTION 'invalid flow shape: map step "%" has % dependencies; a map step has at most one',
                st ->> 'slug', cardinality(deps) USING ERRCODE = '22023';
        END IF;
        PERFORM pgflow._check_option(where_ || 'max_attempts', pgflow._shape_int(st, 'max_attempts', where_, true), 1, 100, true);
        PERFORM pgflow._check_option(where_ || 'base_delay', pgflow._shape_int(st, 'base_delay', where_, true), 0, 86400, true);
        PERFORM pgflow._check_option(where_ || 'timeout', pgflow._shape_int(st, 'timeout', where_, true), 1,
                                     CASE WHEN t = 'signal' THEN 31536000 ELSE 86400 END, true);
        PERFORM pgflow._check_option(where_ || 'start_delay', pgflow._shape_int(st, 'start_delay', where_, true), 0, 31536000, true);
        IF jsonb_typeof(st -> 'when_unmet') NOT IN ('string', 'null') OR jsonb_typeof(st -> 'when_exhausted') NOT IN ('string', 'null') THEN
            RAISE EXCEPTION 'invalid flow shape: %when_unmet and %when_exhausted must be strings', where_, where_
                USING ERRCODE = '22023';
        END IF;
        PERFORM pgflow._check_condition(nullif(st -> 'if', 'null'::jsonb), nullif(st -> 'if_not', 'null'::jsonb),
                                        coalesce(st ->> 'when_unmet', 'skip'), coalesce(st ->> 'when_exhausted', 'fail'),
                                        ARRAY['invalid flow shape: ' || where_ || 'if', 'invalid flow shape: ' || where_ || 'if_not',
                                              'invalid flow shape: ' || where_ || 'when_unmet',
                                              'invalid flow shape: ' || where_ || 'when_exhausted']);
        slugs := slugs || (st ->> 'slug');
        steps := steps || (jsonb_strip_nulls(jsonb_build_object(
            'slug', st ->> 'slug', 'type', t,
            'max_attempts', pgflow._shape_int(st, 'max_attempts', where_, true),
            'base_delay', pgflow._shape_int(st, 'base_delay', where_, true),
            'timeout', pgflow._shape_int(st, 'timeout', where_, true),
            'start_delay', pgflow._shape_int(st, 'start_delay', where_, true),
            'if', nullif(st -> 'if', 'null'::jsonb),
            'if_not', nullif(st -> 'if_not', 'null'::jsonb),
            'when_unmet', nullif(st ->> 'when_unmet', 'skip'),
            'when_exhausted', nullif(st ->> 'when_exhausted', 'fail')))
            || jsonb_build_object('deps', to_jsonb(deps)));
        i := i + 1;
    END LOOP;
    -- every dependency must be a step of the shape
    FOR i IN 1 .. cardinality(steps) LOOP
        FOR d IN SELECT value FROM jsonb_array_elements(steps[i] -> 'deps') LOOP
            IF NOT (d #>> '{}' = ANY (slugs)) THEN
                RAISE EXCEPTION 'invalid flow shape: dependency "%" of step "%" is not a step of the shape',
                    d #>> '{}', slugs[i] USING ERRCODE = '22023';
            END IF;
            IF d #>> '{}' = slugs[i] THEN
                RAISE EXCEPTION 'invalid flow shape: step "%" depends on itself', slugs[i] USING ERRCODE = '22023';
            END IF;
        END LOOP;
    END LOOP;
    -- order: repeatedly place the first step (in input order) whose deps are all placed
    n := cardinality(steps);
    WHILE cardinality(placed) < n LOOP
        progress := false;
        FOR i IN 1 .. n LOOP
            IF NOT (slugs[i] = ANY (placed))
               AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements_text(steps[i] -> 'deps') x(v) WHERE NOT (x.v = ANY (placed))) THEN
                placed := placed || slugs[i];
                out_steps := out_steps || jsonb_build_array(steps[i]);
                progress := true;
                EXIT;
            END IF;
        END LOOP;
        IF NOT progress THEN
            RAISE EXCEPTION 'invalid flow shape: steps % form a dependency cycle',
                left(array_to_string(ARRAY(SELECT x FROM unnest(slugs) x WHERE NOT (x = ANY (placed))), ', '), 400)
                USING ERRCODE = '22023', HINT = 'A flow is a DAG: no step may depend, directly or not, on itself.';
        END IF;
    END LOOP;
    RETURN jsonb_build_object(
        'max_attempts', coalesce(pgflow._shape_int(shape, 'max_attempts', '', true), 3),
        'base_delay', coalesce(pgflow._shape_int(shape, 'base_delay', '', true), 1),
        'timeout', coalesce(pgflow._shape_int(shape, 'timeout', '', true), 60),
        'steps', out_steps);
END
$$;

CREATE FUNCTION pgflow._fail_step_start(r pgflow.runs, q pgflow.queues, st pgflow.steps, err text) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := clock_timestamp();
BEGIN
    PERFORM pgflow._drop_run_messages(r.run_id, q.queue_id);
    INSERT INTO pgflow.step_states (flow_slug, run_id, step_slug, status, remaining_deps, failed_at, error_message)
    VALUES (r.flow_slug, r.run_id, st.step_slug, 'failed', 0, now_, err)
    ON CONFLICT (run_id, step_slug) DO UPDATE
       SET status = 'failed', remaining_deps = 0, failed_at = now_, error_message = err;
    PERFORM pgflow._fail_run(r, q.queue_id, st.step_slug, err);
END
$$;

CREATE FUNCTION pgflow._skip_step(r pgflow.runs, q pgflow.queues, st pgflow.steps, cascade boolean,
                                  reason text, why text) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := clock_timestamp();
    s text;
BEGIN
    INSERT INTO pgflow.step_states (flow_slug, run_id, step_slug, status, remaining_deps, skipped_at, error_message)
    VALUES (r.flow_slug, r.run_id, st.step_slug, 'skipped', 0, now_, why)
    ON CONFLICT (run_id, step_slug) DO UPDATE
       SET status = 'skipped', remaining_deps = 0, skipped_at = now_, error_message = why;
    PERFORM pgflow._emit(r.flow_slug, jsonb_build_object(
        'event', 'step_skipped', 'run_id', r.run_id, 'flow_slug', r.flow_slug, 'step_slug', st.step_slug,
        'reason', reason));
    IF cascade THEN
        FOR s IN
            WITH RECURSIVE after_it AS (
                SELECT d.step_slug FROM pgflow.deps d WHERE d.flow_slug = r.flow_slug AND d.dep_slug = st.step_slug
                UNION
                SELECT d.step_slug FROM pgflow.deps d JOIN after_it a ON d.dep_slug = a.step_slug
                 WHERE d.flow_slug = r.flow_slug
            )
            UPDATE pgflow.step_states ss
               SET status = 'skipped', remaining_deps = 0, skipped_at = now_,
                   error_message = format('skipped with step "%s"', st.step_slug)
              FROM after_it
             WHERE ss.run_id = r.run_id AND ss.step_slug = after_it.step_slug AND ss.status = 'created'
            RETURNING ss.step_slug
        LOOP
            PERFORM pgflow._emit(r.flow_slug, jsonb_build_object(
                'event', 'step_skipped', 'run_id', r.run_id, 'flow_slug', r.flow_slug, 'step_slug', s,
                'reason', 'cascade'));
        END LOOP;
    END IF;
    RETURN pgflow._step_completed(r.run_id, q.queue_id, st.step_slug);
END
$$;

CREATE FUNCTION pgflow._task_exhausted(r pgflow.runs, q pgflow.queues, st pgflow.steps, task_index integer,
                                       attempts integer, err text, reason text) RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := clock_timestamp();
BEGIN
    IF task_index IS NOT NULL THEN
        UPDATE pgflow.step_tasks t SET status = 'failed', error_message = err, failed_at = now_, attempts_count = attempts
         WHERE t.run_id = r.run_id AND t.step_slug = st.step_slug AND t.task_index = _task_exhausted.task_index;
        PERFORM pgflow._emit_task_failed(r.run_id, r.flow_slug, st.step_slug, task_index, attempts, false, reason);
    END IF;
    IF st.when_exhausted = 'fail' THEN
        PERFORM pgflow._drop_run_messages(r.run_id, q.queue_id);
        UPDATE pgflow.step_states s SET status = 'failed', failed_at = now_, error_message = err
         WHERE s.run_id = r.run_id AND s.step_slug = st.step_slug;
        PERFORM pgflow._fail_run(r, q.queue_id, st.step_slug, err);
        RETURN 'failed';
    END IF;
    -- the step's other tasks (a map step's): their messages, then the tasks
    PERFORM pgflow._drop_run_messages(r.run_id, q.queue_id, st.step_slug);
    UPDATE pgflow.step_tasks t SET status = 'cancelled'
     WHERE t.run_id = r.run_id AND t.step_slug = st.step_slug AND t.status IN ('queued', 'started');
    PERFORM pgflow._skip_step(r, q, st, st.when_exhausted = 'skip_cascade', 'exhausted', err);
    RETURN 'step_skipped';
END
$$;

CREATE OR REPLACE FUNCTION pgflow._check_retention(older_than interval, max_rows integer) RETURNS void
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

CREATE OR REPLACE FUNCTION pgflow._step_output(run_id uuid, step_slug text, step_type text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    o jsonb;
BEGIN
    IF step_type <> 'single' THEN
        SELECT s.output INTO o FROM pgflow.step_states s
         WHERE s.run_id = _step_output.run_id AND s.step_slug = _step_output.step_slug;
    ELSE
        SELECT t.output INTO o FROM pgflow.step_tasks t
         WHERE t.run_id = _step_output.run_id AND t.step_slug = _step_output.step_slug AND t.task_index = 0;
    END IF;
    RETURN o;
END
$$;

CREATE FUNCTION pgflow._start_signal_step(r pgflow.runs, q pgflow.queues, st pgflow.steps) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := clock_timestamp();
    payload jsonb;
BEGIN
    INSERT INTO pgflow.step_states (flow_slug, run_id, step_slug, status, remaining_deps, remaining_tasks,
                                    initial_tasks, created_at, started_at)
    VALUES (r.flow_slug, r.run_id, st.step_slug, 'waiting', 0, 0, 0, now_, now_)
    ON CONFLICT (run_id, step_slug) DO UPDATE
       SET status = 'waiting', remaining_deps = 0, remaining_tasks = 0, initial_tasks = 0, started_at = now_,
           failed_at = NULL, error_message = NULL;
    SELECT s.payload INTO payload FROM pgflow.signals s WHERE s.run_id = r.run_id AND s.step_slug = st.step_slug;
    IF FOUND THEN
        RETURN pgflow._apply_signal(r, q, st, payload);
    END IF;
    INSERT INTO pgflow.signal_waits (run_id, step_slug, flow_slug, waiting_since, deadline)
    VALUES (r.run_id, st.step_slug, r.flow_slug, now_,
            now_ + make_interval(secs => st.opt_timeout))
    ON CONFLICT (run_id, step_slug) DO UPDATE SET waiting_since = excluded.waiting_since, deadline = excluded.deadline;
    PERFORM pgflow._emit(r.flow_slug, jsonb_build_object(
        'event', 'step_waiting', 'run_id', r.run_id, 'flow_slug', r.flow_slug, 'step_slug', st.step_slug));
    RETURN true;
END
$$;

CREATE FUNCTION pgflow._apply_signal(r pgflow.runs, q pgflow.queues, st pgflow.steps, payload jsonb) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    now_ timestamptz := clock_timestamp();
BEGIN
    UPDATE pgflow.step_states ss SET status = 'completed', output = payload, completed_at = now_
     WHERE ss.run_id = r.run_id AND ss.step_slug = st.step_slug;
    UPDATE pgflow.signals s SET applied_at = now_ WHERE s.run_id = r.run_id AND s.step_slug = st.step_slug;
    DELETE FROM pgflow.signal_waits w WHERE w.run_id = r.run_id AND w.step_slug = st.step_slug;
    PERFORM pgflow._emit(r.flow_slug, jsonb_build_object(
        'event', 'step_signalled', 'run_id', r.run_id, 'flow_slug', r.flow_slug, 'step_slug', st.step_slug));
    RETURN pgflow._step_completed(r.run_id, q.queue_id, st.step_slug);
END
$$;

CREATE FUNCTION pgflow.signal(run_id uuid, step_slug text, payload jsonb) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r pgflow.runs;
    q pgflow.queues;
    st pgflow.steps;
    state text;
BEGIN
    IF signal.run_id IS NULL THEN
        RAISE EXCEPTION 'run_id must not be null' USING ERRCODE = '22004';
    ELSIF signal.step_slug IS NULL THEN
        RAISE EXCEPTION 'step_slug must not be null' USING ERRCODE = '22004';
    ELSIF signal.payload IS NULL THEN
        RAISE EXCEPTION 'payload must not be null' USING ERRCODE = '22004',
            HINT = 'Pass JSON null (''null''::jsonb) for a signal without a payload.';
    END IF;
    r := pgflow._steer_run(signal.run_id, false);
    SELECT * INTO st FROM pgflow.steps s WHERE s.flow_slug = r.flow_slug AND s.step_slug = signal.step_slug;
    IF NOT FOUND THEN
        PERFORM pgflow._check_name(signal.step_slug, 'step_slug');
        RAISE EXCEPTION 'flow "%" of run % has no step "%"', r.flow_slug, signal.run_id, signal.step_slug
            USING ERRCODE = '42704';
    ELSIF st.step_type <> 'signal' THEN
        RAISE EXCEPTION 'step_slug "%" names a % step of flow "%", not a signal step', signal.step_slug,
            st.step_type, r.flow_slug USING ERRCODE = '22023',
            HINT = 'Signal the steps added with step_type => ''signal''; a worker completes the others with complete_task.';
    END IF;
    IF r.status <> 'started' THEN
        RETURN 'run_' || r.status;
    END IF;
    IF EXISTS (SELECT 1 FROM pgflow.signals s WHERE s.run_id = r.run_id AND s.step_slug = st.step_slug) THEN
        RETURN 'already_signalled';
    END IF;
    SELECT ss.status INTO state FROM pgflow.step_states ss WHERE ss.run_id = r.run_id AND ss.step_slug = st.step_slug;
    IF state IN ('skipped', 'failed', 'cancelled', 'completed') THEN
        RETURN 'step_' || state;
    END IF;
    INSERT INTO pgflow.signals (run_id, step_slug, payload) VALUES (r.run_id, st.step_slug, signal.payload);
    IF state = 'waiting' THEN
        SELECT * INTO q FROM pgflow.queues x WHERE x.queue_name = r.flow_slug;
        PERFORM pgflow._apply_signal(r, q, st, signal.payload);
        RETURN 'signalled';
    END IF;
    RETURN 'stored';
END
$$;
COMMENT ON FUNCTION pgflow.signal(uuid, text, jsonb) IS
'Signal a signal step of a run (an approval, a webhook, a person''s decision): a waiting step completes with payload (any JSON value, not SQL NULL) as its output, and the steps after it go on. Returns signalled; stored (the step is not ready yet: it completes with this payload when it becomes ready); or, changing nothing, already_signalled (one signal per step), run_completed, run_failed, run_cancelled, step_skipped. Unknown run or step: 42704; a step that is not a signal step: 22023.';

CREATE FUNCTION pgflow._expire_signal_waits() RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w record;
    r pgflow.runs;
    q pgflow.queues;
    st pgflow.steps;
    n integer := 0;
BEGIN
    FOR w IN SELECT * FROM pgflow.signal_waits x WHERE x.deadline <= clock_timestamp() ORDER BY x.deadline LIMIT 1000 LOOP
        PERFORM pgflow._lock_flow(w.flow_slug, false);
        CONTINUE WHEN NOT pgflow._lock_run(w.run_id, false);
        -- still waiting, now that the run is ours
        DELETE FROM pgflow.signal_waits x
         WHERE x.run_id = w.run_id AND x.step_slug = w.step_slug AND x.deadline <= clock_timestamp();
        CONTINUE WHEN NOT FOUND;
        SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = w.run_id;
        SELECT * INTO q FROM pgflow.queues x WHERE x.queue_name = r.flow_slug;
        SELECT * INTO st FROM pgflow.steps x WHERE x.flow_slug = r.flow_slug AND x.step_slug = w.step_slug;
        PERFORM pgflow._task_exhausted(r, q, st, NULL, NULL,
                                       format('no signal within its timeout of %s s', st.opt_timeout), 'timeout');
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

DROP FUNCTION pgflow._drop_run_messages(uuid, bigint);
CREATE FUNCTION pgflow._drop_run_messages(run_id uuid, queue_id bigint, step_slug text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    ids bigint[];
BEGIN
    ids := ARRAY(SELECT t.message_id FROM pgflow.step_tasks t
                  WHERE t.run_id = _drop_run_messages.run_id AND t.status IN ('queued', 'started')
                    AND (_drop_run_messages.step_slug IS NULL OR t.step_slug = _drop_run_messages.step_slug)
                  ORDER BY t.message_id);
    IF cardinality(ids) > 0 THEN
        PERFORM 1 FROM pgflow.messages m
         WHERE m.queue_id = _drop_run_messages.queue_id AND m.msg_id = ANY (ids) ORDER BY m.msg_id FOR UPDATE;
        DELETE FROM pgflow.messages m WHERE m.queue_id = _drop_run_messages.queue_id AND m.msg_id = ANY (ids);
    END IF;
END
$$;

CREATE FUNCTION pgflow._map_array(r pgflow.runs, st pgflow.steps, OUT dep text, OUT arr jsonb)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    dep_type text;
BEGIN
    IF st.deps_count = 0 THEN
        arr := r.input;
        RETURN;
    END IF;
    SELECT d.dep_slug, s.step_type INTO dep, dep_type
      FROM pgflow.deps d JOIN pgflow.steps s ON s.flow_slug = d.flow_slug AND s.step_slug = d.dep_slug
     WHERE d.flow_slug = st.flow_slug AND d.step_slug = st.step_slug;
    arr := pgflow._step_output(r.run_id, dep, dep_type);
END
$$;

CREATE FUNCTION pgflow._steer_run(run_id uuid, lock_row boolean) RETURNS pgflow.runs
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r pgflow.runs;
BEGIN
    PERFORM pgflow._lock_flow(x.flow_slug, false) FROM pgflow.runs x WHERE x.run_id = _steer_run.run_id;
    PERFORM pgflow._lock_run(_steer_run.run_id, true);
    IF lock_row THEN
        SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = _steer_run.run_id FOR UPDATE;
    ELSE
        SELECT * INTO r FROM pgflow.runs x WHERE x.run_id = _steer_run.run_id;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % does not exist', _steer_run.run_id USING ERRCODE = '42704',
            HINT = 'Pass the run_id returned by pgflow.start_flow.';
    END IF;
    RETURN r;
END
$$;

CREATE FUNCTION pgflow.complete_and_poll(run_id uuid, step_slug text, task_index integer, output jsonb,
                                         vt integer DEFAULT 30, qty integer DEFAULT 1, worker_id uuid DEFAULT NULL)
RETURNS SETOF pgflow.step_task_record
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_complete_and_poll';
COMMENT ON FUNCTION pgflow.complete_and_poll(uuid, text, integer, jsonb, integer, integer, uuid) IS
'A worker''s cycle in one transaction, one commit per task: complete a task as pgflow.complete_task does (same arguments, same rules; its outcome is not returned), then claim up to qty tasks of the run''s flow as pgflow.poll_for_tasks does, without waiting: none visible, no rows (then wait in poll_for_tasks). A task started by this completion (the next step of the same run) can be among them. vt applies only to a stray message that is not a task; worker_id is checked against the completed task and recorded on the claimed ones.';

-- Privileges: internal helpers are callable by no role. 0.1.0 granted EXECUTE on every
-- function, internal helpers included, to pgflow_admin; from 0.2.0 one function holds the rule
-- and every upgrade script ends by applying it.
-- Which role may call which function: one rule, applied by CREATE EXTENSION here and again at
-- the end of every upgrade script (after it created or replaced functions), so that an
-- upgraded database grants exactly what a fresh install does. Internal helpers (names starting
-- with an underscore) are callable by no role: only through the public functions, which run
-- as the extension's owner.
CREATE FUNCTION pgflow._apply_grants() RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    f record;
    roles text[];
BEGIN
    REVOKE ALL ON ALL ROUTINES IN SCHEMA pgflow FROM PUBLIC;
    GRANT USAGE ON SCHEMA pgflow TO pgflow_producer, pgflow_consumer, pgflow_admin;
    GRANT pgflow_producer, pgflow_consumer TO pgflow_admin;
    GRANT SELECT ON ALL TABLES IN SCHEMA pgflow TO pgflow_admin;
    -- the figures every role may count (get_queue_stats, get_queue_health, metrics), and what
    -- runs wait for (identifiers and times only)
    GRANT SELECT ON pgflow.queue_health, pgflow.waiting_signals TO pgflow_producer, pgflow_consumer;
    FOR f IN
        SELECT p.oid::regprocedure::text AS sig, p.proname::text AS name
          FROM pg_catalog.pg_proc p
         WHERE p.pronamespace = 'pgflow'::regnamespace
    LOOP
        EXECUTE format('REVOKE ALL ON ROUTINE %s FROM pgflow_producer, pgflow_consumer, pgflow_admin', f.sig);
        CONTINUE WHEN f.name LIKE '\_%';
        roles := ARRAY['pgflow_admin'];
        IF f.name IN ('send', 'send_batch', 'send_with_notify', 'publish', 'publish_batch',
                      'queue_channel', 'flow_channel', 'start_flow', 'cancel_run', 'retry_run', 'signal', 'get_queue_stats',
                      'get_queue_health', 'metrics', 'wakeups_enabled', 'flow_mermaid',
                      'run_mermaid') THEN
            roles := roles || 'pgflow_producer'::text;
        END IF;
        IF f.name IN ('read', 'read_with_poll', 'wait_for_messages', 'pop', 'delete', 'archive', 'set_vt', 'nack',
                      'ack_and_read', 'queue_channel', 'flow_channel', 'get_queue_stats',
                      'get_queue_health', 'metrics',
                      'wakeups_enabled', 'start_tasks', 'poll_for_tasks', 'complete_task', 'complete_and_poll',
                      'fail_task', 'get_run_with_states', 'flow_mermaid', 'run_mermaid') THEN
            roles := roles || 'pgflow_consumer'::text;
        END IF;
        EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO %s', f.sig, array_to_string(roles, ', '));
    END LOOP;
END
$$;

SELECT pgflow._apply_grants();
