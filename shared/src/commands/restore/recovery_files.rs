//! The writer of the configuration PostgreSQL reads to recover a restored directory:
//! `backup_label`, `tablespace_map`, the recovery settings in `postgresql.auto.conf` (see
//! [`crate::recovery_conf`]), `recovery.signal`, and the replay plan `walvault-recovery.json`
//! that `restore-agent fetch` and `status` count progress against. Everything written is what
//! the [`RestorePlan`] says.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::plan::RestorePlan;
use super::{RestoreError, write_err};
use crate::basebackup::manifest::Manifest;
use crate::replay::RecoveryPlan;

/// Write the replay plan (`walvault-recovery.json`) into the restored directory, when the plan
/// knows the replay ahead.
pub(crate) fn write_replay_plan(plan: &RestorePlan) -> Result<(), RestoreError> {
    let Some(span) = &plan.replay else { return Ok(()) };
    let pgdata = &plan.pgdata;
    let file = RecoveryPlan {
        format: crate::replay::PLAN_FORMAT.into(),
        version: crate::replay::FORMAT_VERSION,
        repository: plan.repository.clone(),
        backup: plan.backup.id.to_string(),
        wal_segment_size: plan.wal_segment_size,
        first_segment: span.first.to_string(),
        last_segment: span.last.to_string(),
        last_is_upper_bound: span.last_is_upper_bound,
        target: plan.recovery.target().describe(),
        timeline: plan.timeline.id,
        created_at_us: crate::time::now_micros(),
        // The directory exists for good now: the plan names it by device and inode, so that a
        // copy of it (pg_basebackup of the restored server) does not count against this plan.
        data_directory_id: crate::replay::files::data_directory_id(pgdata),
    };
    crate::replay::files::write_plan(pgdata, &file)
        .map_err(write_err(&crate::replay::files::plan_path(pgdata)))
}

/// `tablespace_map` as PostgreSQL writes and reads it: `<oid> <path>` lines, with `\\`, `\n` and
/// `\r` in the path escaped by a backslash.
fn tablespace_map(spaces: &BTreeMap<u32, PathBuf>) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut map = Vec::new();
    for (oid, p) in spaces {
        map.extend_from_slice(format!("{oid} ").as_bytes());
        for &b in p.as_os_str().as_bytes() {
            if matches!(b, b'\\' | b'\n' | b'\r') {
                map.push(b'\\');
            }
            map.push(b);
        }
        map.push(b'\n');
    }
    map
}

/// backup_label, tablespace_map, recovery settings and recovery.signal.
pub(crate) fn write_recovery_files(plan: &RestorePlan, m: &Manifest) -> Result<(), RestoreError> {
    let write = |name: &str, content: &[u8]| {
        let p = plan.pgdata.join(name);
        crate::local::crashsafe::write_durably(&p, content).map_err(write_err(&p))
    };
    write("backup_label", m.backup_label.as_bytes())?;
    // tablespace_map pointing at the chosen locations: PostgreSQL recreates pg_tblspc/<oid> as a
    // link to each. Never the manifest's own map: its locations are the source's, and links to
    // them would let recovery write wherever a hostile manifest says.
    if !plan.tablespaces.is_empty() {
        write("tablespace_map", &tablespace_map(&plan.tablespaces))?;
    }
    let auto = plan.pgdata.join("postgresql.auto.conf");
    let existing = std::fs::read_to_string(&auto).ok();
    let header = format!("Added by walvault: restore of backup {}", m.id);
    let conf = plan.recovery.render(existing.as_deref(), &header);
    write("postgresql.auto.conf", conf.as_bytes())?;
    let _ = std::fs::remove_file(plan.pgdata.join("standby.signal"));
    // Durable: write_durably syncs the data directory, and write_backup syncs every directory.
    write(plan.recovery.signal_file, b"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tablespace_map_is_escaped_as_postgres_reads_it() {
        let spaces = BTreeMap::from([
            (16400, PathBuf::from("/srv/ts1")),
            (16401, PathBuf::from("/srv/odd\nname\\x")),
        ]);
        assert_eq!(
            tablespace_map(&spaces),
            b"16400 /srv/ts1\n16401 /srv/odd\\\nname\\\\x\n".to_vec()
        );
    }
}
