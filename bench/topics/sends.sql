-- The same 10 copies as publish.sql, sent by 10 sends to the queues, in one transaction.
BEGIN;
SELECT pgflow.send('bench_topic_0', '{"n": 1}');
SELECT pgflow.send('bench_topic_1', '{"n": 1}');
SELECT pgflow.send('bench_topic_2', '{"n": 1}');
SELECT pgflow.send('bench_topic_3', '{"n": 1}');
SELECT pgflow.send('bench_topic_4', '{"n": 1}');
SELECT pgflow.send('bench_topic_5', '{"n": 1}');
SELECT pgflow.send('bench_topic_6', '{"n": 1}');
SELECT pgflow.send('bench_topic_7', '{"n": 1}');
SELECT pgflow.send('bench_topic_8', '{"n": 1}');
SELECT pgflow.send('bench_topic_9', '{"n": 1}');
COMMIT;
