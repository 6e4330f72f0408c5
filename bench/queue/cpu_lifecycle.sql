-- Server time per message lifecycle, without clients, network or fsync in the figure: a
-- procedure runs N lifecycles (send, read, archive; a COMMIT after each call, as three
-- client transactions would) through pgflow and through plain SQL on same-shaped tables,
-- alternately. Run by bench/cpu.sh after bench/queue/setup.sql.
SET synchronous_commit = off;

CREATE OR REPLACE PROCEDURE pg_temp.lifecycles_pgflow(n int) LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR i IN 1..n LOOP
        PERFORM pgflow.send('bench', '{"n": 1}'::jsonb);
        COMMIT;
        SELECT msg_id, read_ct INTO r FROM pgflow.read('bench', 30, 1);
        COMMIT;
        PERFORM pgflow.archive('bench', r.msg_id, r.read_ct);
        COMMIT;
    END LOOP;
END
$$;

CREATE OR REPLACE PROCEDURE pg_temp.lifecycles_plain(n int) LANGUAGE plpgsql AS $$
DECLARE
    mid bigint;
    rc int;
BEGIN
    FOR i IN 1..n LOOP
        INSERT INTO plain.messages (queue_id, msg_id, vt, priority, message)
        VALUES (1, nextval('plain.msg_seq'), clock_timestamp(), 0, '{"n": 1}'::jsonb);
        COMMIT;
        WITH u AS (
            UPDATE plain.messages m SET vt = clock_timestamp() + interval '30 seconds', read_ct = m.read_ct + 1
             WHERE m.queue_id = 1 AND m.msg_id = ANY (ARRAY(
                   SELECT msg_id FROM plain.messages
                    WHERE queue_id = 1 AND vt <= clock_timestamp()
                    ORDER BY priority DESC, msg_id LIMIT 1
                      FOR UPDATE SKIP LOCKED))
            RETURNING m.msg_id, m.read_ct)
        SELECT msg_id, read_ct INTO mid, rc FROM u;
        COMMIT;
        WITH d AS (DELETE FROM plain.messages WHERE queue_id = 1 AND msg_id = mid AND read_ct = rc RETURNING *)
        INSERT INTO plain.archive (queue_id, msg_id, read_ct, enqueued_at, vt, priority, message, headers)
        SELECT queue_id, msg_id, read_ct, enqueued_at, vt, priority, message, headers FROM d;
        COMMIT;
    END LOOP;
END
$$;

-- warm-up, then alternate
CALL pg_temp.lifecycles_pgflow(200);
CALL pg_temp.lifecycles_plain(200);
\timing on
\echo pgflow
CALL pg_temp.lifecycles_pgflow(2000);
\echo plain
CALL pg_temp.lifecycles_plain(2000);
\echo pgflow
CALL pg_temp.lifecycles_pgflow(2000);
\echo plain
CALL pg_temp.lifecycles_plain(2000);
\echo pgflow
CALL pg_temp.lifecycles_pgflow(2000);
\echo plain
CALL pg_temp.lifecycles_plain(2000);
