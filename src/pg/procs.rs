//! Other processes: this backend's number among them, and waking one by its latch.

use pgrx::pg_sys;

/// This backend's number among PostgreSQL's processes (an index into `ProcGlobal->allProcs`):
/// `MyProc->pgprocno` up to PostgreSQL 16, `MyProcNumber` from 17 on.
pub fn my_proc_number() -> usize {
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    // SAFETY: MyProc is set for every backend before any SQL function can run.
    let n = unsafe { (*pg_sys::MyProc).pgprocno };
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    // SAFETY: a plain global, set at backend start.
    let n = unsafe { pg_sys::MyProcNumber };
    n as usize
}

/// Set the latch of the process numbered `procno` (what [`my_proc_number`] returned in it), to
/// wake it from a wait. The number must have been registered by that process itself while alive;
/// setting the latch of a process that has exited since is harmless.
pub fn set_latch_of(procno: usize) {
    // SAFETY: procno is a process's own number (the caller's contract), an index into
    // ProcGlobal->allProcs, which holds a PGPROC for every possible process.
    unsafe {
        let proc_ = (*pg_sys::ProcGlobal).allProcs.add(procno);
        pg_sys::SetLatch(&raw mut (*proc_).procLatch);
    }
}
