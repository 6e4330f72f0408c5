//! Events: notifications to LISTENing clients and wake-ups of blocked readers, both at commit.
//!
//! Two mechanisms, both fed by SQL functions during a transaction and acted on when it ends:
//!
//! * **Notifications.** Events are collected per channel in backend-local memory and handed to
//!   `Async_Notify` just before commit, merged so that a channel gets at most one notification
//!   per transaction whatever the number of sends (10,000 sends in one transaction announce one
//!   id range). Payloads are bounded below PostgreSQL's 8000-byte limit. An aborted transaction
//!   drops what it collected, so nothing is announced that did not commit.
//! * **Wake-ups.** `pgflow.read_with_poll` sleeps on its latch. A committed send bumps an epoch
//!   counter for the queue's bucket in shared memory and sets the latch of every reader waiting
//!   on that bucket, so the reader wakes within milliseconds instead of sleeping out its poll
//!   interval. Shared memory exists only when pgflow is in `shared_preload_libraries`; without
//!   it readers fall back to sleeping for the poll interval, which is still correct.

pub mod announcer;

use announcer::{Outboxes, OUTBOX};

use crate::error::raise;
use crate::names::check_name;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock, PgSqlErrorCode};
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};

/// PostgreSQL refuses payloads of 8000 bytes or more; stay clearly below.
pub const MAX_PAYLOAD_BYTES: usize = 7900;

/// Queues hash into this many wake-up buckets. A collision only causes a spurious wake-up.
const WAKE_BUCKETS: usize = 1024;
/// Waiting readers are tracked by their PGPROC number; a backend numbered beyond this polls.
const MAX_WAITERS: usize = 4096;

#[derive(Copy, Clone)]
pub struct WakeBoard {
    /// Bumped at every commit that sent to a queue of the bucket.
    epochs: [u64; WAKE_BUCKETS],
    /// For each PGPROC number: 0 when not waiting, else 1 + the bucket it waits on.
    waiting_on: [u32; MAX_WAITERS],
}
// SAFETY: plain integers, no pointers: valid in every process that maps the segment.
unsafe impl PGRXSharedMemory for WakeBoard {}

impl WakeBoard {
    const fn new() -> Self {
        WakeBoard {
            epochs: [0; WAKE_BUCKETS],
            waiting_on: [0; MAX_WAITERS],
        }
    }
}

// SAFETY: the name is unique to this lock, and the lock is initialised by pg_shmem_init! in init().
static WAKE_BOARD: PgLwLock<WakeBoard> = unsafe { PgLwLock::new(c"pgflow_wake_board") };
static SHARED_MEMORY: AtomicBool = AtomicBool::new(false);

/// Transaction nesting level (1 = top level, 2 = first savepoint, ...): what a savepoint
/// collected is dropped if it rolls back and handed to its parent if it is released.
type Level = i32;

fn current_level() -> Level {
    // SAFETY: reads a backend-local counter; no preconditions.
    unsafe { pg_sys::GetCurrentTransactionNestLevel() }
}

/// Messages sent to one queue in the open transaction.
struct SentRange {
    queue_name: String,
    first: i64,
    last: i64,
    count: i64,
    /// Whether the range is announced on the queue's channel (queue notify on, or
    /// send_with_notify was called).
    announce: bool,
}

impl SentRange {
    fn absorb(&mut self, other: SentRange) {
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
        self.count += other.count;
        self.announce |= other.announce;
    }

    /// The `message_sent` event that announces the range.
    fn event(&self) -> Value {
        json!({
            "event": "message_sent", "queue": self.queue_name,
            "first_msg_id": self.first, "last_msg_id": self.last, "count": self.count
        })
    }

    /// The range a `message_sent` event announces; None for any other event.
    fn of_event(event: &Value) -> Option<SentRange> {
        if event["event"] != "message_sent" {
            return None;
        }
        let n = |k: &str| event[k].as_i64().unwrap_or(0);
        Some(SentRange {
            queue_name: event["queue"].as_str()?.to_string(),
            first: n("first_msg_id"),
            last: n("last_msg_id"),
            count: n("count"),
            announce: true,
        })
    }
}

/// Add `event` to the events of one channel: a `message_sent` for a queue that already has one
/// there is merged into it (lowest and highest id, summed count), as the sends of one
/// transaction are; any other event is appended.
pub(crate) fn push_merged(events: &mut Vec<Value>, event: Value) {
    if let Some(range) = SentRange::of_event(&event) {
        let same_queue = events.iter_mut().find_map(|e| {
            SentRange::of_event(e)
                .filter(|r| r.queue_name == range.queue_name)
                .map(|r| (e, r))
        });
        if let Some((slot, mut merged)) = same_queue {
            merged.absorb(range);
            *slot = merged.event();
            return;
        }
    }
    events.push(event);
}

/// What this backend's open transaction will announce and wake when it commits, each item
/// tagged with the nesting level that collected it.
#[derive(Default)]
struct PendingEvents {
    /// (level, queue_id) -> the ids sent to the queue at that level, merged into one range.
    sent: BTreeMap<(Level, i64), SentRange>,
    /// Other events, in the order they happened: (level, channel, event).
    notifications: Vec<(Level, String, Value)>,
    /// (level, wake-up bucket).
    wake_buckets: BTreeSet<(Level, usize)>,
    /// Set just before commit when the events go to the database's announcer: the outbox
    /// reserved for them and the records to write there once the commit is done.
    deferred: Option<(usize, Vec<u8>)>,
}

impl PendingEvents {
    /// Nothing collected: most transactions (reads, acks, anything not sending) end here.
    fn is_empty(&self) -> bool {
        self.sent.is_empty()
            && self.notifications.is_empty()
            && self.wake_buckets.is_empty()
            && self.deferred.is_none()
    }

    /// A savepoint at `level` rolled back: forget what it and its children collected.
    fn drop_level(&mut self, level: Level) {
        self.sent.retain(|(l, _), _| *l < level);
        self.notifications.retain(|(l, _, _)| *l < level);
        self.wake_buckets.retain(|(l, _)| *l < level);
    }

    /// A savepoint at `level` was released: what it collected now belongs to its parent.
    fn release_level(&mut self, level: Level) {
        let moved: Vec<(Level, i64)> = self
            .sent
            .range((level, i64::MIN)..)
            .map(|(k, _)| *k)
            .collect();
        for key in moved {
            let range = self.sent.remove(&key).expect("key was just listed");
            match self.sent.entry((level - 1, key.1)) {
                std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().absorb(range),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(range);
                }
            }
        }
        for item in self
            .notifications
            .iter_mut()
            .filter(|(l, _, _)| *l >= level)
        {
            item.0 = level - 1;
        }
        self.wake_buckets = self
            .wake_buckets
            .iter()
            .map(|&(l, b)| (if l >= level { level - 1 } else { l }, b))
            .collect();
    }
}

thread_local! {
    static PENDING: RefCell<PendingEvents> = RefCell::new(PendingEvents::default());
}

/// Called from `_PG_init`: request shared memory when preloading, and hook transaction end.
pub fn init() {
    // SAFETY: called once from _PG_init, in the postmaster while preloading (where shared memory
    // may be requested) or in a backend loading the library; the callbacks are functions of
    // this library, which stays loaded for the life of the process.
    unsafe {
        if pg_sys::process_shared_preload_libraries_in_progress {
            pg_shmem_init!(WAKE_BOARD = WakeBoard::new());
            pg_shmem_init!(OUTBOX = Outboxes::new());
            SHARED_MEMORY.store(true, Ordering::Relaxed);
        }
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
}

/// Whether commit-time wake-ups are available (pgflow was preloaded).
pub fn wakeups_available() -> bool {
    SHARED_MEMORY.load(Ordering::Relaxed)
}

fn bucket_of(queue_id: i64) -> usize {
    (queue_id.unsigned_abs() % WAKE_BUCKETS as u64) as usize
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    if PENDING.with(|p| p.borrow().is_empty()) {
        return;
    }
    match event {
        XACT_EVENT_PRE_COMMIT => emit_notifications(),
        XACT_EVENT_COMMIT => {
            let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
            if let Some((outbox, records)) = &pending.deferred {
                crate::events::announcer::deliver(*outbox, records);
            }
            let buckets: BTreeSet<usize> =
                pending.wake_buckets.into_iter().map(|(_, b)| b).collect();
            if !buckets.is_empty() {
                wake(&buckets);
            }
        }
        // Aborted or handed to two-phase commit: announce nothing (a prepared transaction may
        // not NOTIFY); readers of a prepared send find it by polling once it is committed.
        XACT_EVENT_ABORT | XACT_EVENT_PRE_PREPARE | XACT_EVENT_PARALLEL_ABORT => {
            let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
            // aborted after the room for its events was reserved: give it back
            if let Some((outbox, records)) = &pending.deferred {
                crate::events::announcer::release(*outbox, records.len());
            }
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    _my_subid: pg_sys::SubTransactionId,
    _parent_subid: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    if PENDING.with(|p| p.borrow().is_empty()) {
        return;
    }
    // Called while the subtransaction ending is still the current one.
    match event {
        SUBXACT_EVENT_ABORT_SUB => PENDING.with(|p| p.borrow_mut().drop_level(current_level())),
        SUBXACT_EVENT_COMMIT_SUB => PENDING.with(|p| p.borrow_mut().release_level(current_level())),
        _ => {}
    }
}

unsafe extern "C-unwind" {
    // commands/async.h, not among the bindings pgrx generates. Called only through
    // pg_guard_ffi_boundary, so an ERROR it raises unwinds safely.
    fn Async_Notify(channel: *const std::ffi::c_char, payload: *const std::ffi::c_char);
}

/// At PRE_COMMIT the transaction can still notify; each channel gets one notification.
fn emit_notifications() {
    let (sent, collected) = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        (
            std::mem::take(&mut p.sent),
            std::mem::take(&mut p.notifications),
        )
    });
    // Every savepoint has ended by now; merge what remains per queue, whatever its level.
    let mut per_queue: BTreeMap<i64, SentRange> = BTreeMap::new();
    for ((_, queue_id), range) in sent {
        match per_queue.entry(queue_id) {
            std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().absorb(range),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(range);
            }
        }
    }
    let mut notifications: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for range in per_queue.into_values().filter(|r| r.announce) {
        let event = range.event();
        notifications
            .entry(queue_channel_of(&range.queue_name))
            .or_default()
            .push(event);
    }
    for (_, channel, event) in collected {
        notifications.entry(channel).or_default().push(event);
    }
    if notifications.is_empty() {
        return;
    }
    // Handed to the database's announcer after commit, if it has room; else notified here.
    let records = crate::events::announcer::encode(&notifications);
    if let Some(outbox) = crate::events::announcer::reserve(records.len()) {
        PENDING.with(|p| p.borrow_mut().deferred = Some((outbox, records)));
        return;
    }
    for (channel, events) in notifications {
        notify(&channel, &payload_for(&events));
    }
}

/// NOTIFY `channel` with `payload` when the current transaction commits.
pub(crate) fn notify(channel: &str, payload: &str) {
    let channel = std::ffi::CString::new(channel).expect("channel names hold no NUL");
    let payload = std::ffi::CString::new(payload).expect("JSON text holds no NUL");
    // SAFETY: inside a transaction; both strings are NUL-terminated and outlive the call,
    // which copies them; an ERROR it raises unwinds through the guard.
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| Async_Notify(channel.as_ptr(), payload.as_ptr()))
    };
}

/// One payload for all events of a channel in a transaction, always under MAX_PAYLOAD_BYTES:
/// a single event as itself, several as `{"event":"batch","events":[...]}` with as many as fit
/// and the number left out in `"omitted"`.
pub fn payload_for(events: &[Value]) -> String {
    if events.len() == 1 {
        return bounded(&events[0]);
    }
    let mut kept: Vec<Value> = Vec::new();
    let mut size = 64; // the envelope
    for event in events {
        let text = bounded(event);
        if size + text.len() + 1 > MAX_PAYLOAD_BYTES {
            break;
        }
        size += text.len() + 1;
        kept.push(serde_json::from_str(&text).expect("bounded() returns JSON"));
    }
    let omitted = events.len() - kept.len();
    let mut envelope = json!({"event": "batch", "count": events.len(), "events": kept});
    if omitted > 0 {
        envelope["omitted"] = json!(omitted);
    }
    envelope.to_string()
}

/// An event's JSON text, shrunk below MAX_PAYLOAD_BYTES by replacing its largest fields with
/// their sizes (`"<field>_bytes"`) until it fits; the identifying small fields survive.
pub fn bounded(event: &Value) -> String {
    let text = event.to_string();
    if text.len() < MAX_PAYLOAD_BYTES {
        return text;
    }
    let Value::Object(fields) = event else {
        return json!({"event": "oversized", "bytes": text.len()}).to_string();
    };
    let mut fields: Map<String, Value> = fields.clone();
    let mut by_size: Vec<(usize, String)> = fields
        .iter()
        .map(|(k, v)| (v.to_string().len(), k.clone()))
        .collect();
    by_size.sort_unstable_by(|a, b| b.cmp(a));
    for (size, key) in by_size {
        fields.remove(&key);
        let short_key: String = key.chars().take(64).collect();
        fields.insert(format!("{short_key}_bytes"), json!(size));
        let text = Value::Object(fields.clone()).to_string();
        if text.len() < MAX_PAYLOAD_BYTES {
            return text;
        }
    }
    json!({"event": "oversized", "bytes": text.len()}).to_string()
}

pub(crate) fn add_event(channel: String, event: Value) {
    let level = current_level();
    PENDING.with(|p| p.borrow_mut().notifications.push((level, channel, event)));
}

/// Wake the blocked readers of a queue when the transaction commits.
pub(crate) fn add_wake(queue_id: i64) {
    let level = current_level();
    PENDING.with(|p| {
        p.borrow_mut()
            .wake_buckets
            .insert((level, bucket_of(queue_id)))
    });
}

/// Merge a send of ids `first..=last` into the transaction's range for the queue, so any number
/// of sends in a transaction makes one announcement.
pub(crate) fn add_sent(
    queue_id: i64,
    queue_name: &str,
    first: i64,
    last: i64,
    count: i64,
    announce: bool,
) {
    add_wake(queue_id);
    let level = current_level();
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let range = p
            .sent
            .entry((level, queue_id))
            .or_insert_with(|| SentRange {
                queue_name: queue_name.to_string(),
                first,
                last,
                count: 0,
                announce: false,
            });
        range.absorb(SentRange {
            queue_name: String::new(),
            first,
            last,
            count,
            announce,
        });
    });
}

/// Bump the epochs of `buckets` and set the latch of every reader waiting on one of them.
fn wake(buckets: &BTreeSet<usize>) {
    if !wakeups_available() {
        return;
    }
    let mut waiting: Vec<usize> = Vec::new();
    {
        let mut board = WAKE_BOARD.exclusive();
        for &b in buckets {
            board.epochs[b] = board.epochs[b].wrapping_add(1);
        }
        for (procno, &w) in board.waiting_on.iter().enumerate() {
            if w != 0 && buckets.contains(&((w - 1) as usize)) {
                waiting.push(procno);
            }
        }
    }
    // every procno on the board was registered by a waiting backend as its own number
    for procno in waiting {
        crate::pg::set_latch_of(procno);
    }
}

/// The channel on which a queue's events are announced: `pgflow.queue.<queue_name>`, case kept.
pub fn queue_channel_of(queue_name: &str) -> String {
    format!("pgflow.queue.{queue_name}")
}

/// The channel of one flow's events: `pgflow.flow.<flow_slug>`, case kept.
pub fn flow_channel_of(flow_slug: &str) -> String {
    format!("pgflow.flow.{flow_slug}")
}

/// `pgflow.queue_channel(queue_name)`: the channel to LISTEN on for a queue's events.
#[pg_extern(immutable, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn queue_channel(queue_name: Option<&str>) -> String {
    check_name(queue_name, "queue_name");
    queue_channel_of(queue_name.unwrap_or_default())
}

/// `pgflow.flow_channel(flow_slug)`: the channel to LISTEN on for a flow's workflow events.
#[pg_extern(immutable, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn flow_channel(flow_slug: Option<&str>) -> String {
    check_name(flow_slug, "flow_slug");
    flow_channel_of(flow_slug.unwrap_or_default())
}

/// Internal: messages `first..=last` (`count` of them) were sent to a queue in this transaction.
/// Wakes its blocked readers at commit, and announces the range on the queue's channel at
/// commit when `announce` is true (here or in any other call for the queue in the transaction).
#[pg_extern(volatile, parallel_unsafe, name = "_on_commit_sent")]
#[search_path(pg_catalog, pg_temp)]
fn on_commit_sent(
    queue_id: i64,
    queue_name: &str,
    first: i64,
    last: i64,
    count: i64,
    announce: bool,
) {
    add_sent(queue_id, queue_name, first, last, count, announce);
}

/// Internal: wake the blocked readers of a queue at commit (a retry or delayed message is due).
#[pg_extern(volatile, parallel_unsafe, name = "_on_commit_wake")]
#[search_path(pg_catalog, pg_temp)]
fn on_commit_wake(queue_id: i64) {
    add_wake(queue_id);
}

/// Internal: announce `event` (a JSON object) on `channel` when the transaction commits.
#[pg_extern(volatile, parallel_unsafe, name = "_on_commit_notify")]
#[search_path(pg_catalog, pg_temp)]
fn on_commit_notify(channel: &str, event: pgrx::JsonB) {
    if channel.is_empty() || channel.len() >= 64 {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("channel must be 1 to 63 bytes, not {}", channel.len()),
            None,
        );
    }
    add_event(channel.to_string(), event.0);
}

/// Internal: the current wake-up epoch of a queue's bucket (0 without shared memory). A reader
/// takes it before looking for messages and passes it to `_wait_for_wake`, so a send that
/// commits in between is never missed.
#[pg_extern(volatile, parallel_unsafe, name = "_wake_epoch")]
#[search_path(pg_catalog, pg_temp)]
pub(crate) fn wake_epoch(queue_id: i64) -> i64 {
    if !wakeups_available() {
        return 0;
    }
    WAKE_BOARD.share().epochs[bucket_of(queue_id)] as i64
}

/// Internal: sleep up to `timeout_ms`, returning early (true) once a send to the queue's bucket
/// commits after `epoch` was taken. Without shared memory this is an interruptible sleep.
#[pg_extern(volatile, parallel_unsafe, name = "_wait_for_wake")]
#[search_path(pg_catalog, pg_temp)]
pub(crate) fn wait_for_wake(queue_id: i64, epoch: i64, timeout_ms: i32) -> bool {
    let timeout_ms = timeout_ms.max(0) as i64;
    let bucket = bucket_of(queue_id);
    let procno = crate::pg::my_proc_number();
    if !wakeups_available() || procno >= MAX_WAITERS {
        sleep_on_latch(timeout_ms);
        return false;
    }
    {
        let mut board = WAKE_BOARD.exclusive();
        if board.epochs[bucket] as i64 != epoch {
            return true;
        }
        board.waiting_on[procno] = bucket as u32 + 1;
    }
    // Clear the registration however the wait ends, a cancel included.
    let woke = PgTryBuilder::new(|| {
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms as u64);
        loop {
            if WAKE_BOARD.share().epochs[bucket] as i64 != epoch {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            sleep_on_latch(left.as_millis().max(1) as i64);
        }
    })
    .finally(|| {
        WAKE_BOARD.exclusive().waiting_on[procno] = 0;
    })
    .execute();
    woke
}

/// Wait on this backend's latch for up to `timeout_ms`, honouring cancel and postmaster death.
/// A cancel or statement timeout (what every graceful shutdown sends a waiting consumer) is
/// raised as PostgreSQL raised it, without a Rust backtrace ([`crate::pg::as_raised`]).
fn sleep_on_latch(timeout_ms: i64) {
    crate::pg::as_raised(|| {
        // SAFETY: MyLatch is this backend's own latch, set up before any SQL function runs.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                timeout_ms,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    })
}

/// `pgflow.wakeups_enabled()`: whether blocking reads are woken at commit (pgflow preloaded)
/// rather than polling.
#[pg_extern(stable, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn wakeups_enabled() -> bool {
    wakeups_available()
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn one_event_is_its_own_payload() {
        let e = json!({"event": "message_sent", "queue": "q", "first_msg_id": 1});
        assert_eq!(payload_for(std::slice::from_ref(&e)), e.to_string());
    }

    #[pg_test]
    fn large_fields_are_replaced_by_their_size() {
        let e = json!({"event": "workflow_started", "run_id": "r", "input": "x".repeat(20_000)});
        let text = payload_for(&[e]);
        assert!(text.len() < MAX_PAYLOAD_BYTES);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["run_id"], "r");
        assert_eq!(v["input_bytes"], 20_002);
    }

    #[pg_test]
    fn many_events_fit_one_payload() {
        let events: Vec<Value> = (0..1000)
            .map(|i| json!({"event": "task_completed", "task_index": i, "pad": "y".repeat(50)}))
            .collect();
        let text = payload_for(&events);
        assert!(text.len() < MAX_PAYLOAD_BYTES);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["count"], 1000);
        let kept = v["events"].as_array().unwrap().len();
        assert_eq!(v["omitted"].as_u64().unwrap() as usize, 1000 - kept);
    }

    #[pg_test]
    fn sends_in_one_transaction_merge_into_one_range() {
        PENDING.with(|p| *p.borrow_mut() = PendingEvents::default());
        add_sent(7, "q", 5, 5, 1, false);
        add_sent(7, "q", 6, 9, 4, false);
        add_sent(7, "q", 3, 3, 1, true);
        add_sent(7, "q", 3, 3, 0, true);
        PENDING.with(|p| {
            let p = p.borrow();
            assert_eq!(p.sent.len(), 1);
            let r = p.sent.values().next().unwrap();
            assert_eq!((r.first, r.last, r.count, r.announce), (3, 9, 6, true));
            assert!(p.wake_buckets.iter().any(|&(_, b)| b == bucket_of(7)));
        });
        PENDING.with(|p| *p.borrow_mut() = PendingEvents::default());
    }

    #[pg_test]
    fn savepoints_drop_or_hand_up_what_they_collected() {
        let mut p = PendingEvents::default();
        let range = |first, last, count| SentRange {
            queue_name: "q".into(),
            first,
            last,
            count,
            announce: true,
        };
        p.sent.insert((1, 7), range(1, 1, 1));
        p.sent.insert((2, 7), range(2, 3, 2));
        p.sent.insert((3, 7), range(4, 4, 1));
        p.notifications.push((3, "c".into(), json!({"event": "x"})));
        p.wake_buckets.insert((3, 5));
        // the innermost savepoint rolls back
        p.drop_level(3);
        assert_eq!(p.sent.len(), 2);
        assert!(p.notifications.is_empty() && p.wake_buckets.is_empty());
        // the next one is released into the top level
        p.release_level(2);
        assert_eq!(p.sent.len(), 1);
        let r = &p.sent[&(1, 7)];
        assert_eq!((r.first, r.last, r.count), (1, 3, 3));
    }
}
