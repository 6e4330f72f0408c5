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
