-- Events layer: what the database announces about queues.
--
-- Every insert into pgflow.messages (send, send_batch, retry from the DLQ, workflow tasks) goes
-- through one row trigger (sql/queue/triggers.sql), which hands the inserted ids per queue to
-- the Rust layer (src/events/). At commit that wakes blocked readers of the queue and, for queues with
-- notify on, sends one NOTIFY per queue channel per transaction; an aborted transaction
-- announces nothing. Notifications are hints: the messages are in the table, and a listener
-- that missed one loses nothing by reading.

CREATE FUNCTION pgflow.send_with_notify(queue_name text, message jsonb, delay integer DEFAULT 0,
                                        priority integer DEFAULT 0, headers jsonb DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    q pgflow.queues;
    id bigint;
BEGIN
    PERFORM pgflow._check_send(delay, priority, headers);
    -- As in pgflow.send: wait out a drop_queue in progress, so the look-up sees it (42704).
    PERFORM pgflow._lock_queue_name(queue_name, false);
    q := pgflow._api_queue(queue_name, 'send_with_notify');
    id := pgflow._send(q, message, clock_timestamp() + make_interval(secs => delay), priority, headers);
    -- count 0: the trigger already counted this message; this only turns the announcement on.
    PERFORM pgflow._on_commit_sent(q.queue_id, q.queue_name, id, id, 0, true);
    RETURN id;
END
$$;
COMMENT ON FUNCTION pgflow.send_with_notify(text, jsonb, integer, integer, jsonb) IS
'pgflow.send, and announce the message on pgflow.queue_channel(queue_name) when the transaction commits, whatever the queue''s notify setting. Payload: {"event":"message_sent","queue","first_msg_id","last_msg_id","count"}; several sends in one transaction make one notification covering their id range. A notification is a hint: read the queue to get the messages.';

COMMENT ON FUNCTION pgflow.queue_channel(text) IS
'The NOTIFY channel of a queue: pgflow.queue.<queue_name>, case kept (LISTEN "pgflow.queue.Orders", quoted). Always under 64 bytes. Events: message_sent (a committed send, with its id range) and message_due (delayed messages or retries became visible).';
COMMENT ON FUNCTION pgflow.flow_channel(text) IS
'The NOTIFY channel of a flow''s workflow events: pgflow.flow.<flow_slug>, case kept. All flows'' events also go to the channel pgflow.flows.';
COMMENT ON FUNCTION pgflow.wakeups_enabled() IS
'True when pgflow is in shared_preload_libraries, so pgflow.read_with_poll wakes the moment a send commits; false when it falls back to polling.';
