-- The same lifecycle as plain SQL: insert; claim with FOR UPDATE SKIP LOCKED setting vt and
-- read_ct; delete into the archive table. Three statements, three commits.
INSERT INTO plain.messages (queue_id, msg_id, vt, priority, message)
VALUES (1, nextval('plain.msg_seq'), clock_timestamp(), 0, '{"n": 1}'::jsonb) RETURNING msg_id;
WITH u AS (
    UPDATE plain.messages m SET vt = clock_timestamp() + interval '30 seconds', read_ct = m.read_ct + 1
     WHERE m.queue_id = 1 AND m.msg_id = ANY (ARRAY(
           SELECT msg_id FROM plain.messages
            WHERE queue_id = 1 AND vt <= clock_timestamp()
            ORDER BY priority DESC, msg_id LIMIT 1
              FOR UPDATE SKIP LOCKED))
    RETURNING m.msg_id, m.read_ct
)
SELECT coalesce(max(msg_id), 0) AS mid, coalesce(max(read_ct), 0) AS rc FROM u \gset
\if :mid > 0
WITH d AS (
    DELETE FROM plain.messages WHERE queue_id = 1 AND msg_id = :mid::bigint AND read_ct = :rc::integer
    RETURNING *
)
INSERT INTO plain.archive (queue_id, msg_id, read_ct, enqueued_at, vt, priority, message, headers)
SELECT queue_id, msg_id, read_ct, enqueued_at, vt, priority, message, headers FROM d;
\endif
