-- The single-message lifecycle of pgflow_single.sql on the queue bench_notify, whose notify
-- option is on: each send is announced on its channel at commit.
SELECT pgflow.send('bench_notify', '{"n": 1}'::jsonb);
SELECT coalesce(max(msg_id), 0) AS mid, coalesce(max(read_ct), 0) AS rc FROM pgflow.read('bench_notify', 30, 1) \gset
\if :mid > 0
SELECT pgflow.archive('bench_notify', :mid::bigint, :rc::integer);
\endif
