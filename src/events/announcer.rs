//! Announcements off the commit path: each database's outbox in shared memory and the
//! announcer process that empties it.
//!
//! A notifying commit takes PostgreSQL's cluster-wide notify lock and holds it until its WAL is
//! flushed, so every notifying commit of the cluster waits for the one before it. pgflow's
//! transactions therefore do not notify themselves. When one that collected events commits, it
//! copies them into its database's **outbox** in shared memory (after the commit, so only
//! committed work is ever there) and sets the latch of that database's **announcer**, a
//! background worker connected to the database. The announcer empties the outbox and sends,
//! in one transaction of its own, one notification per channel covering every transaction it
//! found, usually within a millisecond or two. The notify lock is then taken by one process per
//! database, once per batch, with `synchronous_commit` off (its transaction writes nothing but
//! the notifications, so it need not wait for a flush while holding the lock).
//!
//! Room in the outbox is reserved just before commit, while the transaction could still notify
//! by itself: when there is no room, no announcer, or no shared memory (pgflow not preloaded), it
//! notifies at commit as before, so an event is never lost for want of room. The reservation is
//! released if the transaction aborts after all.
//!
//! Announcers are started on demand by the maintenance launcher, one per database that has
//! something to announce (at most [`OUTBOXES`] databases at a time; more notify by
//! themselves), and stop after [`IDLE_EXIT`] without work, so that an idle database can be
//! dropped (`DROP DATABASE` waits up to 5 s for other sessions to leave).

use crate::pg::as_raised;
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgLwLock};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Databases that can have an announcer at the same time.
pub const OUTBOXES: usize = 8;
/// Bytes of announcements an outbox holds (each event is a few hundred bytes at most).
const OUTBOX_BYTES: usize = 64 * 1024;
/// A transaction whose events take more than this notifies by itself.
const MAX_DEFERRED_BYTES: usize = OUTBOX_BYTES / 4;
/// An announcer with nothing to do for this long stops (a later event starts one again).
pub const IDLE_EXIT: Duration = Duration::from_secs(2);
/// An announcer sends at most one batch per this interval: under load, the transactions of an
/// interval share one notifying commit and one wake-up of the announcer.
const MIN_BATCH_INTERVAL: Duration = Duration::from_millis(2);
/// After a failed start, no new announcer is asked for this database for this long.
const RETRY_AFTER_MS: i64 = 5_000;

const FREE: u8 = 0;
const REQUESTED: u8 = 1;
const STARTING: u8 = 2;
const RUNNING: u8 = 3;
const FAILED: u8 = 4;

#[derive(Copy, Clone)]
struct Outbox {
    /// The database (its OID) the outbox belongs to; 0 when unused.
    database: u32,
    state: u8,
    /// The announcer's process number while RUNNING.
    procno: i32,
    /// After a failed start: no new request before this time (milliseconds since start-up).
    retry_at_ms: i64,
    /// Bytes written by committed transactions, waiting for the announcer.
    used: u32,
    /// Bytes promised to transactions that are committing.
    reserved: u32,
    /// The announcer's latch was set since it last emptied the outbox: no need to set it again.
    signalled: bool,
    bytes: [u8; OUTBOX_BYTES],
}

impl Outbox {
    const fn new() -> Self {
        Outbox {
            database: 0,
            state: FREE,
            procno: -1,
            retry_at_ms: 0,
            used: 0,
            reserved: 0,
            signalled: false,
            bytes: [0; OUTBOX_BYTES],
        }
    }

    fn is_empty(&self) -> bool {
        self.used == 0 && self.reserved == 0
    }
}

#[derive(Copy, Clone)]
pub struct Outboxes {
    /// The launcher's process number, to wake it when an announcer is wanted; -1 if none.
    launcher: i32,
    boxes: [Outbox; OUTBOXES],
}
impl Default for Outboxes {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: integers and byte arrays, no pointers: valid in every process mapping the segment.
unsafe impl PGRXSharedMemory for Outboxes {}

impl Outboxes {
    pub const fn new() -> Self {
        Outboxes {
            launcher: -1,
            boxes: [Outbox::new(); OUTBOXES],
        }
    }
}

// SAFETY: the name is unique to this lock, initialised by pg_shmem_init! in events::init().
pub static OUTBOX: PgLwLock<Outboxes> = unsafe { PgLwLock::new(c"pgflow_outboxes") };

/// Milliseconds on a clock shared by all processes (PostgreSQL's timestamp).
fn now_ms() -> i64 {
    // SAFETY: reads the system clock; no preconditions.
    unsafe { pg_sys::GetCurrentTimestamp() / 1000 }
}

fn my_database() -> u32 {
    // SAFETY: a plain global of this backend, set when it connected to its database.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// Wake the process registered as `procno` in an outbox or as the launcher; -1: nobody.
fn set_latch_of(procno: i32) {
    if let Ok(procno) = usize::try_from(procno) {
        crate::pg::set_latch_of(procno);
    }
}

/// Records of one transaction: `channel`, `event` pairs, each length-prefixed (u16).
pub fn encode(events: &BTreeMap<String, Vec<Value>>) -> Vec<u8> {
    let mut out = Vec::new();
    for (channel, list) in events {
        for event in list {
            let text = crate::events::bounded(event);
            for part in [channel.as_bytes(), text.as_bytes()] {
                out.extend_from_slice(&(part.len() as u16).to_le_bytes());
                out.extend_from_slice(part);
            }
        }
    }
    out
}

/// The records of [`encode`], back as channel and event text; stops at a truncated record.
fn decode(mut bytes: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let take = |bytes: &mut &[u8]| -> Option<String> {
        let len = u16::from_le_bytes(bytes.get(..2)?.try_into().ok()?) as usize;
        let text = std::str::from_utf8(bytes.get(2..2 + len)?)
            .ok()?
            .to_string();
        *bytes = &bytes[2 + len..];
        Some(text)
    };
    while !bytes.is_empty() {
        let (Some(channel), Some(event)) = (take(&mut bytes), take(&mut bytes)) else {
            break;
        };
        out.push((channel, event));
    }
    out
}

/// Just before commit: reserve room for `len` bytes in this database's outbox. Returns the
/// outbox, or None when the transaction must notify by itself (no announcer running, no room,
/// too much); asks the launcher for an announcer when the database has none.
pub fn reserve(len: usize) -> Option<usize> {
    if len > MAX_DEFERRED_BYTES
        || !crate::events::wakeups_available()
        || !crate::gucs::NOTIFY_VIA_ANNOUNCER.get()
    {
        return None;
    }
    let database = my_database();
    let mut wake_launcher = -1;
    let reserved = {
        let mut board = OUTBOX.exclusive();
        let launcher = board.launcher;
        let found = board
            .boxes
            .iter()
            .position(|b| b.database == database)
            .or_else(|| {
                let now = now_ms();
                board.boxes.iter().position(|b| {
                    b.is_empty() && (b.state == FREE || (b.state == FAILED && now >= b.retry_at_ms))
                })
            });
        match found {
            None => None,
            Some(i) => {
                let b = &mut board.boxes[i];
                b.database = database;
                match b.state {
                    RUNNING if b.used as usize + b.reserved as usize + len <= OUTBOX_BYTES => {
                        b.reserved += len as u32;
                        Some(i)
                    }
                    RUNNING | REQUESTED | STARTING => None,
                    FAILED if now_ms() < b.retry_at_ms => None,
                    _ => {
                        b.state = REQUESTED;
                        wake_launcher = launcher;
                        None
                    }
                }
            }
        }
    };
    set_latch_of(wake_launcher);
    reserved
}

/// After commit: write the records into the outbox reserved for them and wake its announcer.
/// Cannot fail (room was reserved); called where an ERROR is no longer allowed.
pub fn deliver(outbox: usize, records: &[u8]) {
    let mut wake = -1;
    {
        let mut board = OUTBOX.exclusive();
        let launcher = board.launcher;
        let b = &mut board.boxes[outbox];
        let at = b.used as usize;
        b.bytes[at..at + records.len()].copy_from_slice(records);
        b.used += records.len() as u32;
        b.reserved -= records.len() as u32;
        match b.state {
            RUNNING if !b.signalled => {
                b.signalled = true;
                wake = b.procno;
            }
            RUNNING => {}
            // the announcer stopped since the reservation: ask for another, which empties it
            FREE | FAILED => {
                b.state = REQUESTED;
                wake = launcher;
            }
            _ => {}
        }
    }
    set_latch_of(wake);
}

/// The transaction aborted after reserving: give the room back.
pub fn release(outbox: usize, len: usize) {
    OUTBOX.exclusive().boxes[outbox].reserved -= len as u32;
}

// ---------------------------------------------------------------------------------------------
// The launcher's side
// ---------------------------------------------------------------------------------------------

/// The launcher registers itself, to be woken when an announcer is wanted.
pub fn register_launcher() {
    OUTBOX.exclusive().launcher = crate::pg::my_proc_number() as i32;
}

/// Outboxes whose database asked for an announcer; they are marked as being started.
pub fn take_requests() -> Vec<(usize, u32)> {
    let mut board = OUTBOX.exclusive();
    let mut out = Vec::new();
    for (i, b) in board.boxes.iter_mut().enumerate() {
        if b.state == REQUESTED {
            b.state = STARTING;
            out.push((i, b.database));
        }
    }
    out
}

/// The announcer of `outbox` could not be started, or stopped without clearing its state
/// (it could not connect: its database was dropped). Wait before asking again; an outbox left
/// with nothing in it is freed for any database.
pub fn announcer_gone(outbox: usize) {
    let mut board = OUTBOX.exclusive();
    let b = &mut board.boxes[outbox];
    if b.state == STARTING || b.state == RUNNING {
        b.state = FAILED;
        b.procno = -1;
        b.retry_at_ms = now_ms() + RETRY_AFTER_MS;
    }
}

// ---------------------------------------------------------------------------------------------
// The announcer
// ---------------------------------------------------------------------------------------------

/// The announcer's entry point, started by the launcher for one outbox (its argument).
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pgflow_announcer_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let outbox = arg.value();
    if outbox >= OUTBOXES {
        return;
    }
    let database = OUTBOX.share().boxes[outbox].database;
    // A database dropped meanwhile: this ends the process (FATAL), and the launcher frees the
    // outbox.
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(database)), None);
    // SAFETY: a background worker before any transaction; the strings are NUL-terminated
    // literals. Its transactions only notify: not waiting for their flush loses nothing, and
    // shortens the time the cluster-wide notify lock is held.
    unsafe {
        pg_sys::SetConfigOption(
            c"synchronous_commit".as_ptr(),
            c"off".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
        pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(outbox));
    }
    {
        let mut board = OUTBOX.exclusive();
        let b = &mut board.boxes[outbox];
        if b.database != database || b.state != STARTING {
            return;
        }
        b.state = RUNNING;
        b.procno = crate::pg::my_proc_number() as i32;
    }
    let mut idle_since = Instant::now();
    let mut last_batch = Instant::now() - MIN_BATCH_INTERVAL;
    loop {
        // under load, let the transactions of a short interval gather into one batch
        let since = last_batch.elapsed();
        if since < MIN_BATCH_INTERVAL {
            std::thread::sleep(MIN_BATCH_INTERVAL - since);
        }
        let records = take_all(outbox);
        if !records.is_empty() {
            announce(&records);
            idle_since = Instant::now();
            last_batch = Instant::now();
            continue;
        }
        if idle_since.elapsed() >= IDLE_EXIT && retire(outbox) {
            return;
        }
        let wait = IDLE_EXIT
            .saturating_sub(idle_since.elapsed())
            .max(Duration::from_millis(10));
        if !BackgroundWorker::wait_latch(Some(wait)) {
            // SIGTERM (shutdown): what is left is announced first
            let records = take_all(outbox);
            if !records.is_empty() {
                announce(&records);
            }
            return;
        }
    }
}

/// However the announcer ends: its outbox is no longer served (kept with what it holds, for the
/// next announcer of the database).
#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: std::ffi::c_int, arg: pg_sys::Datum) {
    let mut board = OUTBOX.exclusive();
    let b = &mut board.boxes[arg.value()];
    if b.state == RUNNING && b.procno == crate::pg::my_proc_number() as i32 {
        b.state = FREE;
        b.procno = -1;
    }
}

/// Everything in the outbox, which is emptied.
fn take_all(outbox: usize) -> Vec<u8> {
    let mut board = OUTBOX.exclusive();
    let b = &mut board.boxes[outbox];
    let records = b.bytes[..b.used as usize].to_vec();
    b.used = 0;
    b.signalled = false;
    records
}

/// Stop serving the outbox if nothing is in it or promised to it.
fn retire(outbox: usize) -> bool {
    let mut board = OUTBOX.exclusive();
    let b = &mut board.boxes[outbox];
    if !b.is_empty() {
        return false;
    }
    b.state = FREE;
    b.procno = -1;
    true
}

/// One notification per channel for all the records, in one transaction.
fn announce(records: &[u8]) {
    let per_channel = merge(decode(records));
    BackgroundWorker::transaction(|| {
        as_raised(|| {
            for (channel, events) in &per_channel {
                crate::events::notify(channel, &crate::events::payload_for(events));
            }
        })
    });
}

/// Events grouped by channel, in order; the `message_sent` events of one queue merged into
/// one, as within a transaction ([`crate::events::push_merged`]).
pub fn merge(records: Vec<(String, String)>) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (channel, text) in records {
        if let Ok(event) = serde_json::from_str::<Value>(&text) {
            crate::events::push_merged(out.entry(channel).or_default(), event);
        }
    }
    out
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;
    use serde_json::json;

    #[pg_test]
    fn records_round_trip_and_ranges_merge() {
        let mut a = BTreeMap::new();
        a.insert(
            "pgflow.queue.q".to_string(),
            vec![json!({"event": "message_sent", "queue": "q", "first_msg_id": 5, "last_msg_id": 7, "count": 3})],
        );
        a.insert(
            "pgflow.flows".to_string(),
            vec![json!({"event": "x", "run_id": "r"})],
        );
        let mut b = BTreeMap::new();
        b.insert(
            "pgflow.queue.q".to_string(),
            vec![json!({"event": "message_sent", "queue": "q", "first_msg_id": 2, "last_msg_id": 2, "count": 1})],
        );
        let mut bytes = encode(&a);
        bytes.extend(encode(&b));
        let merged = merge(decode(&bytes));
        assert_eq!(
            merged["pgflow.flows"],
            vec![json!({"event": "x", "run_id": "r"})]
        );
        assert_eq!(
            merged["pgflow.queue.q"],
            vec![
                json!({"event": "message_sent", "queue": "q", "first_msg_id": 2, "last_msg_id": 7, "count": 4})
            ]
        );
        // a truncated record is dropped, never read past
        assert_eq!(decode(&bytes[..bytes.len() - 1]).len(), 2);
    }
}
