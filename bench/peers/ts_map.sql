-- One pgflow-TS worker cycle on the flow of a root step feeding a 100-element map: read,
-- start, complete; the root task returns the array the map step fans out over.
SELECT msg_id FROM pgmq.read_with_poll('bench_map', 30, 1, 5, 200) \gset
SELECT run_id, step_slug, task_index FROM pgflow.start_tasks('bench_map', ARRAY[:msg_id]::bigint[], '00000000-0000-4000-8000-000000000001') \gset
SELECT pgflow.complete_task(':run_id', ':step_slug', :task_index,
       CASE WHEN ':step_slug' = 'root' THEN (SELECT jsonb_agg(i) FROM generate_series(1, 100) i) ELSE '{"ok":true}' END);
