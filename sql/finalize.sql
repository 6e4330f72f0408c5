-- Last part of the extension script: dump registration and privileges.

-- pg_dump keeps what users put in these tables (the extension's own objects are recreated by
-- CREATE EXTENSION).
SELECT pg_catalog.pg_extension_config_dump('pgflow.queues', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.queues_queue_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.messages', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.archive', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.dlq', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.dlq_dlq_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.due_wakeups', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.topic_bindings', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.flows', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.steps', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.deps', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.runs', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.step_states', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.step_tasks', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.run_retries', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.signals', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.signal_waits', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.schedules', '');

-- Privileges: nothing for PUBLIC. Three roles, granted separately to applications:
--   pgflow_producer  sends messages and starts flow runs;
--   pgflow_consumer  reads, acknowledges and fails messages and tasks;
--   pgflow_admin     everything, including creating, dropping and purging queues and flows.
-- The functions are SECURITY DEFINER with a pinned search_path, so the roles need no rights on
-- the tables themselves.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgflow_producer') THEN
        CREATE ROLE pgflow_producer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgflow_consumer') THEN
        CREATE ROLE pgflow_consumer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgflow_admin') THEN
        CREATE ROLE pgflow_admin NOLOGIN;
    END IF;
END
$$;

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
