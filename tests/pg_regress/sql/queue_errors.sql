-- pgflow queues: the errors users see.
--
-- Bad input is refused before anything is written, with a message naming the argument and a
-- hint where one helps. (Each error's SQLSTATE is listed in docs/queues.md.)
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pgflow;
RESET client_min_messages;
\set VERBOSITY default
\set SHOW_CONTEXT never

DO $$ BEGIN PERFORM pgflow.drop_queue('jobs'); END $$;
SELECT pgflow.create_queue('jobs');

-- Queue names: ASCII letters, digits and underscores, 1 to 48 bytes.
SELECT pgflow.create_queue(NULL);
SELECT pgflow.create_queue('');
SELECT pgflow.create_queue(repeat('a', 49));
SELECT pgflow.create_queue('café');
SELECT pgflow.create_queue('队列');
SELECT pgflow.create_queue('q; drop table x');
SELECT pgflow.create_queue('Robert''); DROP TABLE pgflow.messages;--');
SELECT pgflow.queue_channel('no spaces');
SELECT pgflow.flow_channel(repeat('f', 60));

-- A well-formed name that is not a queue.
SELECT pgflow.send('nosuchqueue', '{}');
SELECT * FROM pgflow.read('nosuchqueue', 30);
SELECT * FROM pgflow.get_queue_stats('nosuchqueue');
-- drop_queue of a missing queue is not an error: it returns false.
SELECT pgflow.drop_queue('nosuchqueue');

-- Queue options.
SELECT pgflow.create_queue('jobs2', max_retries => -1);
SELECT pgflow.create_queue('jobs2', retry_delay_ms => 100000000);
SELECT pgflow.create_queue('jobs2', max_retry_delay_ms => NULL);
SELECT pgflow.create_queue('jobs2', retry_jitter => 2);
SELECT pgflow.alter_queue('jobs', max_retries => 1000);

-- Sending.
SELECT pgflow.send('jobs', NULL);
SELECT pgflow.send('jobs', '{}', -5);
SELECT pgflow.send('jobs', '{}', NULL::integer);
SELECT pgflow.send('jobs', '{}', 'infinity'::timestamptz);
SELECT pgflow.send('jobs', '{}', 0, NULL);
SELECT pgflow.send('jobs', '{}', 0, 0, '["not", "an", "object"]');
-- A bare NULL delay matches both send overloads; PostgreSQL asks for a cast.
SELECT pgflow.send('jobs', '{}', NULL);

-- Batches.
SELECT pgflow.send_batch('jobs', NULL);
SELECT pgflow.send_batch('jobs', '{}');
SELECT pgflow.send_batch('jobs', ARRAY['{}', NULL]::jsonb[]);
SELECT pgflow.send_batch('jobs', ARRAY['{}', '{}']::jsonb[], 0, 0, ARRAY['{}']::jsonb[]);
SELECT pgflow.send_batch('jobs', ARRAY['{}']::jsonb[], 0, 0, ARRAY['"x"']::jsonb[]);
SET pgflow.max_batch_size = 5;
SELECT pgflow.send_batch('jobs', array_fill('{}'::jsonb, ARRAY[6]));
RESET pgflow.max_batch_size;

-- Reading.
SELECT * FROM pgflow.read('jobs', NULL);
SELECT * FROM pgflow.read('jobs', -1);
SELECT * FROM pgflow.read('jobs', 30, 0);
SELECT * FROM pgflow.read('jobs', 30, NULL);
SELECT * FROM pgflow.read_with_poll('jobs', 30, 1, 7200);
SELECT * FROM pgflow.read_with_poll('jobs', 30, 1, 1, 0);
SELECT * FROM pgflow.pop('jobs', -3);

-- Acknowledging.
SELECT pgflow.delete('jobs', NULL::bigint);
SELECT pgflow.delete('jobs', NULL::bigint[]);
SELECT pgflow.archive('jobs', ARRAY[1, NULL]::bigint[]);
SELECT pgflow.archive('jobs', ARRAY[1, 2]::bigint[], ARRAY[1]);
SELECT * FROM pgflow.ack_and_read('jobs', NULL, 30);
SELECT * FROM pgflow.ack_and_read('jobs', ARRAY[1]::bigint[], 30, 1, true, ARRAY[1, 1]);
SELECT * FROM pgflow.set_vt('jobs', 1, -1);
SELECT * FROM pgflow.list_pending_messages('jobs', 0);

-- Nothing above left a trace.
SELECT queue_name, depth, archived, total_sent FROM pgflow.get_queue_stats('jobs');
SELECT count(*) AS other_queues FROM pgflow.list_queues() WHERE queue_name <> 'jobs' AND queue_name LIKE 'jobs%';
SELECT pgflow.drop_queue('jobs');
