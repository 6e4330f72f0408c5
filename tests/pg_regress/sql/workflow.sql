-- pgflow workflows, a walkthrough.
--
-- A flow is a DAG of steps. A run of a flow gets a state per step and one task per single
-- step (one per array element for a map step); tasks travel as messages of a queue named
-- after the flow, and workers claim and complete them.
CREATE EXTENSION IF NOT EXISTS pgflow;
\set SHOW_CONTEXT never
-- Workflow events (NOTIFY) are covered by the client tests.
SET pgflow.workflow_events = 'off';

-- 1. Define a flow: a root step, two branches, and a join (a diamond).
SELECT flow_slug, opt_max_attempts, opt_base_delay, opt_timeout
  FROM pgflow.create_flow('orders', max_attempts => 2, base_delay => 0, timeout => 30);
SELECT step_slug, step_index, deps_count FROM pgflow.add_step('orders', 'fetch');
SELECT step_slug, step_index, deps_count FROM pgflow.add_step('orders', 'price', '{fetch}');
SELECT step_slug, step_index, deps_count FROM pgflow.add_step('orders', 'stock', '{fetch}', timeout => 5);
SELECT step_slug, step_index, deps_count FROM pgflow.add_step('orders', 'invoice', '{price,stock}');

-- The flow delivers its tasks through a queue of the same name.
SELECT queue_name FROM pgflow.list_queues() WHERE queue_name = 'orders';

-- The whole definition as one document (the form pgflow.create_flow_from_shape accepts).
SELECT jsonb_pretty(pgflow.get_flow_shape('orders'));

-- Defining it again, identically, changes nothing; differently, is refused.
SELECT step_slug FROM pgflow.add_step('orders', 'price', '{fetch}');
SELECT step_slug FROM pgflow.add_step('orders', 'price', '{fetch}', max_attempts => 5);

-- 2. Start a run. Root steps' tasks are queued at once; the others wait for their deps.
SELECT status, input FROM pgflow.start_flow('orders', '{"order": 42}', '00000000-0000-0000-0000-000000000001');
SELECT step_slug, status, remaining_deps, remaining_tasks
  FROM pgflow.step_states WHERE run_id = '00000000-0000-0000-0000-000000000001' ORDER BY step_slug;

-- 3. A worker claims tasks: each comes with its input {"run": <run input>, <dep>: <output>}.
SELECT step_slug, task_index, input
  FROM pgflow.poll_for_tasks('orders', vt => 30, qty => 10, max_poll_seconds => 0);
SELECT pgflow.complete_task('00000000-0000-0000-0000-000000000001', 'fetch', 0, '{"items": 3}');

-- Both branches are now queued, and get the root's output.
SELECT step_slug, task_index, input
  FROM pgflow.poll_for_tasks('orders', 30, 10, 0) ORDER BY step_slug;
SELECT pgflow.complete_task('00000000-0000-0000-0000-000000000001', 'price', 0, '{"total": 30}');
SELECT pgflow.complete_task('00000000-0000-0000-0000-000000000001', 'stock', 0, '"in stock"');

-- The join starts once, when its last dependency completes.
SELECT step_slug, input FROM pgflow.poll_for_tasks('orders', 30, 10, 0);
SELECT pgflow.complete_task('00000000-0000-0000-0000-000000000001', 'invoice', 0, '"INV-1"');

-- The run is complete; its output holds the outputs of its leaf steps.
SELECT status, output FROM pgflow.runs WHERE run_id = '00000000-0000-0000-0000-000000000001';

-- 4. Reporting twice, or late, changes nothing and says so.
SELECT pgflow.complete_task('00000000-0000-0000-0000-000000000001', 'invoice', 0, '"INV-2"');
SELECT pgflow.fail_task('00000000-0000-0000-0000-000000000001', 'invoice', 0, 'too late');

-- 5. Failures are retried after base_delay * 2^(attempt-1) seconds (here base_delay 0), up
-- to max_attempts; then the step and the run fail.
SELECT status FROM pgflow.start_flow('orders', '{"order": 43}', '00000000-0000-0000-0000-000000000002');
SELECT step_slug FROM pgflow.poll_for_tasks('orders', 30, 10, 0);
SELECT pgflow.fail_task('00000000-0000-0000-0000-000000000002', 'fetch', 0, 'warehouse offline');
SELECT step_slug, status, attempts_count, error_message
  FROM pgflow.step_tasks WHERE run_id = '00000000-0000-0000-0000-000000000002';
SELECT step_slug FROM pgflow.poll_for_tasks('orders', 30, 10, 0);
SELECT pgflow.fail_task('00000000-0000-0000-0000-000000000002', 'fetch', 0, 'warehouse still offline');
SELECT status FROM pgflow.runs WHERE run_id = '00000000-0000-0000-0000-000000000002';

-- get_run_with_states shows a run with each step's state and its task counts.
SELECT s ->> 'step_slug' AS step, s ->> 'status' AS status, s ->> 'error_message' AS error, s -> 'tasks' AS tasks
  FROM jsonb_array_elements(pgflow.get_run_with_states('00000000-0000-0000-0000-000000000002') -> 'steps') s;

-- 6. Map steps: one task per element; the output is the array of task outputs, in order.
SELECT pgflow.create_flow_from_shape('squares', '{
  "steps": [
    {"slug": "numbers"},
    {"slug": "square", "type": "map", "deps": ["numbers"]},
    {"slug": "sum", "deps": ["square"]}
  ]}');
SELECT status FROM pgflow.start_flow('squares', '{}', '00000000-0000-0000-0000-000000000003');
SELECT step_slug, input FROM pgflow.poll_for_tasks('squares', 30, 10, 0);
SELECT pgflow.complete_task('00000000-0000-0000-0000-000000000003', 'numbers', 0, '[1, 2, 3]');
SELECT step_slug, task_index, input FROM pgflow.poll_for_tasks('squares', 30, 10, 0) ORDER BY task_index;
SELECT pgflow.complete_task('00000000-0000-0000-0000-000000000003', 'square', i, to_jsonb(i * i + 2 * i + 1))
  FROM generate_series(2, 0, -1) i;
SELECT step_slug, input FROM pgflow.poll_for_tasks('squares', 30, 10, 0);
SELECT pgflow.complete_task('00000000-0000-0000-0000-000000000003', 'sum', 0, '14');
SELECT status, output FROM pgflow.runs WHERE run_id = '00000000-0000-0000-0000-000000000003';

-- A map over an empty array completes at once with []; over a non-array, the run fails.
SELECT pgflow.create_flow_from_shape('each', '{"steps": [{"slug": "item", "type": "map"}]}');
SELECT status, output FROM pgflow.start_flow('each', '[]');
SELECT status FROM pgflow.start_flow('each', '{"not": "an array"}', '00000000-0000-0000-0000-000000000004');
SELECT step_slug, status, error_message FROM pgflow.step_states WHERE run_id = '00000000-0000-0000-0000-000000000004';

-- 7. Bad input gets a specific error and changes nothing.
SELECT pgflow.start_flow('nope', '{}');
SELECT pgflow.start_flow('orders', NULL);
SELECT pgflow.add_step('orders', 'bad-slug');
SELECT pgflow.add_step('squares', 'late', '{sum}');
SELECT pgflow.complete_task('00000000-0000-0000-0000-000000000001', 'nope', 0, '1');
SELECT pgflow.create_flow_from_shape('cyclic', '{"steps": [{"slug": "a", "deps": ["b"]}, {"slug": "b", "deps": ["a"]}]}');
SELECT pgflow.create_flow_from_shape('typo', '{"steps": [{"slug": "a", "dependencies": []}]}');
SELECT count(*) FROM pgflow.flows WHERE flow_slug IN ('cyclic', 'typo');
SELECT pgflow.drop_queue('orders');

-- 8. Dropping a flow drops its runs, tasks and queue.
SELECT pgflow.drop_flow('orders'), pgflow.drop_flow('squares'), pgflow.drop_flow('each');
SELECT count(*) FROM pgflow.runs WHERE flow_slug IN ('orders', 'squares', 'each');
SELECT count(*) FROM pgflow.queues WHERE queue_name IN ('orders', 'squares', 'each');
