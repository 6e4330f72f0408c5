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
SELECT pg_catalog.pg_extension_config_dump('pgflow.flows', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.steps', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.deps', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.runs', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.step_states', '');
SELECT pg_catalog.pg_extension_config_dump('pgflow.step_tasks', '');

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

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgflow FROM PUBLIC;
GRANT USAGE ON SCHEMA pgflow TO pgflow_producer, pgflow_consumer, pgflow_admin;
GRANT pgflow_producer, pgflow_consumer TO pgflow_admin;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgflow TO pgflow_admin;
GRANT SELECT ON ALL TABLES IN SCHEMA pgflow TO pgflow_admin;

DO $$
DECLARE
    f text;
BEGIN
    -- name patterns per role; the admin role has all functions
    FOR f IN
        SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p
         WHERE p.pronamespace = 'pgflow'::regnamespace
           AND p.proname IN ('send', 'send_batch', 'send_with_notify', 'queue_channel', 'flow_channel',
                             'start_flow', 'get_queue_stats', 'wakeups_enabled')
    LOOP
        EXECUTE 'GRANT EXECUTE ON FUNCTION ' || f || ' TO pgflow_producer';
    END LOOP;
    FOR f IN
        SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p
         WHERE p.pronamespace = 'pgflow'::regnamespace
           AND p.proname IN ('read', 'read_with_poll', 'pop', 'delete', 'archive', 'set_vt', 'nack',
                             'ack_and_read', 'queue_channel', 'flow_channel', 'get_queue_stats',
                             'wakeups_enabled', 'start_tasks', 'poll_for_tasks', 'complete_task',
                             'fail_task', 'get_run_with_states')
    LOOP
        EXECUTE 'GRANT EXECUTE ON FUNCTION ' || f || ' TO pgflow_consumer';
    END LOOP;
END
$$;
