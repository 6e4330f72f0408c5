-- The queue tables' triggers, both C functions in src/queue/.

-- A row trigger in C (src/queue/): per row it reads the queue id and msg id and merges them
-- into the transaction's pending range for the queue; the queue's name and notify flag come
-- from a per-backend cache. Cheaper per send than a statement trigger with a transition table.
CREATE FUNCTION pgflow._messages_inserted() RETURNS trigger
LANGUAGE c
AS 'MODULE_PATHNAME', 'pgflow_messages_inserted';

CREATE TRIGGER messages_announce
AFTER INSERT ON pgflow.messages
FOR EACH ROW EXECUTE FUNCTION pgflow._messages_inserted();

-- Creating, altering or dropping a queue invalidates every backend's cache of queues.
CREATE FUNCTION pgflow._queues_changed() RETURNS trigger
LANGUAGE c
AS 'MODULE_PATHNAME', 'pgflow_queues_changed';

CREATE TRIGGER queues_changed
AFTER INSERT OR UPDATE OR DELETE ON pgflow.queues
FOR EACH STATEMENT EXECUTE FUNCTION pgflow._queues_changed();
