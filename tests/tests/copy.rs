//! `archive-agent init --copy-of` and `archive-agent copy --to`: a second copy of the repository,
//! on another store, that restores exactly on its own.
//! - A copy cut off by a signal leaves a target that verifies (no backup without its data), and
//!   the next run finishes it; a copy right after a complete one writes nothing.
//! - Every object of the source is on the target byte for byte (read here, not through walvault).
//! - With the source unreachable, a restore from the copy reaches the exact state asked for.
//! - `--prune` follows expire and nothing else; a damaged source object is not spread.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use walvault_testkit::agents::{ARCHIVE_AGENT, RESTORE_AGENT, agents};
use walvault_testkit::backup::{self, Restore, next_backup_second, take_backup};
use walvault_testkit::copy::{copy, copy_args, copy_location, report};
use walvault_testkit::fixtures::{archive_everything, archiving_cluster};
use walvault_testkit::repo::StoreKind;
use walvault_testkit::workload::{self, Ledger, LedgerState};
use walvault_testkit::{Cluster, Repo};

fn steps(cluster: &Cluster, n: usize) -> Result<Vec<LedgerState>> {
    let mut ledger = Ledger::connect(cluster)?;
    (0..n).map(|_| ledger.step()).collect()
}

/// Every object of `source` but its descriptor and locks is on `target` with the same bytes.
fn assert_same_objects(source: &Repo, target: &Repo) -> Result<usize> {
    let theirs = target.files()?;
    let mut n = 0;
    for key in source.files()?.keys() {
        if key == "walvault.json" || key.starts_with("locks/") {
            continue;
        }
        ensure!(theirs.contains_key(key), "{key} is not on the copy");
        ensure!(
            source.read(key)? == target.read(key)?,
            "{key} differs on the copy"
        );
        n += 1;
    }
    Ok(n)
}

#[test]
fn a_copy_on_another_store_restores_exactly_on_its_own() -> Result<()> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("copy-source", &repo, "")?;
    workload::create_ledger(&source)?;
    source.execute(
        "CREATE TABLE payload (id integer, body text);
         INSERT INTO payload SELECT g, md5(g::text) || md5((g * 7)::text) FROM generate_series(1, 60000) g",
    )?;
    steps(&source, 5)?;
    take_backup(&source, &repo)?;
    next_backup_second();
    let after = steps(&source, 20)?;
    take_backup(&source, &repo)?;
    steps(&source, 10)?;
    archive_everything(&source)?;
    source.stop()?;

    // Another store than the source's: file to S3, or S3 / Azure to file.
    let other = match repo.kind() {
        StoreKind::File => StoreKind::S3,
        StoreKind::S3 | StoreKind::Azure => StoreKind::File,
    };
    let target = copy_location(&repo, other)?;

    // Cut off after a second at 1 MiB/s: part of it is there, and what is there verifies.
    let mut cut = agents().command(ARCHIVE_AGENT);
    cut.args(copy_args(&repo, &target, &["--max-rate", "1MiB"]));
    let mut child = cut.spawn().context("spawning copy")?;
    std::thread::sleep(Duration::from_millis(1500));
    // SIGTERM to runuser, which passes it on: archive-agent copy dies where it is.
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    let partial = target.files()?.len();
    let mut verify = vec!["verify".to_string()];
    verify.extend(target.args());
    let checked = agents().run(RESTORE_AGENT, &verify);
    ensure!(
        checked.code() == Some(0),
        "a copy cut off after {partial} objects must still verify:\n{checked}"
    );

    let first = report(&copy(&repo, &target, &[]).check()?)?;
    ensure!(
        first["copied"]["objects"].as_u64() > Some(0),
        "the second run copies what the first left: {first:#}"
    );
    let n = assert_same_objects(&repo, &target)?;
    let again = report(&copy(&repo, &target, &[]).check()?)?;
    assert_eq!(
        again["copied"]["objects"], 0,
        "a second copy writes nothing: {again:#}"
    );
    assert_eq!(again["present"]["objects"].as_u64(), Some(n as u64), "{again:#}");

    // The source gone: the copy alone restores to the instant asked for.
    repo.set_reachable(false)?;
    let target_state = &after[12];
    let restored = backup::assert_restores_to(&target, "copy-restored", target_state, Restore::default());
    repo.set_reachable(true)?;
    let (restored, _) = restored?;
    assert_eq!(
        restored.query_one_string("SELECT count(*) FROM payload")?,
        "60000"
    );
    Ok(())
}

#[test]
fn prune_follows_expire_and_damaged_objects_are_not_spread() -> Result<()> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("copy-prune", &repo, "")?;
    workload::create_ledger(&source)?;
    steps(&source, 5)?;
    let first = take_backup(&source, &repo)?;
    next_backup_second();
    steps(&source, 5)?;
    archive_everything(&source)?;
    source.execute("SELECT pg_switch_wal()")?;
    take_backup(&source, &repo)?;
    let kept = steps(&source, 10)?;
    archive_everything(&source)?;
    let target = copy_location(&repo, repo.kind())?;
    copy(&repo, &target, &[]).check()?;
    let first_manifest = repo.manifest_key(&first.id);
    ensure!(target.has(&first_manifest), "both backups are on the copy");

    // Expire on the source removes the first backup and the WAL only it needed; prune follows.
    let mut expire = vec!["expire".to_string()];
    expire.extend(repo.args());
    expire.extend(["--keep-last", "1"].map(String::from));
    agents().run(ARCHIVE_AGENT, expire).check()?;
    ensure!(!repo.has(&first_manifest), "expire removed the first backup");
    let gone: Vec<String> = target
        .files()?
        .into_keys()
        .filter(|k| k.starts_with("wal/0") && !repo.has(k))
        .collect();
    ensure!(!gone.is_empty(), "expire removed WAL the copy still holds");
    // Without --prune the copy keeps it all.
    copy(&repo, &target, &[]).check()?;
    ensure!(target.has(&first_manifest), "no --prune, nothing deleted");
    let pruned = report(&copy(&repo, &target, &["--prune"]).check()?)?;
    ensure!(pruned["pruned"]["objects"].as_u64() > Some(0), "{pruned:#}");
    ensure!(!target.has(&first_manifest), "pruned: the expired backup");
    for key in &gone {
        ensure!(
            !target.has(key),
            "{key} is gone from the source, so prune removes it from the copy (the copy holds {:?})",
            target.files()?.into_keys().collect::<Vec<_>>()
        );
    }
    assert_same_objects(&repo, &target)?;

    // A damaged segment in the source is refused, named, and not spread.
    steps(&source, 10)?;
    let last = archive_everything(&source)?;
    source.stop()?;
    let key = repo.object_key(&last);
    let mut bytes = repo.read(&key)?;
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    repo.write(&key, &bytes)?;
    let run = copy(&repo, &target, &[]);
    run.assert_code(3);
    let damaged = report(&run)?;
    ensure!(
        damaged["damaged"].to_string().contains(&last),
        "the damaged segment is named: {damaged:#}"
    );
    ensure!(!target.has(&key), "a damaged object is never copied");

    // info with the copy behind: each repository's reach side by side, the copy one segment short.
    let mut info = vec!["info".to_string(), "--json".into()];
    info.extend(repo.args());
    info.extend(["--fallback-repo".to_string(), target.url()]);
    let shown: Value = serde_json::from_str(&agents().run(RESTORE_AGENT, &info).check()?.stdout)?;
    let rows = &shown["side_by_side"];
    assert_eq!(rows[0]["repository"], repo.url().as_str(), "{shown:#}");
    assert_eq!(rows[0]["wal_to"], last.as_str(), "{shown:#}");
    assert_eq!(rows[1]["repository"], target.url().as_str(), "{shown:#}");
    ensure!(
        rows[1]["wal_to"].as_str() < Some(last.as_str()),
        "the copy lacks the damaged segment: {shown:#}"
    );

    // The copy still restores to a state it holds.
    let (restored, _) = backup::restore_and_recover(
        &target,
        "copy-pruned",
        Restore::with(&["--target-time", kept[5].time.as_str()]),
    )?;
    assert_eq!(workload::ledger_contents(&restored)?, kept[5].contents);
    Ok(())
}

#[test]
fn the_daemon_keeps_a_second_copy_within_its_lag() -> Result<()> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("copy-daemon", &repo, "")?;
    let target = copy_location(&repo, repo.kind())?;
    let mut extra = vec![
        "--copy-to".to_string(),
        target.url(),
        "--copy-every".into(),
        "1s".into(),
    ];
    if let Some(c) = target.config_path() {
        extra.extend(["--copy-to-config".to_string(), c.display().to_string()]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let daemon = walvault_testkit::daemon::Daemon::start(&source, &repo, &extra)?;
    workload::create_ledger(&source)?;
    take_backup(&source, &repo)?;
    let states = steps(&source, 20)?;
    let last = archive_everything(&source)?;
    // The newest segment reaches the copy without anyone running copy, and the metrics say how
    // far behind the copy is.
    let key = repo.object_key(&last);
    let poll = Duration::from_millis(200);
    walvault_testkit::host::wait_for(
        "the newest segment on the copy",
        Duration::from_secs(60),
        poll,
        || {
            Ok(match target.has(&key) {
                true => walvault_testkit::host::Poll::Done(()),
                false => walvault_testkit::host::Poll::Waiting(format!(
                    "{} objects on the copy",
                    target.files()?.len()
                )),
            })
        },
    )?;
    // Then a complete pass that started after it was there: everything up to it is on the copy.
    let there = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64()
        .ceil();
    walvault_testkit::host::wait_for(
        "a complete copy pass after it",
        Duration::from_secs(60),
        poll,
        || {
            let complete = daemon
                .metric("walvault_copy_complete_timestamp_seconds")?
                .unwrap_or(0.0);
            Ok(match complete >= there {
                true => walvault_testkit::host::Poll::Done(()),
                false => walvault_testkit::host::Poll::Waiting(format!("last complete pass from {complete}")),
            })
        },
    )?;
    let lag = daemon
        .metric("walvault_copy_lag_seconds")?
        .context("no copy_lag_seconds")?;
    ensure!((0.0..30.0).contains(&lag), "copy_lag_seconds {lag}");
    ensure!(
        daemon.metric("walvault_copy_lag_bytes")?.is_some(),
        "copy_lag_bytes is exposed"
    );
    ensure!(
        daemon.metric("walvault_copy_bytes_total")? > Some(0.0),
        "the copy moved bytes:\n{}\n{}",
        daemon.http_get("/metrics")?,
        daemon.log()
    );
    daemon.stop()?;
    source.stop()?;
    // What the daemon copied restores on its own.
    let (restored, _) = backup::restore_and_recover(
        &target,
        "copy-daemon-restored",
        Restore::with(&["--target-time", states[15].time.as_str()]),
    )?;
    assert_eq!(workload::ledger_contents(&restored)?, states[15].contents);
    Ok(())
}

#[test]
fn an_encrypted_repository_copies_sealed_and_opens_with_the_same_key() -> Result<()> {
    const KEY: &str = "copy test passphrase, stretched by argon2id";
    const NEW_KEY: &str = "9f2b6c1e4d8a0f3b7c5e9a1d2f4b6c8e0a2c4e6f8b1d3f5a7c9e0b2d4f6a8c1e";
    let mut repo = Repo::new_encrypted(KEY)?;
    let mut source = archiving_cluster("copy-encrypted", &repo, "")?;
    workload::create_ledger(&source)?;
    take_backup(&source, &repo)?;
    let states = steps(&source, 10)?;
    archive_everything(&source)?;
    source.stop()?;
    let mut target = copy_location(&repo, repo.kind())?;
    ensure!(
        target.read("walvault.json")? != repo.read("walvault.json")?,
        "the copy's descriptor names its source"
    );
    // The copy's own configuration needs the key too (on an object store it has one of its own).
    target.use_key("key", KEY)?;
    copy(&repo, &target, &[]).check()?;
    // Byte for byte: the sealed objects are the source's, never decrypted on the way.
    assert_same_objects(&repo, &target)?;

    // The source's key rotated: the next copy carries the new wrap over, and the copy opens
    // with the new key only, like its source.
    let new_key = repo.scratch().path().join("new-key");
    walvault_testkit::host::write_for_pg(&new_key, NEW_KEY.as_bytes())?;
    let mut rekey = vec!["rekey".to_string()];
    rekey.extend(repo.args());
    rekey.extend(["--new-key-file".to_string(), new_key.display().to_string()]);
    agents().run(ARCHIVE_AGENT, rekey).check()?;
    repo.use_key("key", NEW_KEY)?;
    target.use_key("key", NEW_KEY)?;
    copy(&repo, &target, &[]).check()?;
    let wrap = |r: &Repo| -> Result<Value> {
        let d: Value = serde_json::from_slice(&r.read("walvault.json")?)?;
        Ok(d["encryption"].clone())
    };
    assert_eq!(wrap(&target)?, wrap(&repo)?, "the copy's wrap is the source's");
    // Without the key the copy is as closed as the source; with it, it restores.
    target.forget_key()?;
    let mut restore = vec!["info".to_string()];
    restore.extend(target.args());
    let keyless = agents().run(RESTORE_AGENT, &restore);
    ensure!(keyless.code() != Some(0), "no key, no info:\n{keyless}");
    target.use_key("key", NEW_KEY)?;
    let (restored, _) = backup::restore_and_recover(
        &target,
        "copy-encrypted-restored",
        Restore::with(&["--target-time", states[6].time.as_str()]),
    )?;
    assert_eq!(workload::ledger_contents(&restored)?, states[6].contents);
    Ok(())
}
