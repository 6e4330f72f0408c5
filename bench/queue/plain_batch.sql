-- Batched lifecycle as plain SQL: one statement per 100 rows for each of insert, claim, archive.
INSERT INTO plain.messages (queue_id, msg_id, vt, priority, message)
SELECT 1, nextval('plain.msg_seq'), clock_timestamp(), 0, '{"n": 1}'::jsonb FROM generate_series(1, 100);
WITH c AS (
    SELECT msg_id FROM plain.messages
     WHERE queue_id = 1 AND vt <= clock_timestamp()
     ORDER BY priority DESC, msg_id LIMIT 100
       FOR UPDATE SKIP LOCKED
), u AS (
    UPDATE plain.messages m SET vt = clock_timestamp() + interval '30 seconds', read_ct = m.read_ct + 1
      FROM c WHERE m.queue_id = 1 AND m.msg_id = c.msg_id
    RETURNING m.msg_id, m.read_ct
)
SELECT count(*) AS n, coalesce(array_agg(msg_id), '{}')::text AS ids, coalesce(array_agg(read_ct), '{}')::text AS rcs
  FROM u \gset
\if :n > 0
WITH d AS (
    DELETE FROM plain.messages m USING unnest(:ids::bigint[], :rcs::integer[]) AS w(id, rc)
     WHERE m.queue_id = 1 AND m.msg_id = w.id AND m.read_ct = w.rc
    RETURNING m.*
)
INSERT INTO plain.archive (queue_id, msg_id, read_ct, enqueued_at, vt, priority, message, headers)
SELECT queue_id, msg_id, read_ct, enqueued_at, vt, priority, message, headers FROM d;
\endif
