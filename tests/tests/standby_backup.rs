//! Backups from a streaming standby: `archive-agent backup --pgdata <standby> --pg-url <standby>
//! --primary-url <primary>` reads the standby's disk while the primary keeps committing, and the
//! result restores like any other backup, to instants past it.
//!
//! The standby is itself seeded from the repository (`restore-agent restore`, then
//! `standby.signal` and `primary_conninfo`), so the same test runs on every server version,
//! whatever client programs the machine has.

use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use walvault_testkit::backup::{self, Restore, take_backup, take_backup_with};
use walvault_testkit::fixtures::{BETWEEN_TRANSACTIONS, archive_everything, archiving_cluster_on};
use walvault_testkit::host::write_for_pg;
use walvault_testkit::object::Sealed;
use walvault_testkit::pg::PgInstall;
use walvault_testkit::workload;
use walvault_testkit::{Cluster, Repo};

#[test]
fn backup_from_a_standby_restores_past_it() -> Result<()> {
    standby_backup(PgInstall::default_install())
}

/// The same on PostgreSQL 18, the newest release (file:// only, like the rest of the matrix).
#[test]
fn matrix_standby_backup_pg18() -> Result<()> {
    standby_backup(PgInstall::of_major(18)?)
}

/// A hot standby of `primary`, seeded from `repo`'s newest backup, streaming from the primary.
fn start_standby(pg: &'static PgInstall, primary: &Cluster, repo: &Repo, name: &str) -> Result<Cluster> {
    let mut standby = Cluster::uninitialized_on(name, pg)?;
    backup::restore(repo, &standby.data_dir(), &[])?
        .check()
        .context("seeding the standby")?;
    std::fs::remove_file(standby.data_dir().join("recovery.signal")).context("recovery.signal")?;
    write_for_pg(&standby.data_dir().join("standby.signal"), b"")?;
    let conninfo = format!("host=127.0.0.1 port={} user=postgres", primary.port());
    standby.set_conf(&[
        ("primary_conninfo", &conninfo),
        ("hot_standby", "on"),
        // As a DBA would leave it: the primary archives; a standby with archive_mode = on
        // archives nothing.
        ("archive_mode", "on"),
    ])?;
    standby.start()?;
    Ok(standby)
}

fn standby_backup(pg: &'static PgInstall) -> Result<()> {
    let major = pg.major();
    let repo = Repo::new()?;
    let primary = archiving_cluster_on(pg, &format!("sb{major}-primary"), &repo, "")?;
    workload::create_ledger(&primary)?;
    let seed = take_backup(&primary, &repo)?;
    let standby = start_standby(pg, &primary, &repo, &format!("sb{major}-standby"))?;
    ensure!(
        standby.query_one_string("SELECT pg_is_in_recovery()::text")? == "true",
        "the standby is not in recovery"
    );
    backup::next_backup_second();

    // The primary commits without pause while the standby is backed up.
    let (states, taken) = workload::ledger_while(&primary, BETWEEN_TRANSACTIONS, || {
        thread::sleep(Duration::from_millis(600));
        let primary_url = primary.conn_string();
        let b = take_backup_with(&standby, &repo, &["--primary-url", &primary_url])?;
        // The repository as the backup left it, without the WAL archived since.
        let as_left = repo.copy()?;
        thread::sleep(Duration::from_millis(1500));
        Ok((b, as_left))
    })?;
    let (taken, as_left) = taken;
    archive_everything(&primary)?;
    ensure!(taken.id != seed.id, "the standby backup got the seed's id");

    // PostgreSQL took it on the standby: its label says so.
    let manifest = Sealed::open(&repo.read(&repo.manifest_key(&taken.id))?)?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.content)?;
    let label = manifest["backup_label"].as_str().unwrap_or_default();
    ensure!(
        label.contains("BACKUP FROM: standby"),
        "the backup was not taken on the standby:\n{label}"
    );
    drop(standby);

    // The backup waited for the right WAL and copied pg_control last: with nothing archived
    // after its stop segment, recovery still becomes consistent, on a state the primary had.
    let stop_lsn = workload::parse_lsn(&taken.stop_lsn)?;
    let stop_no = (stop_lsn - 1) / (16 << 20);
    assert_eq!(
        taken.stop_wal,
        format!("{:08X}{:08X}{:08X}", taken.timeline, stop_no >> 8, stop_no & 0xFF),
        "the stop segment is the one holding the byte before the stop LSN {}",
        taken.stop_lsn
    );
    for name in as_left.archived_names()? {
        if name.len() == 24 && name.as_str() > taken.stop_wal.as_str() {
            as_left.delete(&as_left.object_key(&name))?;
        }
    }
    let (consistent, _) = backup::restore_and_recover(
        &as_left,
        &format!("sb{major}-consistent"),
        Restore::with(&["--backup", &taken.id, "--target", "immediate"]).on(pg),
    )
    .context("the standby backup, recovered with only its own WAL")?;
    let at_consistency = workload::ledger_contents(&consistent)?;
    ensure!(
        states.iter().any(|s| s.contents == at_consistency),
        "PostgreSQL {major}: at its consistency point the standby backup holds a ledger the primary \
         never had: {at_consistency:?}"
    );
    drop(consistent);
    drop(as_left);

    // Restores past the standby backup use it and hold exactly the primary's state then: the
    // first instant after it became consistent, and one well after.
    let stop_micros = primary.unix_micros(&taken.stop_time)?;
    let edge = states
        .iter()
        .find(|s| s.unix_micros >= stop_micros)
        .context("no transaction after the standby backup")?;
    let late = &states[states.len() - 3];
    for (what, state) in [("edge", edge), ("late", late)] {
        let name = format!("sb{major}-{what}");
        let (restored, report) = backup::restore_and_recover(
            &repo,
            &name,
            Restore::with(&["--target-time", &state.time]).on(pg),
        )?;
        ensure!(
            report.contains(&format!("restored backup {}", taken.id)),
            "{name}: a target after the standby backup must be served by it:\n{report}"
        );
        assert_eq!(
            workload::ledger_contents(&restored)?,
            state.contents,
            "PostgreSQL {major}: {name} restored to {} from the standby backup",
            state.time
        );
    }
    Ok(())
}
