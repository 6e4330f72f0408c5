-- Server time per message lifecycle, without clients, network or fsync in the figure: one
-- procedure runs send-read-archive lifecycles through pgflow and through plain SQL on
-- same-shaped tables, interleaved in blocks of 50 (a COMMIT after each call, as three client
-- transactions would), and counts the backend's CPU time for each side. Interleaving puts both
-- sides under the same load from the rest of the machine. Run by
-- bench/cpu.sh after bench/queue/setup.sql; prints one line per round.
SET synchronous_commit = off;

-- The backend's time on a CPU, in ns (first field of /proc/self/schedstat): unlike wall time it
-- leaves out the time the machine spent elsewhere, which on a shared machine can be most of it.
CREATE OR REPLACE FUNCTION pg_temp.cpu_ns() RETURNS float8 LANGUAGE sql AS
$$ SELECT split_part(pg_read_file('/proc/self/schedstat'), ' ', 1)::float8 $$;

CREATE OR REPLACE PROCEDURE pg_temp.lifecycles(blocks int) LANGUAGE plpgsql AS $$
DECLARE
    r record;
    mid bigint;
    rc int;
    c0 float8;
    flow_ns float8 := 0;
    plain_ns float8 := 0;
BEGIN
    -- Blocks of 50 lifecycles, alternately pgflow and plain SQL (which goes first alternates
    -- too), so both sides run under the same conditions.
    FOR b IN 1..blocks LOOP
        FOR side IN 0..1 LOOP
            c0 := pg_temp.cpu_ns();
            IF (side + b) % 2 = 0 THEN
                FOR i IN 1..50 LOOP
                    PERFORM pgflow.send('bench', '{"n": 1}'::jsonb);
                    COMMIT;
                    SELECT msg_id, read_ct INTO r FROM pgflow.read('bench', 30, 1);
                    COMMIT;
                    PERFORM pgflow.archive('bench', r.msg_id, r.read_ct);
                    COMMIT;
                END LOOP;
                flow_ns := flow_ns + pg_temp.cpu_ns() - c0;
            ELSE
                FOR i IN 1..50 LOOP
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
                plain_ns := plain_ns + pg_temp.cpu_ns() - c0;
            END IF;
        END LOOP;
    END LOOP;
    RAISE NOTICE 'round % % %', blocks * 50, round((flow_ns / blocks / 50000)::numeric, 1),
        round((plain_ns / blocks / 50000)::numeric, 1);
END
$$;

SET client_min_messages = notice;
CALL pg_temp.lifecycles(4);    -- warm-up
CALL pg_temp.lifecycles(60);
CALL pg_temp.lifecycles(60);
CALL pg_temp.lifecycles(60);
