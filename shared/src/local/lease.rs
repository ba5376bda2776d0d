//! One lease primitive for every local lock and in-flight note: a file naming its holder as
//! `"<pid> <start time>"` (the process start time in clock ticks since boot, field 22 of
//! `/proc/<pid>/stat`). A holder that died leaves a tag that no live process matches, even after
//! its pid is reused, so a stale lease is told from a live one without any timeout.

use std::io::Write;
use std::path::Path;

/// This process's tag.
pub fn own_tag() -> Option<String> {
    process_tag(std::process::id())
}

/// `"<pid> <start time>"` of a live process, `None` when there is no such process.
pub fn process_tag(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: count from the last ')'.
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let start = after.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

/// Whether `tag` names a process that is alive now (same pid, same start time).
pub fn tag_alive(tag: &str) -> bool {
    tag.split_whitespace()
        .next()
        .and_then(|pid| pid.parse::<u32>().ok())
        .and_then(process_tag)
        .is_some_and(|now| now == tag.trim())
}

/// Whether the lease file at `path` is held by a live process.
pub fn held(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|tag| tag_alive(&tag))
}

/// Take the lease at `path` for this process: `Ok(false)` when a live process holds it. A stale
/// lease is removed and taken; two processes racing for it cannot both win (`create_new`).
pub fn acquire(path: &Path) -> std::io::Result<bool> {
    let tag = own_tag().ok_or_else(|| std::io::Error::other("cannot read this process's /proc entry"))?;
    for _ in 0..3 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(mut f) => {
                f.write_all(tag.as_bytes())?;
                return Ok(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if held(path) {
                    return Ok(false);
                }
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Give back the lease at `path` if this process holds it (never another's).
pub fn release(path: &Path) {
    let ours = own_tag();
    if ours.is_some() && std::fs::read_to_string(path).ok() == ours {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_held_by_one_live_process_and_stale_ones_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("lock");
        assert!(acquire(&lock).unwrap());
        assert!(held(&lock));
        // Held by us: a second acquire (another process, as far as the file says) fails.
        assert!(!acquire(&lock).unwrap());
        release(&lock);
        assert!(!lock.exists());
        // A dead holder: our pid with another start time (pid reuse), or a bare pid.
        for stale in [
            format!("{} 1", std::process::id()),
            "999999999".to_string(),
            "junk".into(),
        ] {
            std::fs::write(&lock, &stale).unwrap();
            assert!(!held(&lock), "{stale}");
            assert!(acquire(&lock).unwrap(), "{stale}");
            release(&lock);
        }
        // Another live process's lease (pid 1) is neither taken nor released.
        std::fs::write(&lock, process_tag(1).unwrap()).unwrap();
        assert!(!acquire(&lock).unwrap());
        release(&lock);
        assert!(held(&lock));
    }
}
