-- Queue benchmark setup: the pgflow queue and a plain table pair of the same shape, both seeded
-- with the same history so the planner sees comparable tables.
\set ON_ERROR_STOP on
CREATE EXTENSION IF NOT EXISTS pgflow;

SELECT pgflow.create_queue('bench');
SELECT pgflow.create_queue('bench_idle');
-- The notify comparison's other side: the same lifecycle on a queue whose sends are announced.
SELECT pgflow.create_queue('bench_notify', notify => true);

-- Plain SQL on tables shaped like pgflow.messages and pgflow.archive: same columns, defaults,
-- primary keys, delivery-order index and fillfactor.
CREATE SCHEMA plain;
CREATE TABLE plain.messages (LIKE pgflow.messages INCLUDING ALL) WITH (fillfactor = 80);
CREATE TABLE plain.archive (LIKE pgflow.archive INCLUDING ALL);
CREATE SEQUENCE plain.msg_seq AS bigint;

-- History, identical on both sides: 20,000 messages sent, read and archived on each benchmark
-- queue (queue_id 1 on the plain side), and 10,000 waiting on a queue nobody reads (queue_id 2).
DO $$
BEGIN
    FOR i IN 1..20 LOOP
        PERFORM pgflow.send_batch('bench', array_fill('{"n": 1}'::jsonb, ARRAY[1000]));
        PERFORM pgflow.archive('bench', (SELECT array_agg(msg_id) FROM pgflow.read('bench', 30, 1000)));
        PERFORM pgflow.send_batch('bench_notify', array_fill('{"n": 1}'::jsonb, ARRAY[1000]));
        PERFORM pgflow.archive('bench_notify', (SELECT array_agg(msg_id) FROM pgflow.read('bench_notify', 30, 1000)));
    END LOOP;
    FOR i IN 1..10 LOOP
        PERFORM pgflow.send_batch('bench_idle', array_fill('{"n": 1}'::jsonb, ARRAY[1000]));
    END LOOP;
END
$$;

INSERT INTO plain.messages (queue_id, msg_id, vt, message)
SELECT 1, nextval('plain.msg_seq'), clock_timestamp(), '{"n": 1}' FROM generate_series(1, 20000);
UPDATE plain.messages SET vt = clock_timestamp() + interval '30 seconds', read_ct = read_ct + 1
 WHERE queue_id = 1;
WITH d AS (DELETE FROM plain.messages WHERE queue_id = 1 RETURNING *)
INSERT INTO plain.archive (queue_id, msg_id, read_ct, enqueued_at, vt, priority, message, headers)
SELECT queue_id, msg_id, read_ct, enqueued_at, vt, priority, message, headers FROM d;
INSERT INTO plain.messages (queue_id, msg_id, vt, message)
SELECT 2, g, clock_timestamp(), '{"n": 1}' FROM generate_series(1, 10000) g;

VACUUM ANALYZE pgflow.messages, pgflow.archive, plain.messages, plain.archive;
