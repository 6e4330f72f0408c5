//! Server settings of pgflow, all under the reserved `pgflow.` prefix, with their bounds.

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use std::ffi::CString;

/// Largest number of messages one `send_batch` call may carry.
pub static MAX_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// How often the maintenance worker looks for delayed messages and retries that came due.
pub static MAINTENANCE_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(100);

/// Database the maintenance worker connects to (the one holding `CREATE EXTENSION pgflow`).
pub static MAINTENANCE_DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));

/// Whether the maintenance worker runs at all (it is only started when preloaded).
pub static MAINTENANCE_ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);

/// How long archived messages are kept (seconds; 0 keeps them forever). Applied by the
/// maintenance worker once a minute, through `pgflow.apply_retention()`.
pub static ARCHIVE_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(0);

/// How long finished (completed or failed) runs are kept, with their step states and tasks.
pub static RUN_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(0);

/// Which workflow events are announced (read by the SQL layer with current_setting).
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum WorkflowEvents {
    /// every event, task_* included
    #[name = c"all"]
    All,
    /// workflow_started, workflow_completed and workflow_failed only
    #[name = c"runs"]
    Runs,
    /// none
    #[name = c"off"]
    Off,
}

pub static WORKFLOW_EVENTS: GucSetting<WorkflowEvents> =
    GucSetting::<WorkflowEvents>::new(WorkflowEvents::All);

/// Whether a transaction's notifications are handed to its database's announcer after commit
/// (on) or sent by the transaction itself at commit (off), see [`crate::events::announcer`].
pub static NOTIFY_VIA_ANNOUNCER: GucSetting<bool> = GucSetting::<bool>::new(true);

pub fn init() {
    GucRegistry::define_enum_guc(
        c"pgflow.workflow_events",
        c"Which workflow events pgflow announces with NOTIFY: all, runs or off.",
        c"'runs' keeps only the workflow_* events, 'off' announces none.",
        &WORKFLOW_EVENTS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pgflow.notify_via_announcer",
        c"Whether pgflow's notifications are sent after commit by the database's announcer process.",
        c"On (with pgflow preloaded), committing transactions never take PostgreSQL's cluster-wide notify lock; off, each notifies at its own commit.",
        &NOTIFY_VIA_ANNOUNCER,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgflow.max_batch_size",
        c"Largest number of messages one pgflow.send_batch call may carry.",
        c"A larger batch is refused with SQLSTATE 54000. Range 1 to 1000000.",
        &MAX_BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgflow.maintenance_interval_ms",
        c"Milliseconds between two passes of the pgflow maintenance worker.",
        c"Each pass announces delayed messages and retries that came due. Range 10 to 60000.",
        &MAINTENANCE_INTERVAL_MS,
        10,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    // Only the worker reads it, at its start. A postmaster-level setting can only be defined
    // while the library is preloaded (PostgreSQL refuses it at a later load); a backend that
    // loads pgflow later (no preload: no worker) still defines it, so that a value in
    // postgresql.conf is not rejected under the reserved prefix.
    // SAFETY: a plain global flag of this process, read during _PG_init.
    let preloading = unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress };
    GucRegistry::define_string_guc(
        c"pgflow.maintenance_database",
        c"Database in which the pgflow maintenance worker runs.",
        c"It must hold CREATE EXTENSION pgflow; until it does, the worker waits.",
        &MAINTENANCE_DATABASE,
        if preloading {
            GucContext::Postmaster
        } else {
            GucContext::Sighup
        },
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pgflow.archive_retention",
        c"How long pgflow keeps archived messages; 0 keeps them forever.",
        c"Older ones are deleted by pgflow.apply_retention(), which the maintenance worker runs once a minute.",
        &ARCHIVE_RETENTION_S,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pgflow.run_retention",
        c"How long pgflow keeps finished workflow runs; 0 keeps them forever.",
        c"Runs completed or failed longer ago are deleted with their step states and tasks by pgflow.apply_retention(), which the maintenance worker runs once a minute.",
        &RUN_RETENTION_S,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"pgflow.maintenance_enabled",
        c"Whether the pgflow maintenance worker does its passes.",
        c"The worker exists only when pgflow is in shared_preload_libraries.",
        &MAINTENANCE_ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // Every pgflow.* setting is defined above: a name under the prefix that is not one of
    // them (a typo in postgresql.conf, SET or ALTER SYSTEM) is an error, not a silently kept
    // placeholder. Placeholders set before the library loaded are removed with a warning.
    // SAFETY: called from _PG_init, in the backend's main thread, with a NUL-terminated name.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"pgflow".as_ptr()) };
}

/// `pgflow._max_batch_size()`: the current `pgflow.max_batch_size`, for the SQL layer.
#[pg_extern(stable, parallel_safe, name = "_max_batch_size")]
#[search_path(pg_catalog, pg_temp)]
fn max_batch_size() -> i32 {
    MAX_BATCH_SIZE.get()
}

/// `pgflow._archive_retention_s()`: `pgflow.archive_retention` in seconds, for the SQL layer
/// (current_setting would give it with a unit, as `7d`).
#[pg_extern(stable, parallel_safe, name = "_archive_retention_s")]
#[search_path(pg_catalog, pg_temp)]
fn archive_retention_s() -> i32 {
    ARCHIVE_RETENTION_S.get()
}

/// `pgflow._run_retention_s()`: `pgflow.run_retention` in seconds, for the SQL layer.
#[pg_extern(stable, parallel_safe, name = "_run_retention_s")]
#[search_path(pg_catalog, pg_temp)]
fn run_retention_s() -> i32 {
    RUN_RETENTION_S.get()
}
