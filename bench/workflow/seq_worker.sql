-- One worker cycle on the 3-step sequential flow: claim a task, then complete it (two
-- statements, each its own transaction).
SELECT run_id, step_slug, task_index FROM pgflow.poll_for_tasks('bench_seq', 30, 1, 5, 100) \gset
SELECT pgflow.complete_task(':run_id', ':step_slug', :task_index, '{"ok":true}');
