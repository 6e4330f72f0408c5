-- pgflow end to end: run by scripts/demo.sh against a fresh cluster, printing what happens.
\pset footer off
\set VERBOSITY terse

\echo '--- CREATE EXTENSION pgflow'
CREATE EXTENSION IF NOT EXISTS pgflow;
SELECT pgflow.wakeups_enabled() AS "read_with_poll wakes at commit";

\echo ''
\echo '--- A queue: 2 retries, 200 ms first backoff'
SELECT pgflow.create_queue('demo_jobs', max_retries => 2, retry_delay_ms => 200) AS created;

\echo ''
\echo '--- Send three jobs; the rollback signal has priority 10 and overtakes the others'
SELECT pgflow.send('demo_jobs', '{"job": "resize", "image": 1}') AS msg_id;
SELECT pgflow.send('demo_jobs', '{"job": "resize", "image": 2}') AS msg_id;
SELECT pgflow.send('demo_jobs', '{"job": "rollback", "release": "r42"}', priority => 10) AS msg_id;
SELECT queue_name, depth, visible, in_flight, total_sent FROM pgflow.get_queue_stats('demo_jobs');

\echo ''
\echo '--- A worker leases two messages for 30 s: highest priority first, then FIFO'
SELECT msg_id, read_ct, priority, message FROM pgflow.read('demo_jobs', vt => 30, qty => 2);

\echo ''
\echo '--- It finishes the rollback: archive it (the lease is (msg_id, read_ct) = (3, 1))'
SELECT pgflow.archive('demo_jobs', 3, read_ct => 1) AS archived;

\echo ''
\echo '--- Job 1 fails: nack it; it comes back after the 200 ms backoff'
SELECT msg_id, outcome, attempt FROM pgflow.nack('demo_jobs', 1, error => 'image server timed out', read_ct => 1);
SELECT pg_sleep(0.3) \g /dev/null
\echo '--- The retry is delivered again with read_ct 2, and this time it succeeds'
SELECT msg_id, read_ct, message FROM pgflow.read('demo_jobs', 30, 1);
SELECT pgflow.archive('demo_jobs', 1, read_ct => 2) AS archived;

\echo ''
\echo '--- A stale lease cannot acknowledge: read_ct 1 of message 1 is gone'
SELECT pgflow.delete('demo_jobs', 1, read_ct => 1) AS deleted;

\echo ''
\echo '--- Job 2 fails on every attempt (3 deliveries: 1 + max_retries) and is dead-lettered'
SELECT msg_id, read_ct FROM pgflow.read('demo_jobs', 30, 1);
SELECT msg_id, outcome, attempt FROM pgflow.nack('demo_jobs', 2, 'corrupt image');
SELECT pg_sleep(0.3) \g /dev/null
SELECT msg_id, read_ct FROM pgflow.read('demo_jobs', 30, 1);
SELECT msg_id, outcome, attempt FROM pgflow.nack('demo_jobs', 2, 'corrupt image');
SELECT pg_sleep(0.5) \g /dev/null
SELECT msg_id, read_ct FROM pgflow.read('demo_jobs', 30, 1);
SELECT msg_id, outcome, attempt FROM pgflow.nack('demo_jobs', 2, 'corrupt image');
SELECT dlq_id, msg_id, attempts, last_error, jsonb_array_length(errors) AS errors_kept
  FROM pgflow.list_dlq_messages('demo_jobs');

\echo ''
\echo '--- An operator fixes the image and retries it from the dead-letter queue'
SELECT pgflow.retry_dlq_message(dlq_id) AS new_msg_id FROM pgflow.list_dlq_messages('demo_jobs');
SELECT msg_id, read_ct, message FROM pgflow.read('demo_jobs', 30, 1) \gset retried_
SELECT pgflow.archive('demo_jobs', :retried_msg_id) AS archived;

\echo ''
\echo '--- Statistics'
SELECT queue_name, depth, visible, in_flight, delayed, archived, dead_lettered, total_sent
  FROM pgflow.get_queue_stats();

\echo ''
\echo '=== Workflows ==='
\echo '--- A flow: fetch, then a map step that scores every item, then a summary'
SELECT pgflow.create_flow_from_shape('demo_pipeline', '{
  "max_attempts": 3, "base_delay": 0, "timeout": 30,
  "steps": [
    {"slug": "fetch"},
    {"slug": "score", "type": "map", "deps": ["fetch"]},
    {"slug": "summarize", "deps": ["score"]}
  ]}') AS created;
SELECT pgflow.get_flow_shape('demo_pipeline') AS shape;

\echo ''
\echo '--- Start a run'
SELECT run_id, status FROM pgflow.start_flow('demo_pipeline', '{"source": "reviews"}',
    run_id => '00000000-0000-0000-0000-0000000000d1');

\echo ''
\echo '--- A worker claims the root task and completes it with three items'
SELECT step_slug, task_index, input FROM pgflow.poll_for_tasks('demo_pipeline', vt => 30, qty => 10, max_poll_seconds => 1);
SELECT pgflow.complete_task('00000000-0000-0000-0000-0000000000d1', 'fetch', 0, '[{"id": 1}, {"id": 2}, {"id": 3}]') AS outcome;

\echo ''
\echo '--- The map step fans out: one task per item'
SELECT step_slug, task_index, input FROM pgflow.poll_for_tasks('demo_pipeline', 30, 10, 1) ORDER BY task_index;
\echo '--- Task 1 fails once and is retried; the others complete'
SELECT pgflow.fail_task('00000000-0000-0000-0000-0000000000d1', 'score', 1, 'model overloaded') AS outcome;
SELECT pgflow.complete_task('00000000-0000-0000-0000-0000000000d1', 'score', 0, '{"score": 0.9}') AS outcome;
SELECT pgflow.complete_task('00000000-0000-0000-0000-0000000000d1', 'score', 2, '{"score": 0.4}') AS outcome;
SELECT step_slug, task_index, input FROM pgflow.poll_for_tasks('demo_pipeline', 30, 10, 2);
SELECT pgflow.complete_task('00000000-0000-0000-0000-0000000000d1', 'score', 1, '{"score": 0.7}') AS outcome;

\echo ''
\echo '--- The summary gets the map output in element order'
SELECT step_slug, input FROM pgflow.poll_for_tasks('demo_pipeline', 30, 10, 1);
SELECT pgflow.complete_task('00000000-0000-0000-0000-0000000000d1', 'summarize', 0, '{"mean": 0.667}') AS outcome;
\echo '--- A late, duplicate completion changes nothing and says so'
SELECT pgflow.complete_task('00000000-0000-0000-0000-0000000000d1', 'summarize', 0, '{"mean": 0}') AS outcome;

\echo ''
\echo '--- The run, with its step states'
SELECT pgflow.get_run_with_states('00000000-0000-0000-0000-0000000000d1') AS r \gset
SELECT :'r'::jsonb ->> 'status' AS run_status, :'r'::jsonb -> 'output' AS run_output;
SELECT s ->> 'step_slug' AS step, s ->> 'status' AS status,
       (s -> 'tasks' ->> 'completed')::int AS tasks_completed, (s -> 'tasks' ->> 'attempts')::int AS attempts
  FROM jsonb_array_elements(:'r'::jsonb -> 'steps') s;

\echo ''
\echo '--- Listeners are told of every event: LISTEN "pgflow.flows" (all flows) or'
SELECT pgflow.flow_channel('demo_pipeline') AS "this flow's channel", pgflow.queue_channel('demo_jobs') AS "the queue's channel";
