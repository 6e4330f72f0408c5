-- Queue layer: failed attempts, exponential backoff and the dead-letter queue.
--
-- A delivery is an attempt. A consumer reports failure with pgflow.nack; a consumer that dies
-- lets its lease expire, which counts as a failed attempt too. After max_retries + 1 deliveries
-- without an ack the message moves to pgflow.dlq, at the nack of the last attempt or at the
-- next read after its last lease expired. Each attempt's error is kept (truncated).

-- Longest error text kept per attempt, in characters.
CREATE FUNCTION pgflow._error_text(error text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN length($1) > 2000 THEN left($1, 2000) || '... (truncated)' ELSE $1 END;
$$;

-- Move message msg_id of queue q to the dead-letter queue; returns its dlq_id (NULL if it was
-- not there). error: the last attempt's error, or NULL when its lease expired unanswered.
CREATE FUNCTION pgflow._dead_letter(q pgflow.queues, msg_id bigint, error text) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    id bigint;
BEGIN
    WITH gone AS (
        DELETE FROM pgflow.messages m
         WHERE m.queue_id = q.queue_id AND m.msg_id = _dead_letter.msg_id
        RETURNING m.*
    )
    INSERT INTO pgflow.dlq (queue_name, msg_id, message, headers, priority, attempts, last_error, errors, enqueued_at)
    SELECT q.queue_name, g.msg_id, g.message, g.headers, g.priority, g.read_ct,
           coalesce(pgflow._error_text(error), 'visibility timeout expired without ack or nack'),
           -- the last attempt's lease ran out: its entry, unless the claim that found the message
           -- exhausted wrote it already (each earlier attempt has its own, see src/queue/)
           coalesce(g.errors, '[]'::jsonb) || CASE WHEN error IS NULL AND g.read_ct > 0 AND NOT coalesce(
               g.errors @> jsonb_build_array(jsonb_build_object('attempt', g.read_ct)), false)
               THEN jsonb_build_array(jsonb_build_object(
                   'attempt', g.read_ct, 'error', 'visibility timeout expired without ack or nack',
                   'at', clock_timestamp())) ELSE '[]'::jsonb END,
           g.enqueued_at
      FROM gone g
    RETURNING dlq_id INTO id;
    RETURN id;
END
$$;

-- The outcome of a nack. A named type rather than RETURNS TABLE: an output column msg_id would
-- clash with the parameter msg_id.
CREATE TYPE pgflow.nack_result AS (
    msg_id      bigint,
    outcome     text,
    attempt     integer,
    visible_at  timestamptz,
    dlq_id      bigint
);
COMMENT ON TYPE pgflow.nack_result IS 'pgflow: the outcome of pgflow.nack: retrying (with visible_at), dead_lettered (with dlq_id) or stale.';

CREATE FUNCTION pgflow.nack(queue_name text, msg_id bigint, error text DEFAULT NULL, read_ct integer DEFAULT NULL)
RETURNS pgflow.nack_result
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    q pgflow.queues;
    m record;
    delay_ms double precision;
    at timestamptz;
    entry jsonb;
BEGIN
    IF nack.msg_id IS NULL THEN
        RAISE EXCEPTION 'msg_id must not be null' USING ERRCODE = '22004';
    END IF;
    -- Shared lock first (see pgflow._lock_queue_name): a drop_queue committing meanwhile then
    -- shows as 42704 here, not as an error about the queue's vanished message sequence below.
    PERFORM pgflow._lock_queue_name(nack.queue_name, false);
    q := pgflow._api_queue(nack.queue_name, 'nack');
    SELECT mm.msg_id, mm.read_ct INTO m FROM pgflow.messages mm
     WHERE mm.queue_id = q.queue_id AND mm.msg_id = nack.msg_id
       FOR UPDATE;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM pgflow.archive a WHERE a.queue_id = q.queue_id AND a.msg_id = nack.msg_id)
           OR nack.msg_id BETWEEN 1 AND coalesce(pg_sequence_last_value(q.msg_seq), 0) THEN
            -- It existed: acked, archived or dead-lettered by someone else. A late nack is a no-op.
            RETURN ROW(nack.msg_id, 'stale', NULL, NULL, NULL)::pgflow.nack_result;
        END IF;
        RAISE EXCEPTION 'message % does not exist in queue "%"', nack.msg_id, q.queue_name
            USING ERRCODE = '42704', HINT = 'Pass the msg_id returned by pgflow.read.';
    END IF;
    IF nack.read_ct IS NOT NULL AND m.read_ct <> nack.read_ct THEN
        RETURN ROW(nack.msg_id, 'stale', m.read_ct, NULL, NULL)::pgflow.nack_result;
    END IF;
    IF m.read_ct = 0 THEN
        RAISE EXCEPTION 'message % of queue "%" has not been delivered', nack.msg_id, q.queue_name
            USING ERRCODE = '55000', HINT = 'Only a message returned by pgflow.read can be nacked.';
    END IF;
    entry := jsonb_build_object('attempt', m.read_ct, 'error', pgflow._error_text(nack.error), 'at', clock_timestamp());
    IF m.read_ct > q.max_retries THEN
        UPDATE pgflow.messages mm SET errors = coalesce(mm.errors, '[]'::jsonb) || jsonb_build_array(entry)
         WHERE mm.queue_id = q.queue_id AND mm.msg_id = nack.msg_id;
        RETURN ROW(nack.msg_id, 'dead_lettered', m.read_ct, NULL,
                   pgflow._dead_letter(q, nack.msg_id, coalesce(nack.error, 'nacked without an error')))::pgflow.nack_result;
    END IF;
    -- retry_delay_ms * 2^(attempt-1), capped, then up to retry_jitter of it taken off at random.
    delay_ms := least(q.retry_delay_ms * power(2::double precision, m.read_ct - 1), q.max_retry_delay_ms::double precision);
    delay_ms := delay_ms * (1 - q.retry_jitter * random());
    at := clock_timestamp() + make_interval(secs => delay_ms / 1000.0);
    UPDATE pgflow.messages mm
       SET vt = at, errors = coalesce(mm.errors, '[]'::jsonb) || jsonb_build_array(entry)
     WHERE mm.queue_id = q.queue_id AND mm.msg_id = nack.msg_id;
    IF delay_ms > 0 THEN
        PERFORM pgflow._due_at(q.queue_id, at);
    ELSE
        -- Due at once: no maintenance pass will announce it, so announce it here, at commit.
        PERFORM pgflow._on_commit_wake(q.queue_id);
        IF q.notify THEN
            PERFORM pgflow._on_commit_notify(pgflow.queue_channel(q.queue_name),
                jsonb_build_object('event', 'message_due', 'queue', q.queue_name));
        END IF;
    END IF;
    RETURN ROW(nack.msg_id, 'retrying', m.read_ct, at, NULL)::pgflow.nack_result;
END
$$;
COMMENT ON FUNCTION pgflow.nack(text, bigint, text, integer) IS
'Report a failed attempt. The message becomes visible again after retry_delay_ms * 2^(attempt-1) ms (capped by max_retry_delay_ms, less up to retry_jitter of it at random), or, if this was its last allowed delivery (max_retries + 1), moves to the dead-letter queue. Returns outcome retrying (with visible_at), dead_lettered (with dlq_id) or stale (read_ct no longer matches, or the message was already acked: nothing changed). The error text is kept with the message, truncated to 2000 characters.';

-- Rows of pgflow.dlq as they are (RETURNS TABLE would clash: its queue_name column with the
-- parameter queue_name).
CREATE FUNCTION pgflow.list_dlq_messages(queue_name text DEFAULT NULL, lim integer DEFAULT 100)
RETURNS SETOF pgflow.dlq
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF list_dlq_messages.queue_name IS NOT NULL THEN
        PERFORM pgflow._check_name(list_dlq_messages.queue_name, 'queue_name');
    END IF;
    IF lim IS NULL THEN
        RAISE EXCEPTION 'lim must not be null' USING ERRCODE = '22004';
    ELSIF lim < 1 OR lim > 100000 THEN
        RAISE EXCEPTION 'lim must be between 1 and 100000, not %', lim USING ERRCODE = '22023';
    END IF;
    RETURN QUERY
    SELECT d.* FROM pgflow.dlq d
     WHERE list_dlq_messages.queue_name IS NULL OR d.queue_name = list_dlq_messages.queue_name
     ORDER BY d.dlq_id
     LIMIT lim;
END
$$;
COMMENT ON FUNCTION pgflow.list_dlq_messages(text, integer) IS
'Dead-lettered messages, oldest first, of one queue or (queue_name NULL) of all: original msg_id, message, headers, attempts, last error, the errors of every attempt, first enqueued and dead-lettered times.';

-- Put dead-lettered messages back on their queue as new deliveries; returns (dlq_id, msg_id).
CREATE FUNCTION pgflow._redrive(dlq_ids bigint[]) RETURNS TABLE (dlq_id bigint, msg_id bigint)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    d record;
    q pgflow.queues;
BEGIN
    FOR d IN SELECT x.* FROM pgflow.dlq x WHERE x.dlq_id = ANY (dlq_ids) ORDER BY x.dlq_id FOR UPDATE LOOP
        -- Shared lock before the look-up, so a queue dropped meanwhile is reported below (42704)
        -- rather than met in _send as a sequence that is gone.
        PERFORM pgflow._lock_queue_name(d.queue_name, false);
        SELECT * INTO q FROM pgflow.queues WHERE queue_name = d.queue_name;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'queue "%" of dead-lettered message % no longer exists', d.queue_name, d.dlq_id
                USING ERRCODE = '42704',
                      HINT = 'Create the queue again with pgflow.create_queue, then retry; the message stays in the dead-letter queue.';
        END IF;
        PERFORM pgflow._check_unmanaged(q.queue_name, q.managed_by, 'retry_dlq_message');
        DELETE FROM pgflow.dlq x WHERE x.dlq_id = d.dlq_id;
        dlq_id := d.dlq_id;
        msg_id := pgflow._send(q, d.message, clock_timestamp(), d.priority, d.headers);
        RETURN NEXT;
    END LOOP;
END
$$;

CREATE FUNCTION pgflow.retry_dlq_message(dlq_id bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    IF retry_dlq_message.dlq_id IS NULL THEN
        RAISE EXCEPTION 'dlq_id must not be null' USING ERRCODE = '22004';
    END IF;
    SELECT r.msg_id INTO new_id FROM pgflow._redrive(ARRAY[retry_dlq_message.dlq_id]) r;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'dead-lettered message % does not exist', retry_dlq_message.dlq_id
            USING ERRCODE = '42704', HINT = 'List them with pgflow.list_dlq_messages().';
    END IF;
    RETURN new_id;
END
$$;
COMMENT ON FUNCTION pgflow.retry_dlq_message(bigint) IS
'Put a dead-lettered message back on its queue as a new message with fresh attempts (same body, headers and priority); returns its new msg_id. Fails with 42704, leaving it in the dead-letter queue, if its queue no longer exists.';

CREATE FUNCTION pgflow.retry_dlq(queue_name text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n bigint;
BEGIN
    PERFORM pgflow._api_queue(retry_dlq.queue_name, 'retry_dlq');
    SELECT count(*) INTO n FROM pgflow._redrive(ARRAY(
        SELECT d.dlq_id FROM pgflow.dlq d WHERE d.queue_name = retry_dlq.queue_name));
    RETURN n;
END
$$;
COMMENT ON FUNCTION pgflow.retry_dlq(text) IS
'Put every dead-lettered message of a queue back on it, oldest first, as new messages; returns how many.';

CREATE FUNCTION pgflow.purge_dlq(queue_name text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    n bigint;
BEGIN
    IF purge_dlq.queue_name IS NOT NULL THEN
        PERFORM pgflow._check_name(purge_dlq.queue_name, 'queue_name');
    END IF;
    DELETE FROM pgflow.dlq d WHERE purge_dlq.queue_name IS NULL OR d.queue_name = purge_dlq.queue_name;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION pgflow.purge_dlq(text) IS
'Delete the dead-lettered messages of one queue, or of all queues when queue_name is NULL; returns how many.';
