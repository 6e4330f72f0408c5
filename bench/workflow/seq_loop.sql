-- One worker cycle on the 3-step sequential flow, one transaction per task: complete the task
-- held and claim the next in the same statement (complete_and_poll); holding none (the first
-- cycle, or nothing was visible then), wait for one with poll_for_tasks. Run with -D held=0.
\if :held
SELECT count(*) AS held, max(run_id::text) AS run_id, max(step_slug) AS step_slug, max(task_index) AS task_index
  FROM pgflow.complete_and_poll(':run_id', ':step_slug', :task_index, '{"ok":true}') \gset
\else
SELECT count(*) AS held, max(run_id::text) AS run_id, max(step_slug) AS step_slug, max(task_index) AS task_index
  FROM pgflow.poll_for_tasks('bench_seq', 30, 1, 5, 100) \gset
\endif
