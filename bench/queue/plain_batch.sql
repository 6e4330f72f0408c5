-- Batched lifecycle as plain SQL: one statement per 100 rows for each of insert, claim, archive.
INSERT INTO plain.messages (queue_id, msg_id, vt, priority, message)
SELECT 1, nextval('plain.msg_seq'), clock_timestamp(), 0, '{"n": 1}'::jsonb FROM generate_series(1, 100);
WITH u AS (
    UPDATE plain.messages m SET vt = clock_timestamp() + interval '30 seconds', read_ct = m.read_ct + 1
     WHERE m.queue_id = 1 AND m.msg_id = ANY (ARRAY(
           SELECT msg_id FROM plain.messages
            WHERE queue_id = 1 AND vt <= clock_timestamp()
            ORDER BY priority DESC, msg_id LIMIT 100
              FOR UPDATE SKIP LOCKED))
    RETURNING m.msg_id, m.read_ct
)
SELECT count(*) AS n, coalesce(array_agg(msg_id), '{}')::text AS ids, coalesce(array_agg(read_ct), '{}')::text AS rcs
  FROM u \gset
\if :n > 0
WITH d AS (
    DELETE FROM plain.messages m
     WHERE m.queue_id = 1 AND m.msg_id = ANY (:ids::bigint[])
       AND (m.msg_id, m.read_ct) IN (SELECT * FROM unnest(:ids::bigint[], :rcs::integer[]))
    RETURNING m.*
)
INSERT INTO plain.archive (queue_id, msg_id, read_ct, enqueued_at, vt, priority, message, headers)
SELECT queue_id, msg_id, read_ct, enqueued_at, vt, priority, message, headers FROM d;
\endif
