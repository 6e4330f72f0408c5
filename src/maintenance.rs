//! The maintenance worker: what must happen while no client calls in.
//!
//! Started only when pgflow is in `shared_preload_libraries`. Every
//! `pgflow.maintenance_interval_ms` it runs `pgflow.run_maintenance()` in a short transaction of
//! its own: that announces delayed messages and retries which came due (waking blocked readers
//! and notifying listeners) and removes leftovers of dropped queues. The logic lives in SQL so
//! it can be called by hand as well; this loop only keeps it running, survives a failing pass
//! (logged, retried on the next tick) and waits while the extension is not installed. Once a
//! minute it also runs `pgflow.apply_retention()` (archived messages and finished runs older
//! than `pgflow.archive_retention` / `pgflow.run_retention`).

use crate::gucs;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// How often the worker applies `pgflow.archive_retention` and `pgflow.run_retention`.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

pub fn register() {
    BackgroundWorkerBuilder::new("pgflow maintenance")
        .set_type("pgflow maintenance")
        .set_function("pgflow_maintenance_main")
        .set_library("pgflow")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pgflow_maintenance_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = gucs::MAINTENANCE_DATABASE
        .get()
        .and_then(|c| c.into_string().ok())
        .unwrap_or_else(|| "postgres".to_string());
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
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if !gucs::MAINTENANCE_ENABLED.get() {
            continue;
        }
        // Look for the extension now and then, not on every tick, until it is there.
        if !installed {
            if checks.is_multiple_of(20) {
                installed = BackgroundWorker::transaction(|| {
                    Spi::get_one::<bool>(
                        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pgflow')",
                    )
                    .ok()
                    .flatten()
                    .unwrap_or(false)
                });
            }
            checks = checks.wrapping_add(1);
            if !installed {
                continue;
            }
        }
        // run_maintenance() catches and logs a failing step itself (a subtransaction per step),
        // so one bad pass does not end the worker; an error that still escapes (the extension
        // dropped under it) ends this process, and the postmaster restarts it in 5 seconds.
        BackgroundWorker::transaction(|| Spi::run("SELECT pgflow.run_maintenance()"))
            .unwrap_or_else(|e| warning!("pgflow maintenance pass failed: {e}"));
        // Retention is a scan of the archive and of finished runs: once a minute is plenty.
        if last_retention.elapsed() >= RETENTION_EVERY {
            last_retention = Instant::now();
            BackgroundWorker::transaction(|| Spi::run("SELECT pgflow.apply_retention()"))
                .unwrap_or_else(|e| warning!("pgflow retention pass failed: {e}"));
        }
    }
    log!("pgflow maintenance worker stopping");
}
