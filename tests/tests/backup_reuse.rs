//! A second backup reads only the files that changed since the first: the others are taken
//! over with the first backup's chunks, unread, and the second backup still restores on its own
//! to exactly the data it was taken from.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde_json::Value;
use walvault_testkit::backup::{self, next_backup_second, take_backup, take_backup_with};
use walvault_testkit::fixtures::{RECOVERY_TIMEOUT, archiving_cluster};
use walvault_testkit::object::Sealed;
use walvault_testkit::workload::table_fingerprint;
use walvault_testkit::{Cluster, Repo};

/// walvault's margin (`backup::reuse::SETTLE`): a file written less than this before a backup
/// examined it is read again by the next one, so the first backup waits it out.
const SETTLE: Duration = Duration::from_secs(5);

/// Each file record of backup `id`'s manifest, by path: who read its bytes (`None`: that
/// backup did).
fn read_by(repo: &Repo, id: &str) -> Result<BTreeMap<String, Option<String>>> {
    let key = format!("backups/{id}/manifest.wvo");
    let manifest = Sealed::open(&repo.read(&key)?).with_context(|| format!("manifest {key}"))?;
    let json: Value = serde_json::from_slice(&manifest.content)?;
    json["files"]
        .as_array()
        .ok_or_else(|| anyhow!("manifest {id} has no file records"))?
        .iter()
        .map(|f| {
            let path = f["path"]
                .as_str()
                .ok_or_else(|| anyhow!("record without path: {f}"))?;
            Ok((path.to_string(), f["read_by"].as_str().map(str::to_string)))
        })
        .collect()
}

/// Backup `id` restored into a new cluster `name`, recovered to its consistency point and running.
fn restored_at_consistency(repo: &Repo, name: &str, id: &str) -> Result<Cluster> {
    let mut restored = Cluster::uninitialized(name)?;
    backup::restore(
        repo,
        &restored.data_dir(),
        &["--backup", id, "--target", "immediate"],
    )?
    .check()?;
    restored.set_conf(&[("archive_mode", "off")])?;
    restored.start_and_wait_recovery_end(RECOVERY_TIMEOUT)?;
    Ok(restored)
}

fn file_of(cluster: &Cluster, table: &str) -> Result<String> {
    cluster.query_one_string(&format!("SELECT pg_relation_filepath('{table}')"))
}

#[test]
fn a_second_backup_reads_only_what_changed_and_restores_exactly() -> Result<()> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("reuse-source", &repo, "")?;
    // Nothing but the test writes to the tables between the backups.
    source.execute("ALTER SYSTEM SET autovacuum = off")?;
    source.execute("SELECT pg_reload_conf()")?;
    source.pgbench(&["-i", "-s", "2", "-q"])?;
    source.execute("CHECKPOINT")?;
    std::thread::sleep(SETTLE + Duration::from_secs(1));
    let first = take_backup(&source, &repo)?;
    assert_eq!(first.reused_files, 0, "nothing to take over yet: {first:?}");

    // About 1% of the accounts, and a new table.
    source.execute(
        "UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid <= 2000;
         CREATE TABLE added AS SELECT g AS id, md5(g::text) AS body FROM generate_series(1, 5000) g;
         CHECKPOINT",
    )?;
    let at_second = [
        table_fingerprint(&source, "pgbench_accounts", "aid")?,
        table_fingerprint(&source, "pgbench_branches", "bid")?,
        table_fingerprint(&source, "added", "id")?,
    ];
    next_backup_second();
    let second = take_backup(&source, &repo)?;
    eprintln!("first: {first:?}\nsecond: {second:?}");

    let records = read_by(&repo, &second.id)?;
    let (accounts, branches, added) = (
        file_of(&source, "pgbench_accounts")?,
        file_of(&source, "pgbench_branches")?,
        file_of(&source, "added")?,
    );
    assert_eq!(
        records.get(&branches),
        Some(&Some(first.id.clone())),
        "{branches} (pgbench_branches, untouched) should be taken over from {}",
        first.id
    );
    assert_eq!(
        records.get(&accounts),
        Some(&None),
        "{accounts} (updated) should be read again"
    );
    assert_eq!(records.get(&added), Some(&None), "{added} (new) should be read");
    assert!(
        second.reused_files * 2 > second.files && second.reused_bytes > 0,
        "most files are unchanged and should not be read: {second:?}"
    );
    let taken_over = records.values().filter(|r| r.is_some()).count() as u64;
    assert_eq!(
        taken_over, second.reused_files,
        "the report counts what the manifest says"
    );

    // --read-all reads every file again, and finds all but the few changed chunks stored: a
    // small file changed since the first backup also stores again the chunk it shares with its
    // neighbours (those the second backup took over), about a tenth of the first backup here.
    next_backup_second();
    let third = take_backup_with(&source, &repo, &["--read-all"])?;
    assert_eq!(third.reused_files, 0, "--read-all takes nothing over: {third:?}");
    assert!(
        third.logical_bytes >= second.logical_bytes && third.new_bytes * 5 < first.new_bytes,
        "--read-all reads everything but stores only what changed: {third:?} vs {first:?}"
    );

    // Later changes must not show in a restore of the second backup to its consistency point.
    source.execute("UPDATE pgbench_branches SET bbalance = bbalance + 1; DELETE FROM added")?;
    source.stop()?;
    let restored = restored_at_consistency(&repo, "reuse-restored", &second.id)?;
    let restored_now = [
        table_fingerprint(&restored, "pgbench_accounts", "aid")?,
        table_fingerprint(&restored, "pgbench_branches", "bid")?,
        table_fingerprint(&restored, "added", "id")?,
    ];
    assert_eq!(
        restored_now, at_second,
        "the restore of {} differs from its source",
        second.id
    );
    Ok(())
}

/// A pack the previous backup relies on goes missing: a plain backup would name it again (and
/// `verify` would say so), `--read-all` finds it missing and stores its chunks again, and that
/// backup restores on its own.
#[test]
fn read_all_stores_again_the_chunks_of_a_missing_pack() -> Result<()> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("readall-source", &repo, "")?;
    source.pgbench(&["-i", "-s", "2", "-q"])?;
    source.execute("CHECKPOINT")?;
    let first = take_backup(&source, &repo)?;
    let (lost, lost_bytes) = repo
        .backup_objects()?
        .into_iter()
        .filter(|(k, _)| k.starts_with("packs/"))
        .max_by_key(|(_, size)| *size)
        .context("the first backup stored no pack")?;
    repo.delete(&lost)?;

    next_backup_second();
    let second = take_backup_with(&source, &repo, &["--read-all"])?;
    eprintln!("first: {first:?}\nsecond: {second:?}\nlost {lost} ({lost_bytes} bytes)");
    // What the pack held is stored again (some of it may have changed since: compressed anew).
    assert!(
        second.new_bytes * 2 >= lost_bytes,
        "--read-all stores again what the lost pack held ({lost_bytes} bytes): {second:?}"
    );
    let expected = table_fingerprint(&source, "pgbench_accounts", "aid")?;
    source.stop()?;

    let restored = restored_at_consistency(&repo, "readall-restored", &second.id)?;
    assert_eq!(
        table_fingerprint(&restored, "pgbench_accounts", "aid")?,
        expected,
        "the backup taken with --read-all after the loss differs from its source"
    );
    Ok(())
}
