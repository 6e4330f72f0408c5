-- One pgflow-TS worker cycle on the 3-step sequential flow, as its worker (PgflowSqlClient) does it: read a
-- message, start its task, complete it (three statements, each its own transaction).
SELECT msg_id FROM pgmq.read_with_poll('bench_seq', 30, 1, 5, 200) \gset
SELECT run_id, step_slug, task_index FROM pgflow.start_tasks('bench_seq', ARRAY[:msg_id]::bigint[], '00000000-0000-4000-8000-000000000001') \gset
SELECT pgflow.complete_task(':run_id', ':step_slug', :task_index, '{"ok":true}');
