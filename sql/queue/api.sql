-- Queue layer: the public API (send, read, delete, archive, ...) and its internal helpers.
--
-- Conventions of every function here:
-- * search_path is pinned and every object is schema-qualified, so no caller's objects can be
--   substituted; public functions are SECURITY DEFINER so roles need EXECUTE only (finalize.sql).
-- * Hot-path functions also pin enable_seqscan = off and jit = off: PL/pgSQL keeps each
--   statement's plan for the life of the backend, and a plan first made while a queue table
--   was empty would otherwise be a sequential scan that slows down as the table fills.
-- * Arguments are checked before anything is written: bad input raises a specific SQLSTATE
--   (22004 null, 22023 invalid value, 42622 name too long, 42704 unknown queue, 54000 over a
--   limit) and, the function being one statement, changes nothing.
-- * Parameter names collide with column names, hence `#variable_conflict use_column` and
--   parameters referred to as function_name.parameter.

-- The queue row for queue_name, or a clear error: a malformed name is reported as such, a
-- well-formed unknown one as 42704.
CREATE FUNCTION pgflow._queue(queue_name text) RETURNS pgflow.queues
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
BEGIN
    SELECT * INTO q FROM pgflow.queues WHERE queue_name = _queue.queue_name;
    IF NOT FOUND THEN
        PERFORM pgflow._check_name(_queue.queue_name, 'queue_name');
        RAISE EXCEPTION 'queue "%" does not exist', _queue.queue_name
            USING ERRCODE = '42704', HINT = 'Create it with pgflow.create_queue(queue_name).';
    END IF;
    RETURN q;
END
$$;

-- The queue row for a function of the queue API that moves messages (`operation` names it):
-- pgflow._queue's errors, and 55000 for a flow's queue, whose messages only the workflow
-- functions move (the rule is pgflow._check_unmanaged's, in src/queue/).
CREATE FUNCTION pgflow._api_queue(queue_name text, operation text) RETURNS pgflow.queues
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q pgflow.queues;
BEGIN
    q := pgflow._queue(queue_name);
    PERFORM pgflow._check_unmanaged(q.queue_name, q.managed_by, operation);
    RETURN q;
END
$$;

-- pgflow._check_lease(vt, qty) and pgflow._check_poll(max_poll_seconds, poll_interval_ms),
-- the checks shared by the functions that lease messages and those that wait for them, are in
-- Rust (src/queue/), where the hot path calls the same code directly.

-- Checks shared by the send functions, in Rust (src/queue/), where pgflow.send calls the same
-- code directly: pgflow._check_message (22004 for a NULL message) and pgflow._check_send (a
-- send's delay, priority and headers).
CREATE FUNCTION pgflow._check_message(message jsonb) RETURNS void
LANGUAGE c IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgflow_check_message';

CREATE FUNCTION pgflow._check_send(delay_seconds integer, priority integer, headers jsonb) RETURNS void
LANGUAGE c IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgflow_check_send';

-- Remember that a queue has messages becoming visible at `due`, so the maintenance worker wakes
-- its readers and notifies its listeners then. Rounded up to 100 ms: one row per burst. In the
-- last 100 ms before the largest timestamptz, rounding up would leave the type's range: such a
-- time is kept as it is.
CREATE FUNCTION pgflow._due_at(queue_id bigint, due timestamptz) RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO pgflow.due_wakeups (queue_id, due_at)
    VALUES ($1, CASE WHEN $2 > timestamptz '294276-12-31 23:59:59.9+00' THEN $2
                     ELSE to_timestamp(ceil(extract(epoch FROM $2) * 10) / 10) END)
    ON CONFLICT DO NOTHING;
$$;

---------------------------------------------------------------------------------------------
-- Managing queues
---------------------------------------------------------------------------------------------

CREATE FUNCTION pgflow.create_queue(
    queue_name text,
    max_retries integer DEFAULT 3,
    retry_delay_ms integer DEFAULT 1000,
    max_retry_delay_ms integer DEFAULT 3600000,
    retry_jitter double precision DEFAULT 0,
    notify boolean DEFAULT false
) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
    new_id bigint;
    seq_name text;
    differing text;
BEGIN
    PERFORM pgflow._check_name(create_queue.queue_name, 'queue_name');
    PERFORM pgflow._check_queue_options(create_queue.max_retries, create_queue.retry_delay_ms,
        create_queue.max_retry_delay_ms, create_queue.retry_jitter, create_queue.notify);
    PERFORM pgflow._lock_queue_name(create_queue.queue_name, true);
    SELECT * INTO q FROM pgflow.queues WHERE queue_name = create_queue.queue_name;
    IF NOT FOUND THEN
        -- The sequence is named after the queue's id, never its name: nothing a user typed is
        -- spliced into SQL text.
        new_id := nextval(pg_get_serial_sequence('pgflow.queues', 'queue_id')::regclass);
        seq_name := 'queue_' || new_id::text || '_msg_seq';
        -- The schema outlives DROP EXTENSION, and so do the sequences of its queues; queue ids
        -- then start again at 1. A sequence of this name that no queue uses is such a leftover.
        IF to_regclass('pgflow.' || quote_ident(seq_name)) IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM pgflow.queues
                            WHERE msg_seq = to_regclass('pgflow.' || quote_ident(seq_name))) THEN
            EXECUTE format('DROP SEQUENCE pgflow.%I', seq_name);
        END IF;
        EXECUTE format('CREATE SEQUENCE pgflow.%I AS bigint', seq_name);
        INSERT INTO pgflow.queues (queue_id, queue_name, msg_seq, max_retries, retry_delay_ms,
                                   max_retry_delay_ms, retry_jitter, notify)
        OVERRIDING SYSTEM VALUE
        VALUES (new_id, create_queue.queue_name, ('pgflow.' || seq_name)::regclass,
                create_queue.max_retries, create_queue.retry_delay_ms,
                create_queue.max_retry_delay_ms, create_queue.retry_jitter, create_queue.notify)
        ON CONFLICT (queue_name) DO NOTHING;
        IF FOUND THEN
            RETURN true;
        END IF;
        -- A concurrent create_queue of the same name committed first: theirs stands.
        EXECUTE format('DROP SEQUENCE pgflow.%I', seq_name);
        SELECT * INTO q FROM pgflow.queues WHERE queue_name = create_queue.queue_name;
    END IF;
    -- The queue exists: the same call is a no-op, a call asking for other options an error
    -- (as for create_flow), never a silent success that keeps options the caller did not ask for.
    SELECT string_agg(format('%s %s (asked: %s)', o.name, o.has, o.asked), ', ' ORDER BY o.n)
      INTO differing
      FROM (VALUES (1, 'max_retries', q.max_retries::text, create_queue.max_retries::text),
                   (2, 'retry_delay_ms', q.retry_delay_ms::text, create_queue.retry_delay_ms::text),
                   (3, 'max_retry_delay_ms', q.max_retry_delay_ms::text, create_queue.max_retry_delay_ms::text),
                   (4, 'retry_jitter', q.retry_jitter::text, create_queue.retry_jitter::text),
                   (5, 'notify', q.notify::text, create_queue.notify::text)) o(n, name, has, asked)
     WHERE o.has IS DISTINCT FROM o.asked;
    IF differing IS NOT NULL THEN
        RAISE EXCEPTION 'queue "%" already exists with other options', create_queue.queue_name
            USING ERRCODE = '42710',
                  DETAIL = format('It has %s.', differing),
                  HINT = 'Change a queue''s options with pgflow.alter_queue; create_queue with the options the queue has is a no-op.';
    END IF;
    RETURN false;
END
$$;
COMMENT ON FUNCTION pgflow.create_queue(text, integer, integer, integer, double precision, boolean) IS
'Create a queue. Returns true if created; false, changing nothing, if a queue of that name already exists with the same options; fails with 42710 naming the differing options if it exists with others (change them with pgflow.alter_queue). Names: ASCII letters, digits, underscore, 1-48 bytes. max_retries: deliveries after the first before a message is dead-lettered (0-100); retry_delay_ms: first backoff, doubled per attempt up to max_retry_delay_ms; retry_jitter: 0-1, fraction of the backoff randomly taken off; notify: announce every committed send on pgflow.queue_channel(queue_name).';

CREATE FUNCTION pgflow._check_queue_options(
    max_retries integer, retry_delay_ms integer, max_retry_delay_ms integer,
    retry_jitter double precision, notify boolean
) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF max_retries IS NULL THEN
        RAISE EXCEPTION 'max_retries must not be null' USING ERRCODE = '22004';
    ELSIF max_retries < 0 OR max_retries > 100 THEN
        RAISE EXCEPTION 'max_retries must be between 0 and 100, not %', max_retries USING ERRCODE = '22023',
            HINT = '0 dead-letters a message at its first failure.';
    END IF;
    IF retry_delay_ms IS NULL THEN
        RAISE EXCEPTION 'retry_delay_ms must not be null' USING ERRCODE = '22004';
    ELSIF retry_delay_ms < 0 OR retry_delay_ms > 86400000 THEN
        RAISE EXCEPTION 'retry_delay_ms must be between 0 and 86400000 (one day), not %', retry_delay_ms
            USING ERRCODE = '22023';
    END IF;
    IF max_retry_delay_ms IS NULL THEN
        RAISE EXCEPTION 'max_retry_delay_ms must not be null' USING ERRCODE = '22004';
    ELSIF max_retry_delay_ms < 0 OR max_retry_delay_ms > 604800000 THEN
        RAISE EXCEPTION 'max_retry_delay_ms must be between 0 and 604800000 (one week), not %', max_retry_delay_ms
            USING ERRCODE = '22023';
    END IF;
    IF retry_jitter IS NULL THEN
        RAISE EXCEPTION 'retry_jitter must not be null' USING ERRCODE = '22004';
    ELSIF NOT (retry_jitter >= 0 AND retry_jitter <= 1) THEN
        RAISE EXCEPTION 'retry_jitter must be between 0 and 1, not %', retry_jitter USING ERRCODE = '22023';
    END IF;
    IF notify IS NULL THEN
        RAISE EXCEPTION 'notify must not be null' USING ERRCODE = '22004';
    END IF;
END
$$;

-- The alert thresholds of pgflow.queue_health: 0 (none) or a positive bound.
CREATE FUNCTION pgflow._check_alerts(alert_dlq_depth integer, alert_oldest_age integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF alert_dlq_depth IS NULL THEN
        RAISE EXCEPTION 'alert_dlq_depth must not be null' USING ERRCODE = '22004';
    ELSIF alert_dlq_depth < 0 OR alert_dlq_depth > 1000000000 THEN
        RAISE EXCEPTION 'alert_dlq_depth must be between 0 and 1000000000, not %', alert_dlq_depth
            USING ERRCODE = '22023', HINT = '0 turns the alert off.';
    END IF;
    IF alert_oldest_age IS NULL THEN
        RAISE EXCEPTION 'alert_oldest_age must not be null' USING ERRCODE = '22004';
    ELSIF alert_oldest_age < 0 OR alert_oldest_age > 31536000 THEN
        RAISE EXCEPTION 'alert_oldest_age must be between 0 and 31536000 seconds, not %', alert_oldest_age
            USING ERRCODE = '22023', HINT = '0 turns the alert off.';
    END IF;
END
$$;

CREATE FUNCTION pgflow.alter_queue(
    queue_name text,
    max_retries integer DEFAULT NULL,
    retry_delay_ms integer DEFAULT NULL,
    max_retry_delay_ms integer DEFAULT NULL,
    retry_jitter double precision DEFAULT NULL,
    notify boolean DEFAULT NULL,
    alert_dlq_depth integer DEFAULT NULL,
    alert_oldest_age integer DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
BEGIN
    q := pgflow._api_queue(alter_queue.queue_name, 'alter_queue');
    q.max_retries := coalesce(alter_queue.max_retries, q.max_retries);
    q.retry_delay_ms := coalesce(alter_queue.retry_delay_ms, q.retry_delay_ms);
    q.max_retry_delay_ms := coalesce(alter_queue.max_retry_delay_ms, q.max_retry_delay_ms);
    q.retry_jitter := coalesce(alter_queue.retry_jitter, q.retry_jitter);
    q.notify := coalesce(alter_queue.notify, q.notify);
    q.alert_dlq_depth := coalesce(alter_queue.alert_dlq_depth, q.alert_dlq_depth);
    q.alert_oldest_age := coalesce(alter_queue.alert_oldest_age, q.alert_oldest_age);
    PERFORM pgflow._check_queue_options(q.max_retries, q.retry_delay_ms, q.max_retry_delay_ms,
                                        q.retry_jitter, q.notify);
    PERFORM pgflow._check_alerts(q.alert_dlq_depth, q.alert_oldest_age);
    UPDATE pgflow.queues
       SET max_retries = q.max_retries, retry_delay_ms = q.retry_delay_ms,
           max_retry_delay_ms = q.max_retry_delay_ms, retry_jitter = q.retry_jitter, notify = q.notify,
           alert_dlq_depth = q.alert_dlq_depth, alert_oldest_age = q.alert_oldest_age
     WHERE queue_id = q.queue_id;
END
$$;
COMMENT ON FUNCTION pgflow.alter_queue(text, integer, integer, integer, double precision, boolean, integer, integer) IS
'Change options of an existing queue; a NULL argument keeps the current value. Takes effect for messages read or failed from then on. alert_dlq_depth (dead-lettered messages) and alert_oldest_age (seconds the oldest visible message has waited) are the thresholds of pgflow.queue_health: warning at the threshold, critical at twice it; 0 turns an alert off.';

CREATE FUNCTION pgflow.drop_queue(queue_name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
BEGIN
    PERFORM pgflow._check_name(drop_queue.queue_name, 'queue_name');
    PERFORM pgflow._lock_queue_name(drop_queue.queue_name, true);
    SELECT * INTO q FROM pgflow.queues WHERE queue_name = drop_queue.queue_name FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pgflow._check_unmanaged(q.queue_name, q.managed_by, 'drop_queue');
    DELETE FROM pgflow.messages WHERE queue_id = q.queue_id;
    DELETE FROM pgflow.archive WHERE queue_id = q.queue_id;
    DELETE FROM pgflow.due_wakeups WHERE queue_id = q.queue_id;
    DELETE FROM pgflow.queues WHERE queue_id = q.queue_id;
    EXECUTE format('DROP SEQUENCE %s', q.msg_seq::text);
    -- Dead-lettered messages stay: they can be retried once a queue of that name exists again.
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgflow.drop_queue(text) IS
'Drop a queue with its live and archived messages; waits for transactions sending to it, and takes their messages along. Returns false if no such queue. Its dead-lettered messages are kept (pgflow.list_dlq_messages) and can be retried into a queue of the same name created later.';

CREATE FUNCTION pgflow.purge_queue(queue_name text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
    n bigint;
BEGIN
    q := pgflow._api_queue(purge_queue.queue_name, 'purge_queue');
    DELETE FROM pgflow.messages WHERE queue_id = q.queue_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM pgflow.due_wakeups WHERE queue_id = q.queue_id;
    RETURN n;
END
$$;
COMMENT ON FUNCTION pgflow.purge_queue(text) IS
'Delete every live message of a queue (waiting, delayed or leased); archive and dead-letter queue are untouched. Returns how many were deleted.';

CREATE FUNCTION pgflow.list_queues()
RETURNS TABLE (queue_name text, created_at timestamptz, max_retries integer, retry_delay_ms integer,
               max_retry_delay_ms integer, retry_jitter double precision, notify boolean)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT queue_name, created_at, max_retries, retry_delay_ms, max_retry_delay_ms, retry_jitter, notify
      FROM pgflow.queues ORDER BY queue_name;
$$;
COMMENT ON FUNCTION pgflow.list_queues() IS 'Every queue with its creation time and options, by name.';

---------------------------------------------------------------------------------------------
-- Sending
---------------------------------------------------------------------------------------------

-- The one insert path of single messages, in Rust (src/queue/ insert_message, which send uses
-- too): the message check, the insert, and a later visibility remembered for the maintenance
-- worker. Announcements and wake-ups happen in the row trigger on pgflow.messages
-- (sql/queue/triggers.sql), so every path that inserts is covered.
CREATE FUNCTION pgflow._send(q pgflow.queues, message jsonb, visible_at timestamptz, priority integer, headers jsonb,
                             dedup_key text DEFAULT NULL, group_id text DEFAULT NULL)
RETURNS bigint
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'pgflow_send_internal';
-- send, read, archive and delete of one message, and ack_and_read: the hot path, in Rust
-- (src/queue/), each one statement planned once per backend. Their argument checks raise
-- the same errors as the PL/pgSQL helpers above. They carry no SET clauses: src/pg/spi.rs parses
-- and plans their statements under a fixed search path and with sequential scans off, so the
-- plans are index plans whatever the caller's settings and whatever the tables held when they
-- were planned, without the cost of a SET scope at every call.
CREATE FUNCTION pgflow.send(queue_name text, message jsonb, delay integer DEFAULT 0,
                            priority integer DEFAULT 0, headers jsonb DEFAULT NULL,
                            dedup_key text DEFAULT NULL, group_id text DEFAULT NULL)
RETURNS bigint
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_send';
COMMENT ON FUNCTION pgflow.send(text, jsonb, integer, integer, jsonb, text, text) IS
'Send a message; returns its msg_id. It becomes readable when the sending transaction commits and delay seconds have passed. Higher priority is delivered first, FIFO by msg_id within a priority. headers: a JSON object or null. dedup_key (1-128 bytes): while a message sent with that key is live in the queue (visible, delayed or leased), a send with the same key sends nothing and returns that message''s msg_id; concurrent sends of one key send one message. group_id (1-128 bytes): messages of one group are delivered in send order, one at a time (a later one waits while an earlier one is live: visible, leased, delayed or waiting out a retry); other groups and ungrouped messages are not held up.';

CREATE FUNCTION pgflow.send(queue_name text, message jsonb, delay timestamptz,
                            priority integer DEFAULT 0, headers jsonb DEFAULT NULL,
                            dedup_key text DEFAULT NULL, group_id text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
BEGIN
    IF delay IS NULL THEN
        RAISE EXCEPTION 'delay must not be null' USING ERRCODE = '22004',
            HINT = 'Pass the time at which the message becomes readable.';
    ELSIF NOT isfinite(delay) THEN
        RAISE EXCEPTION 'delay must be a finite time, not %', delay USING ERRCODE = '22023',
            HINT = 'Pass the time at which the message becomes readable.';
    END IF;
    PERFORM pgflow._check_send(0, priority, headers);
    PERFORM pgflow._lock_queue_name(queue_name, false);
    RETURN pgflow._send(pgflow._api_queue(queue_name, 'send'), message, delay, priority, headers, dedup_key,
                        group_id);
END
$$;
COMMENT ON FUNCTION pgflow.send(text, jsonb, timestamptz, integer, jsonb, text, text) IS
'Send a message that becomes readable at the given time (a finite timestamptz; a time in the past means now); returns its msg_id. dedup_key and group_id as for send with a delay in seconds.';

CREATE FUNCTION pgflow._send_batch(q pgflow.queues, messages jsonb[], visible_at timestamptz,
                                   priority integer, headers jsonb[], group_id text DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    n integer := cardinality(messages);
    bad integer;
BEGIN
    IF messages IS NULL THEN
        RAISE EXCEPTION 'messages must not be null' USING ERRCODE = '22004';
    ELSIF n = 0 THEN
        RAISE EXCEPTION 'messages must not be empty' USING ERRCODE = '22023',
            HINT = 'Send at least one message.';
    ELSIF n > pgflow._max_batch_size() THEN
        RAISE EXCEPTION 'messages holds % messages, more than the batch limit of %', n, pgflow._max_batch_size()
            USING ERRCODE = '54000', HINT = 'Split the batch, or raise pgflow.max_batch_size.';
    ELSIF array_ndims(messages) > 1 THEN
        RAISE EXCEPTION 'messages must be a one-dimensional array' USING ERRCODE = '22023';
    END IF;
    bad := array_position(messages, NULL);
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'messages[%] is null', bad USING ERRCODE = '22004';
    END IF;
    IF headers IS NOT NULL THEN
        IF array_ndims(headers) > 1 THEN
            RAISE EXCEPTION 'headers must be a one-dimensional array' USING ERRCODE = '22023';
        ELSIF cardinality(headers) <> n THEN
            RAISE EXCEPTION 'headers has % elements but messages has %', cardinality(headers), n
                USING ERRCODE = '22023', HINT = 'Give one headers object (or null) per message.';
        END IF;
        SELECT i INTO bad FROM unnest(headers) WITH ORDINALITY AS h(v, i)
         WHERE v IS NOT NULL AND jsonb_typeof(v) <> 'object' LIMIT 1;
        IF bad IS NOT NULL THEN
            RAISE EXCEPTION 'headers[%] must be a JSON object or null', bad USING ERRCODE = '22023';
        END IF;
    END IF;
    IF visible_at > clock_timestamp() THEN
        PERFORM pgflow._due_at(q.queue_id, visible_at);
    END IF;
    RETURN QUERY
    INSERT INTO pgflow.messages (queue_id, msg_id, vt, priority, message, headers, group_id)
    -- headers are matched by position, whatever the arrays' lower bounds ('[0:1]={...}').
    SELECT q.queue_id, nextval(q.msg_seq), visible_at, _send_batch.priority, m.body,
           headers[array_lower(headers, 1) + m.i - 1], _send_batch.group_id
      FROM unnest(messages) WITH ORDINALITY AS m(body, i)
     ORDER BY m.i
    RETURNING msg_id;
END
$$;

CREATE FUNCTION pgflow.send_batch(queue_name text, messages jsonb[], delay integer DEFAULT 0,
                                  priority integer DEFAULT 0, headers jsonb[] DEFAULT NULL,
                                  group_id text DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
BEGIN
    PERFORM pgflow._check_send(delay, priority, NULL);
    PERFORM pgflow._check_group_id(group_id);
    PERFORM pgflow._lock_queue_name(queue_name, false);
    RETURN QUERY SELECT pgflow._send_batch(pgflow._api_queue(queue_name, 'send_batch'), messages,
                        clock_timestamp() + make_interval(secs => delay), priority, headers, group_id);
END
$$;
COMMENT ON FUNCTION pgflow.send_batch(text, jsonb[], integer, integer, jsonb[], text) IS
'Send several messages in one statement; returns their msg_ids in array order (ids ascend in that order, so FIFO keeps it). At most pgflow.max_batch_size (default 10000) messages; headers, if given, has one object or null per message. group_id: all of them in that message group, in array order.';

CREATE FUNCTION pgflow.send_batch(queue_name text, messages jsonb[], delay timestamptz,
                                  priority integer DEFAULT 0, headers jsonb[] DEFAULT NULL,
                                  group_id text DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
BEGIN
    IF delay IS NULL THEN
        RAISE EXCEPTION 'delay must not be null' USING ERRCODE = '22004';
    ELSIF NOT isfinite(delay) THEN
        RAISE EXCEPTION 'delay must be a finite time, not %', delay USING ERRCODE = '22023';
    END IF;
    PERFORM pgflow._check_send(0, priority, NULL);
    PERFORM pgflow._check_group_id(group_id);
    PERFORM pgflow._lock_queue_name(queue_name, false);
    RETURN QUERY SELECT pgflow._send_batch(pgflow._api_queue(queue_name, 'send_batch'), messages, delay, priority, headers,
                                           group_id);
END
$$;
COMMENT ON FUNCTION pgflow.send_batch(text, jsonb[], timestamptz, integer, jsonb[], text) IS
'Send several messages in one statement, readable from the given time (a finite timestamptz; a time in the past means now); returns their msg_ids in array order. group_id: all of them in that message group, in array order.';

---------------------------------------------------------------------------------------------
-- Reading
---------------------------------------------------------------------------------------------

CREATE FUNCTION pgflow.read(queue_name text, vt integer, qty integer DEFAULT 1)
RETURNS SETOF pgflow.message_record
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_read';
COMMENT ON FUNCTION pgflow.read(text, integer, integer) IS
'Lease up to qty visible messages for vt seconds, highest priority first, then FIFO. Each row''s (msg_id, read_ct) identifies the delivery: pass read_ct to delete/archive/set_vt/nack so a late consumer whose lease expired cannot act on a redelivered message. Never blocks; concurrent readers get distinct messages.';

CREATE FUNCTION pgflow.read_with_poll(queue_name text, vt integer, qty integer DEFAULT 1,
                                      max_poll_seconds integer DEFAULT 5, poll_interval_ms integer DEFAULT 100)
RETURNS SETOF pgflow.message_record
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
DECLARE
    q pgflow.queues;
    deadline timestamptz;
    epoch bigint;
    left_ms integer;
BEGIN
    PERFORM pgflow._check_lease(vt, qty);
    PERFORM pgflow._check_poll(max_poll_seconds, poll_interval_ms);
    q := pgflow._queue(queue_name);
    deadline := clock_timestamp() + make_interval(secs => max_poll_seconds);
    LOOP
        -- Taken before looking, so a send committing between the look and the wait wakes us.
        epoch := pgflow._wake_epoch(q.queue_id);
        -- the claim of pgflow.read (src/queue/): one home for the lease and DLQ rules
        RETURN QUERY SELECT * FROM pgflow.read(q.queue_name, vt, qty);
        IF FOUND THEN
            RETURN;
        END IF;
        left_ms := ceil(extract(epoch FROM deadline - clock_timestamp()) * 1000);
        EXIT WHEN left_ms <= 0;
        PERFORM pgflow._wait_for_wake(q.queue_id, epoch, least(left_ms, poll_interval_ms));
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgflow.read_with_poll(text, integer, integer, integer, integer) IS
'Like pgflow.read, but waits up to max_poll_seconds for messages. With pgflow in shared_preload_libraries it wakes as soon as a send to the queue commits; otherwise it looks again every poll_interval_ms (which also bounds how late it notices expired leases and due delayed messages). Returns nothing if none came in time.';

CREATE PROCEDURE pgflow.wait_for_messages(queue_name text, max_poll_seconds integer DEFAULT 5,
                                          poll_interval_ms integer DEFAULT 100)
LANGUAGE c
AS 'MODULE_PATHNAME', 'pgflow_wait_for_messages';
COMMENT ON PROCEDURE pgflow.wait_for_messages(text, integer, integer) IS
'Wait up to max_poll_seconds until the queue (or a flow''s queue, named by its flow slug) has a message to read, holding no snapshot while waiting, so VACUUM goes on; then call pgflow.read or pgflow.poll_for_tasks. CALL it outside a transaction block (it commits between its looks). Wakes at the commit of a send with pgflow preloaded, else looks every poll_interval_ms.';

-- pop: the claim of read (src/queue/, delivery order, the dead-letter threshold), then the
-- claimed messages deleted in the same transaction.
CREATE FUNCTION pgflow.pop(queue_name text, qty integer DEFAULT 1)
RETURNS SETOF pgflow.message_record
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_pop';
COMMENT ON FUNCTION pgflow.pop(text, integer) IS
'Read and delete up to qty visible messages at once (at-most-once delivery: a consumer that fails after pop has lost the message).';

---------------------------------------------------------------------------------------------
-- Acknowledging and leases
---------------------------------------------------------------------------------------------

-- ids_arg and cts_arg: the caller's names of the two arguments, for the error messages. The
-- rule is check_ids in src/queue/, which the Rust hot path (ack_and_read) calls directly.
CREATE FUNCTION pgflow._check_ids(msg_ids bigint[], read_cts integer[],
                                  ids_arg text DEFAULT 'msg_ids', cts_arg text DEFAULT 'read_cts')
RETURNS void
LANGUAGE c IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pgflow_check_ids';

CREATE FUNCTION pgflow.delete(queue_name text, msg_id bigint, read_ct integer DEFAULT NULL)
RETURNS boolean
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_delete_one';
COMMENT ON FUNCTION pgflow.delete(text, bigint, integer) IS
'Delete a message (acknowledge it). Returns false if there is no such message, or if read_ct is given and the message has been delivered again since (the caller''s lease is stale).';

CREATE FUNCTION pgflow.delete(queue_name text, msg_ids bigint[], read_cts integer[] DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_delete_many';
COMMENT ON FUNCTION pgflow.delete(text, bigint[], integer[]) IS
'Delete several messages; returns the ids deleted. With read_cts (one per id, null for any), a message whose read_ct differs is left alone.';

CREATE FUNCTION pgflow.archive(queue_name text, msg_id bigint, read_ct integer DEFAULT NULL)
RETURNS boolean
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_archive_one';
COMMENT ON FUNCTION pgflow.archive(text, bigint, integer) IS
'Move a message to the archive (acknowledge it, keeping it queryable in pgflow.archive). Returns false if there is no such message or read_ct is stale.';

CREATE FUNCTION pgflow.archive(queue_name text, msg_ids bigint[], read_cts integer[] DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_archive_many';
COMMENT ON FUNCTION pgflow.archive(text, bigint[], integer[]) IS
'Archive several messages; returns the ids archived. With read_cts, a message whose read_ct differs is left alone.';

CREATE FUNCTION pgflow.ack_and_read(queue_name text, ack_msg_ids bigint[], vt integer, qty integer DEFAULT 1,
                                    archive boolean DEFAULT true, ack_read_cts integer[] DEFAULT NULL)
RETURNS SETOF pgflow.message_record
LANGUAGE c VOLATILE SECURITY DEFINER
AS 'MODULE_PATHNAME', 'pgflow_ack_and_read';
COMMENT ON FUNCTION pgflow.ack_and_read(text, bigint[], integer, integer, boolean, integer[]) IS
'Acknowledge the messages a consumer finished (archive, or delete when archive is false; ack_read_cts as for archive) and lease its next ones, in one statement and one commit. Returns the new leases as pgflow.read does.';

CREATE FUNCTION pgflow.set_vt(queue_name text, msg_id bigint, vt integer, read_ct integer DEFAULT NULL)
RETURNS SETOF pgflow.message_record
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
BEGIN
    IF set_vt.msg_id IS NULL THEN
        RAISE EXCEPTION 'msg_id must not be null' USING ERRCODE = '22004';
    END IF;
    PERFORM pgflow._check_lease(set_vt.vt, 1);
    q := pgflow._api_queue(set_vt.queue_name, 'set_vt');
    RETURN QUERY
    UPDATE pgflow.messages m
       SET vt = clock_timestamp() + make_interval(secs => set_vt.vt)
     WHERE m.queue_id = q.queue_id AND m.msg_id = set_vt.msg_id
       AND (set_vt.read_ct IS NULL OR m.read_ct = set_vt.read_ct)
    RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.vt, m.message, m.headers, m.priority;
END
$$;
COMMENT ON FUNCTION pgflow.set_vt(text, bigint, integer, integer) IS
'Set a message''s visibility timeout to vt seconds from now (extend or end a lease). Returns the updated message, or no row if there is no such message or read_ct is stale.';

---------------------------------------------------------------------------------------------
-- Inspection
---------------------------------------------------------------------------------------------

-- One clock reading for the whole count, so visible + in_flight + delayed = depth.
CREATE FUNCTION pgflow._stats(q pgflow.queues) RETURNS pgflow.queue_stats
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT q.queue_name,
           count(m.msg_id),
           count(m.msg_id) FILTER (WHERE m.vt <= t.now),
           count(m.msg_id) FILTER (WHERE m.vt > t.now AND m.read_ct > 0),
           count(m.msg_id) FILTER (WHERE m.vt > t.now AND m.read_ct = 0),
           (SELECT count(*) FROM pgflow.archive a WHERE a.queue_id = q.queue_id),
           (SELECT count(*) FROM pgflow.dlq d WHERE d.queue_name = q.queue_name),
           extract(epoch FROM t.now - min(m.enqueued_at))::double precision,
           extract(epoch FROM t.now - max(m.enqueued_at))::double precision,
           coalesce(pg_sequence_last_value(q.msg_seq), 0),
           t.now,
           coalesce(extract(epoch FROM t.now - min(m.vt) FILTER (WHERE m.vt <= t.now))::double precision, 0)
      FROM (SELECT clock_timestamp() AS now) t
      LEFT JOIN pgflow.messages m ON m.queue_id = q.queue_id
     GROUP BY t.now;
$$;

-- VOLATILE, so that the look-up after the lock takes a new snapshot.
CREATE FUNCTION pgflow.get_queue_stats(queue_name text) RETURNS pgflow.queue_stats
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgflow._lock_queue_name(queue_name, false);
    RETURN pgflow._stats(pgflow._queue(queue_name));
END
$$;
COMMENT ON FUNCTION pgflow.get_queue_stats(text) IS
'Statistics of one queue: depth (live messages), visible now, in_flight (leased, or waiting out a retry backoff), delayed (never delivered, not yet due), archived, dead_lettered, age in seconds of the oldest and newest live message, total_sent (msg_ids issued: like pgmq, a rolled-back send counts), the time of the count, and oldest_visible_age_sec: how long the oldest visible message has been waiting to be read (0 if none).';

-- A queue whose drop_queue is in progress is passed over rather than waited for: waiting while
-- holding the locks of the queues already counted could deadlock with a transaction dropping
-- several queues.
CREATE FUNCTION pgflow.get_queue_stats() RETURNS SETOF pgflow.queue_stats
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    name text;
    q pgflow.queues;
BEGIN
    FOR name IN SELECT x.queue_name FROM pgflow.queues x ORDER BY x.queue_name LOOP
        CONTINUE WHEN NOT pgflow._try_lock_queue_name(name);
        SELECT * INTO q FROM pgflow.queues x WHERE x.queue_name = name;
        IF FOUND THEN
            RETURN NEXT pgflow._stats(q);
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgflow.get_queue_stats() IS 'pgflow.get_queue_stats(queue_name) for every queue, by name (a queue being dropped at that moment is left out).';

CREATE FUNCTION pgflow.list_pending_messages(queue_name text, lim integer DEFAULT 100)
RETURNS TABLE (msg_id bigint, state text, read_ct integer, priority integer, enqueued_at timestamptz,
               vt timestamptz, message jsonb, headers jsonb, errors jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
BEGIN
    IF lim IS NULL THEN
        RAISE EXCEPTION 'lim must not be null' USING ERRCODE = '22004';
    ELSIF lim < 1 OR lim > 100000 THEN
        RAISE EXCEPTION 'lim must be between 1 and 100000, not %', lim USING ERRCODE = '22023';
    END IF;
    q := pgflow._queue(list_pending_messages.queue_name);
    RETURN QUERY
    SELECT m.msg_id,
           CASE WHEN m.vt <= clock_timestamp() THEN 'visible'
                WHEN m.read_ct > 0 THEN 'in_flight'
                ELSE 'delayed' END,
           m.read_ct, m.priority, m.enqueued_at, m.vt, m.message, m.headers, m.errors
      FROM pgflow.messages m
     WHERE m.queue_id = q.queue_id
     ORDER BY m.priority DESC, m.msg_id
     LIMIT lim;
END
$$;
COMMENT ON FUNCTION pgflow.list_pending_messages(text, integer) IS
'The live messages of a queue in delivery order (priority, then msg_id), each with its state: visible, in_flight (leased or waiting for a retry) or delayed.';
