//! pgflow: durable queues, DAG workflows and their events inside PostgreSQL.
//!
//! The layers, each a folder of SQL under `sql/` and, where it has Rust, a module here:
//!
//! 1. **queue** ([`queue`], `sql/queue/`): named queues in one set of tables, leases,
//!    priorities, delays, retries with backoff, the dead-letter queue and topics
//!    ([`queue::topics`]). The hot path (`send`, `read`, `archive` and `delete`, `ack_and_read`)
//!    is Rust; the rest (management, batches, retries, DLQ, inspection) is PL/pgSQL.
//! 2. **workflow** (`workflow/`, `sql/workflow/`): flows, runs, step states and tasks
//!    delivered through the queue layer. The task path (`poll_for_tasks`, `start_tasks`,
//!    `complete_task`, starting single steps, step completion) and the task-ending outcomes are
//!    Rust; definitions, `start_flow`, `fail_task`, inspection and the rare cases are PL/pgSQL.
//! 3. **events** ([`events`], `sql/events/`): events collected per transaction, announced
//!    after commit by the database's announcer ([`events::announcer`]), and commit-time
//!    wake-ups of blocked readers through shared memory.
//! 4. **maintenance** ([`maintenance`], `sql/maintenance/`): the background workers; delayed
//!    work announced as it comes due; cron schedules ([`schedules`],
//!    `sql/maintenance/schedules.sql`) fired; retention (`sql/retention.sql`) once a minute.
//!
//! Shared by the layers: names ([`names`]), errors ([`error`]), advisory locks (`locks.rs`,
//! `sql/locks.sql`), settings ([`gucs`]). Everything below pgrx's safe layer is in `pg/`:
//! kept SPI plans and pinned settings, raw V1 arguments and datums, other processes' latches.
//! An error raised inside one of our statements reaches the client with its SQLSTATE, message,
//! detail and hint, and no Rust backtrace in DETAIL.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use pgrx::prelude::*;

pub mod error;
pub mod events;
pub mod gucs;
mod locks;
pub mod maintenance;
pub mod names;
mod pg;
pub mod queue;
pub mod schedules;
mod workflow;

::pgrx::pg_module_magic!(name, version);

// The extension script: each file states what it needs when it is created (tables, types, the
// functions a SQL-language body or a COMMENT names); PL/pgSQL bodies are resolved at run time.
// Tables first (bootstrap), grants last (finalize); pgrx places the Rust functions by the same
// graph.
extension_sql_file!("../sql/queue/tables.sql", name = "queue_tables", bootstrap);
extension_sql_file!("../sql/locks.sql", name = "locks");
extension_sql_file!(
    "../sql/queue/triggers.sql",
    name = "queue_triggers",
    requires = ["queue_tables"]
);
extension_sql_file!(
    "../sql/queue/api.sql",
    name = "queue_api",
    requires = ["queue_tables"]
);
extension_sql_file!(
    "../sql/queue/retries.sql",
    name = "queue_retries",
    requires = ["queue_tables"]
);
extension_sql_file!(
    "../sql/queue/topics.sql",
    name = "queue_topics",
    requires = [
        "queue_api",
        queue::topics::check_topic_sql,
        queue::topics::topic_matches
    ]
);
extension_sql_file!(
    "../sql/events/notify.sql",
    name = "events",
    requires = [
        "queue_tables",
        events::queue_channel,
        events::flow_channel,
        events::wakeups_enabled
    ]
);
extension_sql_file!(
    "../sql/maintenance/maintenance.sql",
    name = "maintenance",
    requires = ["queue_tables"]
);
extension_sql_file!(
    "../sql/maintenance/schedules.sql",
    name = "schedules",
    requires = ["queue_tables", "workflow_tables"]
);
extension_sql_file!(
    "../sql/workflow/tables.sql",
    name = "workflow_tables",
    requires = ["queue_tables"]
);
extension_sql_file!(
    "../sql/workflow/flows.sql",
    name = "workflow_flows",
    requires = ["workflow_tables"]
);
extension_sql_file!(
    "../sql/workflow/runtime.sql",
    name = "workflow_runtime",
    requires = ["workflow_tables"]
);
extension_sql_file!(
    "../sql/workflow/diagrams.sql",
    name = "workflow_diagrams",
    requires = ["workflow_tables"]
);
extension_sql_file!(
    "../sql/monitoring.sql",
    name = "monitoring",
    requires = ["queue_api", "workflow_tables"]
);
extension_sql_file!(
    "../sql/retention.sql",
    name = "retention",
    requires = ["queue_tables", "workflow_tables"]
);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

/// Library load: settings, transaction hooks, and (when preloaded) shared memory and the worker.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    events::init();
    queue::init();
    pg::spi::init();
    // SAFETY: a plain global flag of this process, read during _PG_init.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        maintenance::register();
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pgflow'",
            "pgflow.maintenance_enabled = off",
        ]
    }
}
