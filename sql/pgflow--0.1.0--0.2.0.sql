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
-- Remember that a queue has messages becoming visible at `due`, so the maintenance worker wakes
-- its readers and notifies its listeners then. Rounded up to 100 ms: one row per burst. In the
-- last 100 ms before the largest timestamptz, rounding up would leave the type's range: such a
-- time is kept as it is.
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
-- them (as create_flow does); create_flow keeps its own error for a queue of its name.
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
    PERFORM pgflow._lock_flow_slug(create_flow.flow_slug);
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
    INSERT INTO pgflow.flows (flow_slug, opt_max_attempts, opt_base_delay, opt_timeout)
    VALUES (create_flow.flow_slug, create_flow.max_attempts, create_flow.base_delay, create_flow.timeout)
    RETURNING * INTO f;
    RETURN f;
END
$$;
COMMENT ON FUNCTION pgflow.create_flow(text, integer, integer, integer) IS
'Create a flow and the queue of the same name that delivers its tasks; returns the flow row. Slug: ASCII letters, digits, underscore, 1-48 bytes. Task options, which steps may override: max_attempts (1-100, the first attempt included), base_delay (0-86400 s; retry n waits base_delay * 2^(n-1) s, capped at 86400 s), timeout (1-86400 s before a started task may be claimed again). Creating an existing flow with the same options is a no-op; with other options it fails with 42710.';


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
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgflow FROM PUBLIC;
    GRANT USAGE ON SCHEMA pgflow TO pgflow_producer, pgflow_consumer, pgflow_admin;
    GRANT pgflow_producer, pgflow_consumer TO pgflow_admin;
    GRANT SELECT ON ALL TABLES IN SCHEMA pgflow TO pgflow_admin;
    FOR f IN
        SELECT p.oid::regprocedure::text AS sig, p.proname::text AS name
          FROM pg_catalog.pg_proc p
         WHERE p.pronamespace = 'pgflow'::regnamespace
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM pgflow_producer, pgflow_consumer, pgflow_admin', f.sig);
        CONTINUE WHEN f.name LIKE '\_%';
        roles := ARRAY['pgflow_admin'];
        IF f.name IN ('send', 'send_batch', 'send_with_notify', 'queue_channel', 'flow_channel',
                      'start_flow', 'get_queue_stats', 'wakeups_enabled') THEN
            roles := roles || 'pgflow_producer'::text;
        END IF;
        IF f.name IN ('read', 'read_with_poll', 'pop', 'delete', 'archive', 'set_vt', 'nack',
                      'ack_and_read', 'queue_channel', 'flow_channel', 'get_queue_stats',
                      'wakeups_enabled', 'start_tasks', 'poll_for_tasks', 'complete_task',
                      'fail_task', 'get_run_with_states') THEN
            roles := roles || 'pgflow_consumer'::text;
        END IF;
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f.sig, array_to_string(roles, ', '));
    END LOOP;
END
$$;

SELECT pgflow._apply_grants();
