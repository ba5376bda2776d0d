//! The runtime the long commands (backup, restore, daemon, drill, verify, ...) run on.
//!
//! Tokio's blocking pool, where file I/O, compression and decompression run, starts a thread for a
//! task whenever none is idle at that instant, up to 512, and keeps an idle thread for 10 s. A
//! restore of 61,000 small files starts a writer task per file, at most
//! [`crate::commands::restore::OPEN_FILES`] at once; a writer's slot is freed as its task ends,
//! just before its thread is idle again, so the next writer often found no idle thread and
//! started one. The restore ended with 515 threads, 46 of them busy, and each thread keeps a
//! stack and mimalloc's per-thread heap: its peak RSS was 100 to 147 MiB. The pool is therefore
//! bounded, and an idle thread goes after a second.

/// At most this many blocking threads. Blocking tasks that wait for other blocking work must
/// always leave threads for it, or they wait forever:
/// * restore's writers, at most [`crate::commands::restore::OPEN_FILES`], each waiting for the
///   pieces other blocking tasks decode and read;
/// * restore's decoders, at most one per CPU, waiting for a `--fallback-repo` read (a local
///   read, or a DNS lookup, takes a blocking thread).
///
/// Twice the CPUs and 32 more are left for that. Every other blocking task (a backup's reads and
/// compression, an upload's sealing, a copy's checks) is awaited from async code and waits for
/// nothing, so above the bound it waits in the queue instead. `restore-agent prefetch`, whose
/// `--parallel` tasks may each wait for a fallback read, runs on tokio's default pool.
pub fn blocking_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    crate::commands::restore::OPEN_FILES + 2 * cpus + 32
}

/// How long an idle blocking thread is kept.
pub const KEEP_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// A multi-threaded runtime with the bounded blocking pool above.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(blocking_threads())
        .thread_keep_alive(KEEP_IDLE)
        .build()
}
