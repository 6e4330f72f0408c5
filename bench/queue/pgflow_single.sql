-- One message lifecycle through pgflow: send, read, archive; three statements, three commits.
SELECT pgflow.send('bench', '{"n": 1}'::jsonb);
SELECT coalesce(max(msg_id), 0) AS mid, coalesce(max(read_ct), 0) AS rc FROM pgflow.read('bench', 30, 1) \gset
\if :mid > 0
SELECT pgflow.archive('bench', :mid::bigint, :rc::integer);
\endif
