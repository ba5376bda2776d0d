//! mimalloc settings for the long commands (daemon, backup, restore, drill).
//!
//! Both binaries use mimalloc, which returns freed chunk-sized buffers to the system (with glibc's
//! allocator the daemon's resident size kept growing with the 16 MiB buffers of parallel
//! uploads: 233 MiB peak measured with 2 uploads at once). The long commands also want mimalloc's
//! arenas committed as used rather than up front (`MIMALLOC_ARENA_EAGER_COMMIT=0`) and freed
//! memory given back at once (`MIMALLOC_PURGE_DELAY=0`). mimalloc reads these when the process
//! starts, before `main`, so such a command runs itself again once with them set. Measured peak
//! resident size with `--parallel 2` on file://: the daemon 26 to 31 MiB with them, 54 to 63
//! without; a full backup of pgbench scale 50 34 MiB with them, 126 without.
//!
//! The one-shot commands PostgreSQL runs per segment (push, fetch) never pay for the second
//! `exec`.

/// Run this program again with the settings above, unless one of them is already in the
/// environment. Returns only if that is so or the `exec` failed (the command then carries on
/// with mimalloc's defaults, after one line on stderr).
pub fn rerun_with_lean_allocator(program: &str) {
    use std::os::unix::process::CommandExt;
    const SETTINGS: [(&str, &str); 2] = [
        ("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
        ("MIMALLOC_PURGE_DELAY", "0"),
    ];
    if SETTINGS.iter().any(|(k, _)| std::env::var_os(k).is_some()) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let err = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .envs(SETTINGS)
        .exec();
    eprintln!("{program}: cannot run itself again with its allocator settings ({err}); carrying on");
}
