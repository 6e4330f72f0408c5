-- Ack-and-claim lifecycle: send; then archive the message this client holds and lease the next
-- in one pgflow.ack_and_read call. Two statements, two commits per message.
-- pid and prc (the message held, 0 for none) start at 0 through pgbench -D in bench/run.sh.
SELECT pgflow.send('bench', '{"n": 1}'::jsonb);
SELECT coalesce(max(msg_id), 0) AS pid, coalesce(max(read_ct), 0) AS prc
  FROM pgflow.ack_and_read('bench',
        CASE WHEN :pid::bigint > 0 THEN ARRAY[:pid::bigint] ELSE '{}'::bigint[] END, 30, 1, true,
        CASE WHEN :pid::bigint > 0 THEN ARRAY[:prc::integer] ELSE '{}'::integer[] END) \gset
