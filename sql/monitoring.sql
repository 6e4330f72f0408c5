-- Monitoring from SQL: each queue's health against its alert thresholds, and every figure in
-- the Prometheus text exposition format. Both read what pgflow.get_queue_stats() counts (the
-- one home of a queue's figures) and the workflow tables; nothing here writes, and nothing is
-- counted on the hot path: the figures are counted when asked for.

-- The health rule, for one queue's figures and thresholds: a threshold reached is a warning,
-- twice the threshold critical; the worst of a queue's alerts is its status, and reason says
-- which alerts fired (NULL when ok). A threshold of 0 is off. Used by get_queue_health and
-- metrics, each over the one count of get_queue_stats() it made.
CREATE FUNCTION pgflow._health(s pgflow.queue_stats, alert_dlq_depth integer, alert_oldest_age integer,
                               OUT status text, OUT reason text)
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN a.dlq >= 2 OR a.age >= 2 THEN 'critical'
                WHEN a.dlq >= 1 OR a.age >= 1 THEN 'warning'
                ELSE 'ok' END,
           nullif(concat_ws('; ',
               CASE WHEN a.dlq >= 1 THEN format('%s dead-lettered messages, alert at %s', s.dead_lettered, $2) END,
               CASE WHEN a.age >= 1 THEN format('oldest visible message waiting %s s, alert at %s s',
                                                round(s.oldest_visible_age_sec::numeric, 1), $3) END), '')
      FROM (SELECT
               -- how many times its threshold each figure has reached (0, 1, or 2 for twice)
               CASE WHEN $2 = 0 THEN 0 ELSE least(2, floor(s.dead_lettered::double precision / $2)) END AS dlq,
               CASE WHEN $3 = 0 THEN 0 ELSE least(2, floor(s.oldest_visible_age_sec / $3)) END AS age) a;
$$;

CREATE FUNCTION pgflow.get_queue_health()
RETURNS TABLE (queue_name text, status text, reason text, dlq_depth bigint,
               oldest_visible_age_sec double precision, alert_dlq_depth integer, alert_oldest_age integer)
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.queue_name, h.status, h.reason, s.dead_lettered, s.oldest_visible_age_sec,
           q.alert_dlq_depth, q.alert_oldest_age
      FROM pgflow.get_queue_stats() s
      JOIN pgflow.queues q ON q.queue_name = s.queue_name
     CROSS JOIN LATERAL pgflow._health(s, q.alert_dlq_depth, q.alert_oldest_age) h
     ORDER BY s.queue_name;
$$;
COMMENT ON FUNCTION pgflow.get_queue_health() IS
'Health of every queue against its alert thresholds (pgflow.alter_queue alert_dlq_depth, alert_oldest_age): status ok, warning (a threshold reached) or critical (twice a threshold), the reason naming what fired, and the figures compared. The view pgflow.queue_health shows the same.';

CREATE VIEW pgflow.queue_health AS
SELECT * FROM pgflow.get_queue_health();
COMMENT ON VIEW pgflow.queue_health IS
'pgflow: health of every queue against its alert thresholds (see pgflow.get_queue_health).';

-- The metric families, then every sample as a row (family, labels, value); each family with
-- samples is printed as its HELP and TYPE lines followed by them. Labels need no escaping: queue
-- names and flow slugs are ASCII letters, digits and underscores (pgflow._check_name), states
-- and statuses fixed words. A family without samples (no queue, no run) is left out.
CREATE FUNCTION pgflow.metrics() RETURNS text
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH families (ord, name, kind, help) AS (VALUES
        (1, 'pgflow_queue_depth', 'gauge', 'Live messages of a queue, in any state.'),
        (2, 'pgflow_queue_messages', 'gauge',
         'Live messages of a queue by state: visible (can be read now), in_flight (leased, or waiting out a retry backoff), delayed (not yet due).'),
        (3, 'pgflow_queue_dlq_messages', 'gauge',
         'Dead-lettered messages of a queue, kept in pgflow.dlq until retried or purged.'),
        (4, 'pgflow_queue_archived_messages', 'gauge',
         'Archived messages of a queue, kept in pgflow.archive until retention deletes them.'),
        (5, 'pgflow_queue_oldest_visible_age_seconds', 'gauge',
         'How long the oldest visible message of a queue has waited to be read (0: none visible).'),
        (6, 'pgflow_queue_oldest_message_age_seconds', 'gauge',
         'Age of the oldest live message of a queue, in any state (0: none).'),
        (7, 'pgflow_queue_sent_total', 'counter',
         'Messages sent to a queue: the ids its sequence issued (a rolled-back send counts; starts again if the queue is dropped and created again).'),
        (8, 'pgflow_queue_health', 'gauge',
         'Health of a queue against its alert thresholds (pgflow.queue_health): 0 ok, 1 warning, 2 critical.'),
        (9, 'pgflow_flow_runs', 'gauge',
         'Workflow runs by flow and status (runs kept until pgflow.run_retention deletes finished ones).'),
        (10, 'pgflow_flow_tasks', 'gauge', 'Workflow tasks by flow and status.')
    ), stats AS (
        -- one count of every queue, for the figures and for their health
        SELECT s.*, h.status AS health
          FROM pgflow.get_queue_stats() s
          JOIN pgflow.queues q ON q.queue_name = s.queue_name
         CROSS JOIN LATERAL pgflow._health(s, q.alert_dlq_depth, q.alert_oldest_age) h
    ), samples (ord, labels, value) AS (
        SELECT m.* FROM stats s CROSS JOIN LATERAL (VALUES
            (1, format('queue="%s"', s.queue_name), s.depth::numeric),
            (2, format('queue="%s",state="visible"', s.queue_name), s.visible),
            (2, format('queue="%s",state="in_flight"', s.queue_name), s.in_flight),
            (2, format('queue="%s",state="delayed"', s.queue_name), s.delayed),
            (3, format('queue="%s"', s.queue_name), s.dead_lettered),
            (4, format('queue="%s"', s.queue_name), s.archived),
            (5, format('queue="%s"', s.queue_name), round(s.oldest_visible_age_sec::numeric, 3)),
            (6, format('queue="%s"', s.queue_name), round(coalesce(s.oldest_msg_age_sec, 0)::numeric, 3)),
            (7, format('queue="%s"', s.queue_name), s.total_sent)) m
        UNION ALL
        SELECT 8, format('queue="%s"', s.queue_name), CASE s.health WHEN 'ok' THEN 0 WHEN 'warning' THEN 1 ELSE 2 END
          FROM stats s
        UNION ALL
        SELECT 9, format('flow="%s",status="%s"', r.flow_slug, r.status), count(*)
          FROM pgflow.runs r GROUP BY r.flow_slug, r.status
        UNION ALL
        SELECT 10, format('flow="%s",status="%s"', t.flow_slug, t.status), count(*)
          FROM pgflow.step_tasks t GROUP BY t.flow_slug, t.status
    )
    SELECT coalesce(string_agg(format(E'# HELP %s %s\n# TYPE %s %s\n', f.name, f.help, f.name, f.kind) || x.lines,
                               '' ORDER BY f.ord), '')
      FROM families f
      JOIN (SELECT p.ord, string_agg(format(E'%s{%s} %s\n', g.name, p.labels, p.value), '' ORDER BY p.labels) AS lines
              FROM samples p JOIN families g ON g.ord = p.ord GROUP BY p.ord) x ON x.ord = f.ord;
$$;
COMMENT ON FUNCTION pgflow.metrics() IS
'Every queue''s and flow''s figures in the Prometheus text exposition format (version 0.0.4): depth, messages by state, dead-lettered, archived, age of the oldest visible and oldest live message, messages sent, health, and runs and tasks by flow and status. Counted when called (nothing is counted on the send path); serve it from an HTTP exporter or a scrape job that runs SELECT pgflow.metrics().';
