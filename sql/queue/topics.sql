-- Topics: a message published with a routing key is sent to every queue bound with a matching
-- pattern, as an AMQP topic exchange routes. The rules for keys and patterns, and the
-- matching, are in src/queue/topics.rs (pgflow._check_topic, pgflow._topic_matches); the copies are
-- sent by pgflow.send and pgflow.send_batch, so every rule of sending applies to each.

CREATE FUNCTION pgflow.bind_topic(pattern text, queue_name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
BEGIN
    PERFORM pgflow._check_topic(bind_topic.pattern, 'pattern', true);
    PERFORM pgflow._lock_queue_name(bind_topic.queue_name, false);
    q := pgflow._api_queue(bind_topic.queue_name, 'bind_topic');
    INSERT INTO pgflow.topic_bindings (pattern, queue_id) VALUES (bind_topic.pattern, q.queue_id)
        ON CONFLICT DO NOTHING;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION pgflow.bind_topic(text, text) IS
'Bind a queue to a topic pattern: messages published with a matching routing key are sent to it. A pattern is dot-separated words of letters, digits, _ and -; a word may be * (exactly one word) or # (zero or more words). Returns true if bound, false if it already was. The binding goes with the queue when it is dropped.';

CREATE FUNCTION pgflow.unbind_topic(pattern text, queue_name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
BEGIN
    PERFORM pgflow._check_topic(unbind_topic.pattern, 'pattern', true);
    q := pgflow._queue(unbind_topic.queue_name);
    DELETE FROM pgflow.topic_bindings WHERE pattern = unbind_topic.pattern AND queue_id = q.queue_id;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION pgflow.unbind_topic(text, text) IS
'Remove a queue''s binding to a topic pattern; returns false if there was none.';

-- SQL, not PL/pgSQL: the argument and a result column share the name queue_name. A named queue
-- must exist (pgflow._queue's 42704).
CREATE FUNCTION pgflow.list_topic_bindings(queue_name text DEFAULT NULL)
RETURNS TABLE (pattern text, queue_name text, bound_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT b.pattern, q.queue_name, b.bound_at
      FROM pgflow.topic_bindings b JOIN pgflow.queues q ON q.queue_id = b.queue_id
     WHERE $1 IS NULL OR q.queue_id = (pgflow._queue($1)).queue_id
     ORDER BY q.queue_name, b.pattern;
$$;
COMMENT ON FUNCTION pgflow.list_topic_bindings(text) IS
'The topic bindings, of one queue or (NULL) of all, by queue name and pattern.';

-- The queues a routing key reaches, each once, in name order (the order the copies are sent in,
-- so that two publishers take the queues' locks in the same order). PL/pgSQL, which keeps its
-- plan: a SQL function with a SET clause is planned again at every call.
CREATE FUNCTION pgflow._topic_queues(routing_key text) RETURNS SETOF text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
        SELECT DISTINCT q.queue_name
          FROM pgflow.topic_bindings b JOIN pgflow.queues q ON q.queue_id = b.queue_id
         WHERE pgflow._topic_matches(b.pattern, _topic_queues.routing_key)
         ORDER BY 1;
END
$$;

CREATE FUNCTION pgflow.publish(routing_key text, message jsonb, delay integer DEFAULT 0,
                               priority integer DEFAULT 0, headers jsonb DEFAULT NULL,
                               dedup_key text DEFAULT NULL, group_id text DEFAULT NULL)
RETURNS TABLE (queue_name text, msg_id bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    target text;
BEGIN
    PERFORM pgflow._check_topic(publish.routing_key, 'routing_key', false);
    PERFORM pgflow._check_message(publish.message);
    PERFORM pgflow._check_send(publish.delay, publish.priority, publish.headers);
    PERFORM pgflow._check_dedup_key(publish.dedup_key);
    PERFORM pgflow._check_group_id(publish.group_id);
    FOR target IN SELECT pgflow._topic_queues(publish.routing_key) LOOP
        queue_name := target;
        msg_id := pgflow.send(target, publish.message, publish.delay, publish.priority, publish.headers,
                              publish.dedup_key, publish.group_id);
        RETURN NEXT;
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgflow.publish(text, jsonb, integer, integer, jsonb, text, text) IS
'Send a copy of a message to every queue bound to a pattern matching routing_key (dot-separated words, no wildcards), in this transaction: all copies or none. Returns one row per queue reached (queue_name, msg_id), by queue name; none if no binding matches. Queues with notify on announce the copy as for send. dedup_key: per queue, as for send (a queue already holding a live message with that key returns its msg_id). group_id: each copy joins that message group of its queue.';

CREATE FUNCTION pgflow.publish_batch(routing_key text, messages jsonb[], delay integer DEFAULT 0,
                                     priority integer DEFAULT 0, group_id text DEFAULT NULL)
RETURNS TABLE (queue_name text, msg_id bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    target text;
BEGIN
    PERFORM pgflow._check_topic(publish_batch.routing_key, 'routing_key', false);
    PERFORM pgflow._check_send(publish_batch.delay, publish_batch.priority, NULL);
    PERFORM pgflow._check_group_id(publish_batch.group_id);
    FOR target IN SELECT pgflow._topic_queues(publish_batch.routing_key) LOOP
        RETURN QUERY SELECT target, id
                       FROM pgflow.send_batch(target, publish_batch.messages, publish_batch.delay,
                                              publish_batch.priority, NULL, publish_batch.group_id) id;
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgflow.publish_batch(text, jsonb[], integer, integer, text) IS
'publish for several messages: each queue bound to a pattern matching routing_key gets the whole batch through send_batch, in this transaction. Returns (queue_name, msg_id) per message copy, by queue name and then in array order. group_id: each queue''s copies join that message group, in array order.';
