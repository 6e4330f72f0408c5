//! The maintenance worker: what must happen while no client calls in.
//!
//! Started only when pgflow is in `shared_preload_libraries`, in two processes:
//!
//! - a **launcher**, registered at server start and connected to no database: it waits until
//!   the database named by `pgflow.maintenance_database` exists (saying so once in the log, at
//!   LOG level, instead of failing and restarting every few seconds), then starts the worker
//!   there and watches it; when the worker stops (its database dropped, an error), it starts
//!   it again after a pause, or waits again for the database. It also starts the
//!   **announcers** ([`crate::events::announcer`]) that databases ask for;
//! - the **worker**, connected to that database: every `pgflow.maintenance_interval_ms` it runs
//!   `pgflow.run_maintenance()` in a short transaction of its own, which announces delayed
//!   messages and retries that came due (waking blocked readers and notifying listeners),
//!   fires the cron schedules that came due ([`crate::schedules`]) and removes leftovers of
//!   dropped queues. The logic lives in SQL so it can be called by hand as
//!   well; this loop only keeps it running, survives a failing pass (logged, retried on the
//!   next tick) and waits while the extension is not installed. Once a minute it also runs
//!   `pgflow.apply_retention()` (archived messages and finished runs older than
//!   `pgflow.archive_retention` / `pgflow.run_retention`).
//!
//! Errors reach the server log as PostgreSQL raised them, without a Rust backtrace.

use crate::gucs;
use crate::pg::as_raised;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// How often the worker applies `pgflow.archive_retention` and `pgflow.run_retention`.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// How long the launcher waits between two looks for the database, and before starting a
/// worker again after one stopped.
const LAUNCHER_PAUSE: Duration = Duration::from_secs(5);

pub fn register() {
    BackgroundWorkerBuilder::new("pgflow maintenance launcher")
        .set_type("pgflow maintenance launcher")
        .set_function("pgflow_maintenance_launcher")
        .set_library("pgflow")
        .enable_spi_access()
        .set_restart_time(Some(LAUNCHER_PAUSE))
        .load();
}

/// The database the worker runs in.
fn maintenance_database() -> String {
    gucs::MAINTENANCE_DATABASE
        .get()
        .and_then(|c| c.into_string().ok())
        .unwrap_or_else(|| "postgres".to_string())
}

/// Whether a database of that name exists. The launcher is connected to no database, so it
/// can read shared catalogs only, and only by a plain scan (an index needs a database's
/// pg_class): it reads pg_database as PostgreSQL's autovacuum launcher does.
fn database_exists(name: &str) -> bool {
    BackgroundWorker::transaction(|| {
        as_raised(|| {
            let mut found = false;
            // SAFETY: inside a transaction; pg_database is a shared heap catalog, opened and
            // scanned with a catalog snapshot and closed again before the transaction ends;
            // each tuple heap_getnext returns is a pg_database row, valid until the next call.
            unsafe {
                let rel = pg_sys::table_open(
                    pg_sys::DatabaseRelationId,
                    pg_sys::AccessShareLock as pg_sys::LOCKMODE,
                );
                let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
                loop {
                    let tuple =
                        pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                    if tuple.is_null() {
                        break;
                    }
                    let row = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
                    let datname = std::ffi::CStr::from_ptr((*row).datname.data.as_ptr());
                    if datname.to_bytes() == name.as_bytes() {
                        found = true;
                        break;
                    }
                }
                pg_sys::heap_endscan(scan);
                pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
            }
            found
        })
    })
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pgflow_maintenance_launcher(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    crate::events::announcer::register_launcher();
    let database = maintenance_database();
    let mut said_waiting = false;
    let mut maintenance: Option<DynamicBackgroundWorker> = None;
    let mut next_try = Instant::now();
    let mut announcers: Vec<(usize, DynamicBackgroundWorker)> = Vec::new();
    loop {
        // the maintenance worker: started when its database exists, again after it stopped
        if let Some(worker) = &maintenance {
            match worker.pid() {
                Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted) => {}
                Err(BackgroundWorkerStatus::PostmasterDied) => return,
                Err(_) => {
                    maintenance = None;
                    next_try = Instant::now() + LAUNCHER_PAUSE;
                }
            }
        }
        if maintenance.is_none() && Instant::now() >= next_try {
            next_try = Instant::now() + LAUNCHER_PAUSE;
            if database_exists(&database) {
                said_waiting = false;
                match start("pgflow maintenance", "pgflow_maintenance_main", None) {
                    Ok(worker) => maintenance = Some(worker),
                    Err(_) => warning!(
                        "pgflow maintenance: could not start the worker (max_worker_processes reached?); trying again in {} s",
                        LAUNCHER_PAUSE.as_secs()
                    ),
                }
            } else if !said_waiting {
                log!(
                    "pgflow maintenance: waiting for database \"{database}\" (pgflow.maintenance_database) to be created"
                );
                said_waiting = true;
            }
        }
        // announcers: started when a database asks for one, forgotten when they stop
        announcers.retain(|(outbox, worker)| match worker.pid() {
            Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted) => true,
            Err(_) => {
                crate::events::announcer::announcer_gone(*outbox);
                false
            }
        });
        for (outbox, _database) in crate::events::announcer::take_requests() {
            match start(
                "pgflow announcer",
                "pgflow_announcer_main",
                Some(pg_sys::Datum::from(outbox)),
            ) {
                Ok(worker) => announcers.push((outbox, worker)),
                Err(_) => {
                    crate::events::announcer::announcer_gone(outbox);
                    warning!(
                        "pgflow: could not start an announcer (max_worker_processes reached?); sessions notify at their own commit meanwhile"
                    );
                }
            }
        }
        if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
            // SIGTERM or postmaster death: the workers get their own SIGTERM
            if let Some(worker) = maintenance {
                let _ = worker.terminate();
            }
            return;
        }
    }
}

/// Start a dynamic worker of this library; the launcher's latch is set when it stops.
fn start(
    name: &str,
    function: &str,
    argument: Option<pg_sys::Datum>,
) -> Result<DynamicBackgroundWorker, pgrx::bgworkers::DynamicBackgroundWorkerLoadError> {
    BackgroundWorkerBuilder::new(name)
        .set_type(name)
        .set_function(function)
        .set_library("pgflow")
        .enable_spi_access()
        .set_restart_time(None)
        .set_argument(argument)
        // SAFETY: a plain global of this process, set at its start.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
}

/// The worker, started by the launcher in the maintenance database.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pgflow_maintenance_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = maintenance_database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    log!("pgflow maintenance worker started in database \"{database}\"");

    let mut installed = false;
    let mut last_retention = Instant::now();
    let mut checks: u32 = 0;
    loop {
        let interval = gucs::MAINTENANCE_INTERVAL_MS.get().max(10) as u64;
        if !BackgroundWorker::wait_latch(Some(Duration::from_millis(interval))) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: a background worker re-reading its configuration on SIGHUP, outside any
            // transaction, as PostgreSQL's own workers do.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if !gucs::MAINTENANCE_ENABLED.get() {
            continue;
        }
        // Look for the extension now and then, not on every tick, until it is there.
        if !installed {
            if checks.is_multiple_of(20) {
                installed = BackgroundWorker::transaction(|| {
                    as_raised(|| {
                        Spi::get_one::<bool>(
                            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pgflow')",
                        )
                        .ok()
                        .flatten()
                        .unwrap_or(false)
                    })
                });
            }
            checks = checks.wrapping_add(1);
            if !installed {
                continue;
            }
        }
        // run_maintenance() catches and logs a failing step itself (a subtransaction per step),
        // so one bad pass does not end the worker; an error that still escapes (the extension
        // dropped under it) ends this process, and the launcher starts it again in 5 seconds.
        BackgroundWorker::transaction(|| as_raised(|| Spi::run("SELECT pgflow.run_maintenance()")))
            .unwrap_or_else(|e| warning!("pgflow maintenance pass failed: {e}"));
        // Retention is a scan of the archive and of finished runs: once a minute is plenty.
        if last_retention.elapsed() >= RETENTION_EVERY {
            last_retention = Instant::now();
            BackgroundWorker::transaction(|| {
                as_raised(|| Spi::run("SELECT pgflow.apply_retention()"))
            })
            .unwrap_or_else(|e| warning!("pgflow retention pass failed: {e}"));
        }
    }
    log!("pgflow maintenance worker stopping");
}
