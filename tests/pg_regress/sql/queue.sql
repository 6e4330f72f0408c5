-- pgflow queues, a walkthrough.
--
-- Every queue lives in the same few tables; a message is a jsonb document with optional headers
-- and a priority. Readers lease messages for a visibility timeout (vt, in seconds) and then
-- delete or archive them. Output here shows ids, delivery counts and bodies only, never times.
-- (quiet, so the output is the same whether or not the extension exists already)
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pgflow;
RESET client_min_messages;

-- Start from a clean slate (a no-op on a fresh database).
DO $$ BEGIN PERFORM pgflow.drop_queue(n) FROM unnest(ARRAY['orders', 'emails', 'leases']) n; END $$;

-- 1. Managing queues ------------------------------------------------------------------------

-- create_queue returns true when it creates the queue ...
SELECT pgflow.create_queue('orders');
-- ... false when the same call finds the queue there already: a no-op ...
SELECT pgflow.create_queue('orders');
-- ... and an error naming what differs when the queue exists with other options.
SELECT pgflow.create_queue('orders', max_retries => 10);
SELECT pgflow.create_queue('emails', max_retries => 5, retry_delay_ms => 250);

SELECT queue_name, max_retries, retry_delay_ms, max_retry_delay_ms, retry_jitter, notify
  FROM pgflow.list_queues() WHERE queue_name IN ('orders', 'emails');

-- alter_queue changes the options it is given; NULL (the default) keeps the others.
SELECT pgflow.alter_queue('emails', max_retries => 2, notify => true);
SELECT queue_name, max_retries, retry_delay_ms, notify
  FROM pgflow.list_queues() WHERE queue_name = 'emails';

-- 2. Sending --------------------------------------------------------------------------------

-- send returns the message's id; ids ascend per queue.
SELECT pgflow.send('orders', '{"order": 1}');
SELECT pgflow.send('orders', '{"order": 2}', headers => '{"trace_id": "t-2"}');
-- A priority: higher is delivered first.
SELECT pgflow.send('orders', '{"order": 3, "rush": true}', 0, 10);
-- A delay in seconds, or a time: the message stays invisible until then.
SELECT pgflow.send('orders', '{"order": 4, "later": true}', 3600);
SELECT pgflow.send('orders', '{"order": 5, "tomorrow": true}', now() + interval '1 day');

-- send_batch sends many in one statement; ids come back in array order.
SELECT * FROM pgflow.send_batch('orders',
    ARRAY['{"order": 6}', '{"order": 7}', '{"order": 8}']::jsonb[]);

-- What is waiting, in delivery order (priority, then FIFO by msg_id), with each one's state.
SELECT msg_id, state, read_ct, priority, message, headers
  FROM pgflow.list_pending_messages('orders');

-- 3. Reading and acknowledging --------------------------------------------------------------

-- read leases up to qty visible messages for vt seconds: the rush order first, then FIFO.
SELECT msg_id, read_ct, message, headers FROM pgflow.read('orders', 30, 3);
-- Leased messages are invisible to other readers until their vt passes.
SELECT msg_id, read_ct, message FROM pgflow.read('orders', 30, 2);

-- delete acknowledges a message; pass the read_ct you got to prove you still hold the lease.
SELECT pgflow.delete('orders', 3, 1);
-- A second delete finds nothing.
SELECT pgflow.delete('orders', 3, 1);
-- archive acknowledges too, and keeps the message in pgflow.archive.
SELECT pgflow.archive('orders', 1, 1);
-- Array forms return the ids they acted on.
SELECT id FROM pgflow.archive('orders', ARRAY[2, 6]::bigint[], ARRAY[1, 1]) id ORDER BY id;

SELECT a.msg_id, a.read_ct, a.message
  FROM pgflow.archive a JOIN pgflow.queues q USING (queue_id)
 WHERE q.queue_name = 'orders' ORDER BY a.msg_id;

-- ack_and_read acknowledges what a consumer finished and leases its next messages in one call.
SELECT msg_id, read_ct, message FROM pgflow.ack_and_read('orders', ARRAY[7]::bigint[], 30, 5);

-- pop reads and deletes at once (at-most-once delivery).
SELECT pgflow.send('orders', '{"order": 9}');
SELECT msg_id, read_ct, message FROM pgflow.pop('orders');

-- read_with_poll waits up to max_poll_seconds for a message; here one is ready at once.
SELECT pgflow.send('orders', '{"order": 10}');
SELECT msg_id, read_ct, message FROM pgflow.read_with_poll('orders', 30, 1, 5);
-- With nothing to read, it returns no row once max_poll_seconds (here 0) have passed.
SELECT msg_id FROM pgflow.read_with_poll('orders', 30, 1, 0);

-- 4. Leases ----------------------------------------------------------------------------------

SELECT pgflow.create_queue('leases');
SELECT pgflow.send('leases', '{"job": "resize"}');
-- A worker leases the message for one second ...
SELECT msg_id, read_ct, message FROM pgflow.read('leases', 1);
-- ... and is too slow: the lease expires and another worker gets it, read_ct now 2.
SELECT pg_sleep(1.2);
SELECT msg_id, read_ct, message FROM pgflow.read('leases', 30);
-- The first worker's acknowledgements carry read_ct 1: stale, so they change nothing.
SELECT pgflow.delete('leases', 1, 1) AS deleted;
SELECT pgflow.archive('leases', 1, 1) AS archived;
SELECT msg_id FROM pgflow.set_vt('leases', 1, 0, 1);
-- The current holder extends its lease, then finishes.
SELECT msg_id, read_ct FROM pgflow.set_vt('leases', 1, 60, 2);
SELECT pgflow.delete('leases', 1, 2) AS deleted;
-- set_vt with vt 0 gives a message back at once.
SELECT pgflow.send('leases', '{"job": "crop"}');
SELECT msg_id, read_ct FROM pgflow.read('leases', 3600);
SELECT msg_id, read_ct FROM pgflow.set_vt('leases', 2, 0);
SELECT msg_id, read_ct, message FROM pgflow.read('leases', 30);

-- 5. Statistics ------------------------------------------------------------------------------

-- depth = visible + in_flight + delayed; archived and dead_lettered count the messages that
-- left; total_sent counts every id ever issued.
SELECT queue_name, depth, visible, in_flight, delayed, archived, dead_lettered, total_sent,
       oldest_msg_age_sec >= newest_msg_age_sec AS oldest_first
  FROM pgflow.get_queue_stats('orders');
SELECT queue_name, depth, visible, in_flight, delayed, archived, dead_lettered, total_sent
  FROM pgflow.get_queue_stats() WHERE queue_name IN ('orders', 'emails', 'leases');

-- 6. Purging and dropping --------------------------------------------------------------------

-- purge_queue deletes every live message (visible, leased or delayed) and says how many.
SELECT pgflow.purge_queue('orders');
SELECT depth, archived FROM pgflow.get_queue_stats('orders');
-- drop_queue removes a queue with its messages and archive; false if there was none.
SELECT pgflow.drop_queue('orders');
SELECT pgflow.drop_queue('orders');
SELECT pgflow.drop_queue('emails');
SELECT pgflow.drop_queue('leases');
SELECT count(*) AS queues_left FROM pgflow.list_queues()
 WHERE queue_name IN ('orders', 'emails', 'leases');
