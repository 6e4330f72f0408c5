-- One worker cycle on the flow of a root step feeding a 100-element map, one transaction per
-- task: complete the task held (the root task returns the array the map step fans out over) and
-- claim the next in the same statement (complete_and_poll); holding none, wait for one with
-- poll_for_tasks. Run with -D held=0.
\if :held
SELECT count(*) AS held, max(run_id::text) AS run_id, max(step_slug) AS step_slug, max(task_index) AS task_index
  FROM pgflow.complete_and_poll(':run_id', ':step_slug', :task_index,
       CASE WHEN ':step_slug' = 'root' THEN (SELECT jsonb_agg(i) FROM generate_series(1, 100) i) ELSE '{"ok":true}' END) \gset
\else
SELECT count(*) AS held, max(run_id::text) AS run_id, max(step_slug) AS step_slug, max(task_index) AS task_index
  FROM pgflow.poll_for_tasks('bench_map', 30, 1, 5, 100) \gset
\endif
