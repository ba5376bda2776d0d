//! One bounded call (a push, a fetch) on a runtime of its own, as archive_command and
//! restore_command run them.

/// A single-threaded runtime: push and fetch handle one file each and must start fast.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Run one bounded call (push, fetch) on a fresh runtime and return without waiting for
/// blocking work it left behind (a stuck DNS lookup or file system call): the call's own time
/// bound is what PostgreSQL waits for, not a thread that outlived it.
pub fn run_call<F: std::future::Future>(call: F) -> std::io::Result<F::Output> {
    let rt = runtime()?;
    let out = rt.block_on(call);
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    Ok(out)
}
