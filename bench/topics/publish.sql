-- One publish reaching the 10 queues bound to 'bench.#', in one transaction.
BEGIN;
SELECT count(*) FROM pgflow.publish('bench.event', '{"n": 1}');
COMMIT;
