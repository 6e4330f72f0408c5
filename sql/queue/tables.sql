-- Queue layer: tables and types.
--
-- One set of tables holds every queue, keyed by queue_id. No table is created per queue and no
-- user-supplied name is ever spliced into SQL text; the only per-queue object is the sequence
-- that numbers a queue's messages, named after the queue's integer id.

CREATE TABLE pgflow.queues (
    queue_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue_name         text NOT NULL UNIQUE,
    -- numbers this queue's messages; its last value is the queue's "total ever sent"
    msg_seq            regclass NOT NULL,
    max_retries        integer NOT NULL DEFAULT 3,
    retry_delay_ms     integer NOT NULL DEFAULT 1000,
    max_retry_delay_ms integer NOT NULL DEFAULT 3600000,
    retry_jitter       double precision NOT NULL DEFAULT 0,
    notify             boolean NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL DEFAULT now(),
    -- the layer whose functions alone move this queue's messages: 'flow' for the queue that
    -- carries a flow's tasks (set by the workflow layer); NULL for a queue of the queue API
    managed_by         text CONSTRAINT queues_managed_by_known CHECK (managed_by = 'flow'),
    -- alert thresholds of pgflow.queue_health (0: none): dead-lettered messages, and seconds the
    -- oldest visible message has waited
    alert_dlq_depth    integer NOT NULL DEFAULT 0,
    alert_oldest_age   integer NOT NULL DEFAULT 0,
    CONSTRAINT queues_name_allowed CHECK (queue_name ~ '^[A-Za-z0-9_]{1,48}$'),
    CONSTRAINT queues_max_retries_range CHECK (max_retries BETWEEN 0 AND 100),
    CONSTRAINT queues_retry_delay_range CHECK (retry_delay_ms BETWEEN 0 AND 86400000),
    CONSTRAINT queues_max_retry_delay_range CHECK (max_retry_delay_ms BETWEEN 0 AND 604800000),
    CONSTRAINT queues_jitter_range CHECK (retry_jitter >= 0 AND retry_jitter <= 1),
    CONSTRAINT queues_alert_dlq_depth_range CHECK (alert_dlq_depth BETWEEN 0 AND 1000000000),
    CONSTRAINT queues_alert_oldest_age_range CHECK (alert_oldest_age BETWEEN 0 AND 31536000)
);
COMMENT ON TABLE pgflow.queues IS 'pgflow: one row per queue with its retry and notify options.';
COMMENT ON COLUMN pgflow.queues.managed_by IS 'pgflow: ''flow'' for the queue carrying a flow''s tasks, whose messages only the workflow functions move; NULL for other queues.';

-- Topic bindings: a message published with a routing key matching `pattern` is sent to the
-- queue (sql/queue/topics.sql). They go with their queue.
CREATE TABLE pgflow.topic_bindings (
    pattern  text NOT NULL,
    queue_id bigint NOT NULL REFERENCES pgflow.queues (queue_id) ON DELETE CASCADE,
    bound_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pattern, queue_id)
);
CREATE INDEX topic_bindings_queue_id ON pgflow.topic_bindings (queue_id);
COMMENT ON TABLE pgflow.topic_bindings IS 'pgflow: which queues a topic pattern routes published messages to.';

-- Live messages: waiting, delayed, or leased to a consumer (vt in the future after a read).
-- fillfactor leaves room on each page so the update a read makes (vt, read_ct) stays HOT:
-- neither column is indexed, so no index entry is written per delivery.
CREATE TABLE pgflow.messages (
    queue_id     bigint NOT NULL,
    msg_id       bigint NOT NULL,
    read_ct      integer NOT NULL DEFAULT 0,
    enqueued_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    vt           timestamptz NOT NULL,
    priority     integer NOT NULL DEFAULT 0,
    message      jsonb NOT NULL,
    headers      jsonb,
    -- one entry per failed attempt: {"attempt", "error", "at"}; bounded by max_retries + 1
    errors       jsonb,
    -- the send's deduplication key: while this message lives, a send with the same key sends
    -- nothing and gets this msg_id
    dedup_key    text,
    -- the send's message group: a grouped message is delivered only after every earlier
    -- message of its group has left the queue
    group_id     text,
    PRIMARY KEY (queue_id, msg_id)
) WITH (fillfactor = 80);
-- Delivery order: higher priority first, then FIFO by msg_id; vt is filtered, not indexed.
CREATE INDEX messages_delivery_order ON pgflow.messages (queue_id, priority DESC, msg_id);
-- At most one live message per deduplication key and queue. Partial: a send without a key
-- writes no entry, and a read (vt, read_ct) leaves the column alone, so it stays HOT.
CREATE UNIQUE INDEX messages_dedup_key ON pgflow.messages (queue_id, dedup_key) WHERE dedup_key IS NOT NULL;
-- A group's messages in order, for the claim's test that no earlier message of the group is
-- live. Partial, like the one above.
CREATE INDEX messages_group_order ON pgflow.messages (queue_id, group_id, msg_id) WHERE group_id IS NOT NULL;
COMMENT ON TABLE pgflow.messages IS 'pgflow: live messages of every queue (waiting, delayed or leased).';

-- Messages a consumer archived instead of deleting: kept for inspection and replay.
CREATE TABLE pgflow.archive (
    queue_id     bigint NOT NULL,
    msg_id       bigint NOT NULL,
    read_ct      integer NOT NULL,
    enqueued_at  timestamptz NOT NULL,
    vt           timestamptz NOT NULL,
    priority     integer NOT NULL,
    message      jsonb NOT NULL,
    headers      jsonb,
    archived_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (queue_id, msg_id)
);
COMMENT ON TABLE pgflow.archive IS 'pgflow: archived messages of every queue.';

-- When a delayed message or a retry comes due, the maintenance worker wakes readers and
-- notifies listeners. Only delayed sends and retries write here, never the common path.
-- due_at is rounded up to the next 100 ms so a burst of delayed sends shares one row.
CREATE TABLE pgflow.due_wakeups (
    queue_id  bigint NOT NULL,
    due_at    timestamptz NOT NULL,
    PRIMARY KEY (due_at, queue_id)
);
COMMENT ON TABLE pgflow.due_wakeups IS 'pgflow: times at which delayed messages or retries of a queue become visible.';

CREATE TYPE pgflow.message_record AS (
    msg_id      bigint,
    read_ct     integer,
    enqueued_at timestamptz,
    vt          timestamptz,
    message     jsonb,
    headers     jsonb,
    priority    integer
);
COMMENT ON TYPE pgflow.message_record IS 'pgflow: a delivered message; (msg_id, read_ct) identifies the delivery (its lease).';

CREATE TYPE pgflow.queue_stats AS (
    queue_name           text,
    depth                bigint,
    visible              bigint,
    in_flight            bigint,
    delayed              bigint,
    archived             bigint,
    dead_lettered        bigint,
    oldest_msg_age_sec   double precision,
    newest_msg_age_sec   double precision,
    total_sent           bigint,
    scraped_at           timestamptz,
    oldest_visible_age_sec double precision
);
COMMENT ON TYPE pgflow.queue_stats IS 'pgflow: statistics of one queue, as returned by pgflow.get_queue_stats.';

-- Dead-letter queue: messages that exhausted their deliveries. Rows keep the queue's name so
-- they survive drop_queue and can be retried into a queue of that name created later.
CREATE TABLE pgflow.dlq (
    dlq_id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue_name        text NOT NULL,
    msg_id            bigint NOT NULL,
    message           jsonb NOT NULL,
    headers           jsonb,
    priority          integer NOT NULL,
    attempts          integer NOT NULL,
    last_error        text,
    errors            jsonb NOT NULL DEFAULT '[]',
    enqueued_at       timestamptz NOT NULL,
    dead_lettered_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX dlq_by_queue ON pgflow.dlq (queue_name, dlq_id);
COMMENT ON TABLE pgflow.dlq IS 'pgflow: dead-lettered messages of every queue, with the error of each failed attempt.';
