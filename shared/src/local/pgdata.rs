//! A PostgreSQL data directory seen from outside: whether a server is running on it. Restore
//! refuses to write into a directory a live server owns, and `restore-agent status` tells a
//! running recovery from a stopped one, by the same test.

use std::path::Path;

/// The pid in `pgdata/postmaster.pid` when that process is alive: a running server owns the
/// directory, and restoring over it would corrupt both.
pub fn running_postmaster(pgdata: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    // A single-user backend writes its pid negated.
    let pid: i64 = text.lines().next()?.trim().parse().ok()?;
    let pid = u32::try_from(pid.unsigned_abs()).ok()?;
    (pid > 0 && Path::new("/proc").join(pid.to_string()).exists()).then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_postmaster_is_named_a_stale_or_missing_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(running_postmaster(dir.path()), None, "no postmaster.pid");
        let me = std::process::id();
        std::fs::write(dir.path().join("postmaster.pid"), format!("{me}\n/data\n")).unwrap();
        assert_eq!(running_postmaster(dir.path()), Some(me));
        // A single-user backend writes its pid negated.
        std::fs::write(dir.path().join("postmaster.pid"), format!("-{me}\n")).unwrap();
        assert_eq!(running_postmaster(dir.path()), Some(me));
        std::fs::write(dir.path().join("postmaster.pid"), "not a pid\n").unwrap();
        assert_eq!(running_postmaster(dir.path()), None);
    }
}
