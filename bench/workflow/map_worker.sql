-- One worker cycle on the flow of a root step feeding a 100-element map: claim a task, then
-- complete it. The root task returns the array the map step fans out over.
SELECT run_id, step_slug, task_index FROM pgflow.poll_for_tasks('bench_map', 30, 1, 5, 100) \gset
SELECT pgflow.complete_task(':run_id', ':step_slug', :task_index,
       CASE WHEN ':step_slug' = 'root' THEN (SELECT jsonb_agg(i) FROM generate_series(1, 100) i) ELSE '{"ok":true}' END);
