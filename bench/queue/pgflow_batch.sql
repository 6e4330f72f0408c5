-- Batched lifecycle through pgflow: send_batch of 100, read qty 100, archive by array.
SELECT count(*) FROM pgflow.send_batch('bench', array_fill('{"n": 1}'::jsonb, ARRAY[100]));
SELECT count(*) AS n, coalesce(array_agg(msg_id), '{}')::text AS ids, coalesce(array_agg(read_ct), '{}')::text AS rcs
  FROM pgflow.read('bench', 30, 100) \gset
\if :n > 0
SELECT count(*) FROM pgflow.archive('bench', :ids::bigint[], :rcs::integer[]);
\endif
