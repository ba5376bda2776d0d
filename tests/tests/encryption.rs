//! Client-side encryption as a DBA relies on it, in the store the suite runs against: a table
//! holding a known marker is archived and backed up into an encrypted repository; no object holds
//! the marker, raw or decompressed; a second backup still deduplicates; a restore with the key is exact; a missing or wrong key is
//! one clear error line (push exits 1, fetch above 125 and 1 in standby, restore writes nothing);
//! after `rekey` the old key is refused and a backup taken before the rotation restores with the
//! new key (given by a key command); a tampered object stops recovery with FATAL, and a swapped
//! or truncated one makes fetch fail above 125: never an early promote.

use std::path::Path;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use walvault::exit;
use walvault_testkit::agents::{ARCHIVE_AGENT, RESTORE_AGENT, agents};
use walvault_testkit::backup::{self, Restore, next_backup_second, take_backup};
use walvault_testkit::fixtures::{RECOVERY_TIMEOUT, archive_everything, archiving_cluster, assert_fatal_at};
use walvault_testkit::host::{Finished, write_for_pg};
use walvault_testkit::workload::{self, Ledger, LedgerState};
use walvault_testkit::{Cluster, Repo};

const KEY: &str = "4f8a1c2e9b7d3a5f6e0c8b1d2a4f6e8c0b2d4f6a8c0e2b4d6f8a0c2e4b6d8f0a\n";
const WRONG_KEY: &str = "0000000000000000000000000000000000000000000000000000000000000001\n";
const NEW_PASSPHRASE: &str = "rotated after the audit, November 2026\n";
/// In every row of a table, short enough that PostgreSQL stores it uncompressed in the heap and
/// in the WAL.
const MARKER: &str = "walvault-secret-marker-5e7c1a";

fn agent(agent_name: &str, repo: &Repo, args: &[&str]) -> Finished {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(repo.args());
    agents().run(agent_name, all)
}

fn steps(cluster: &Cluster, n: usize) -> Result<Vec<LedgerState>> {
    let mut ledger = Ledger::connect(cluster)?;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(ledger.step()?);
        thread::sleep(Duration::from_millis(20));
    }
    Ok(out)
}

/// Whether `bytes` hold the marker: as they are, or inside any zstd frame that starts in them.
fn holds_marker(bytes: &[u8]) -> bool {
    let found = |b: &[u8]| b.windows(MARKER.len()).any(|w| w == MARKER.as_bytes());
    if found(bytes) {
        return true;
    }
    const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
    (0..bytes.len().saturating_sub(4))
        .filter(|&at| bytes[at..at + 4] == ZSTD_MAGIC)
        .any(|at| zstd::bulk::decompress(&bytes[at..], 64 << 20).is_ok_and(|out| found(&out)))
}

/// The restore of `name` into a new directory must fail with one line saying `words`, and write
/// nothing.
fn assert_restore_refused(repo: &Repo, name: &str, words: &str) -> Result<()> {
    let target = Cluster::uninitialized(name)?;
    let run = backup::restore(repo, &target.data_dir(), &[])?;
    ensure!(run.code() == Some(1), "{name}: restore must fail\n{run}");
    ensure!(
        run.stderr.contains(words),
        "{name}: the error says {words:?}\n{run}"
    );
    ensure!(
        run.stderr.lines().filter(|l| !l.trim().is_empty()).count() == 1,
        "{name}: one error line\n{run}"
    );
    let left = std::fs::read_dir(target.data_dir())
        .map(|d| d.count())
        .unwrap_or(0);
    ensure!(left == 0, "{name}: the refused restore wrote {left} files");
    Ok(())
}

/// Every command is refused, the way PostgreSQL needs: push 1, fetch above 125 (1 in standby),
/// restore writing nothing; each with one line saying `words`.
fn assert_key_refused(repo: &Repo, segment: &Path, archived: &str, words: &str, what: &str) -> Result<()> {
    let push = agents().push(repo, segment, &[]);
    ensure!(
        push.code() == Some(i32::from(exit::NOT_FOUND_OR_RETRY)),
        "{what}: push exits 1\n{push}"
    );
    ensure!(push.stderr.contains(words), "{what}: push says {words:?}\n{push}");
    let pgdata = repo.scratch().subdir("pgdata")?;
    let standby = repo.scratch().subdir("pgdata-standby")?;
    write_for_pg(&standby.join("standby.signal"), b"")?;
    let dest = repo.scratch().subdir("pg_wal")?.join("RECOVERYXLOG");
    let fetch = agents().fetch(
        repo,
        archived,
        &dest,
        &["--pgdata", &pgdata.display().to_string()],
    );
    ensure!(
        fetch.code() == Some(i32::from(exit::FATAL)),
        "{what}: fetch must stop recovery, never report a missing file\n{fetch}"
    );
    ensure!(
        fetch.stderr.contains(words),
        "{what}: fetch says {words:?}\n{fetch}"
    );
    ensure!(!dest.exists(), "{what}: fetch wrote {}", dest.display());
    let in_standby = agents().fetch(
        repo,
        archived,
        &dest,
        &["--pgdata", &standby.display().to_string()],
    );
    ensure!(
        in_standby.code() == Some(i32::from(exit::NOT_FOUND_OR_RETRY)),
        "{what}: in standby, fetch reports not available\n{in_standby}"
    );
    let list = agent(RESTORE_AGENT, repo, &["list"]);
    ensure!(list.code() != Some(0), "{what}: list must fail\n{list}");
    ensure!(list.stderr.contains(words), "{what}: list says {words:?}\n{list}");
    assert_restore_refused(repo, &format!("enc-refused-{}", what.replace(' ', "-")), words)
}

#[test]
fn an_encrypted_repository_hides_the_data_restores_exactly_and_rotates_its_key() -> Result<()> {
    let mut repo = Repo::new_encrypted(KEY)?;
    let descriptor: serde_json::Value = serde_json::from_slice(&repo.read("walvault.json")?)?;
    assert_eq!(descriptor["version"], 3, "{descriptor:#}");
    assert_eq!(descriptor["encryption"]["key"]["kdf"], "raw", "{descriptor:#}");

    let mut source = archiving_cluster("enc-source", &repo, "")?;
    source.execute(&format!(
        "CREATE TABLE secrets (id integer PRIMARY KEY, note text NOT NULL);
         INSERT INTO secrets SELECT i, '{MARKER} ' || i FROM generate_series(1, 5000) i"
    ))?;
    // The check can see the marker: it is in the WAL PostgreSQL wrote, raw and compressed. (Read
    // now, before a checkpoint may recycle the segment.)
    archive_everything(&source)?;
    let with_marker = std::fs::read_dir(source.wal_dir())?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| std::fs::read(p).is_ok_and(|b| holds_marker(&b)))
        .context("no segment in pg_wal holds the marker: the test cannot see it")?;
    let raw = std::fs::read(&with_marker)?;
    ensure!(
        holds_marker(&zstd::bulk::compress(&raw, 3)?),
        "the check sees through zstd"
    );
    let marker_copy = repo
        .scratch()
        .path()
        .join(with_marker.file_name().context("a name")?);
    write_for_pg(&marker_copy, &raw)?;
    let with_marker = marker_copy;
    workload::create_ledger(&source)?;
    steps(&source, 5)?;
    let b1 = take_backup(&source, &repo)?;
    // Keyed chunk ids still deduplicate: a second backup of the same cluster stores few chunks.
    next_backup_second();
    let again = take_backup(&source, &repo)?;
    ensure!(
        again.new_chunks * 5 < again.chunks,
        "an encrypted repository still deduplicates: {} of {} chunks new",
        again.new_chunks,
        again.chunks
    );
    let after_backup = steps(&source, 30)?;
    archive_everything(&source)?;
    let more = steps(&source, 10)?;
    let last = archive_everything(&source)?;
    source.stop()?;

    // No object in the repository holds it, and none but the descriptor is plain JSON.
    let files = repo.files()?;
    ensure!(files.len() > 10, "the repository holds {} objects", files.len());
    for key in files.keys() {
        let bytes = repo.read(key)?;
        assert!(!holds_marker(&bytes), "{key} holds the marker");
        if key != "walvault.json" {
            assert!(
                bytes.starts_with(b"WALVAULT\x02\x00"),
                "{key} is not a sealed (version 2) object"
            );
        }
    }

    // With the key: exact point-in-time recovery, and the table whole.
    let target = &after_backup[20];
    let (restored, _) = backup::restore_and_recover(
        &repo,
        "enc-pitr",
        Restore::with(&["--target-time", target.time.as_str()]),
    )?;
    assert_eq!(workload::ledger_contents(&restored)?, target.contents);
    assert_eq!(
        restored.query_one_string(&format!(
            "SELECT count(*) FROM secrets WHERE note LIKE '{MARKER} %'"
        ))?,
        "5000"
    );
    drop(restored);

    // Missing and wrong keys: refused by every command, in the words a DBA can act on.
    let archived = repo
        .archived_names()?
        .into_iter()
        .find(|n| n.len() == 24)
        .context("a segment is archived")?;
    repo.forget_key()?;
    assert_key_refused(
        &repo,
        &with_marker,
        &archived,
        "no key is configured",
        "missing key",
    )?;
    repo.use_key("wrong", WRONG_KEY)?;
    assert_key_refused(&repo, &with_marker, &archived, "does not open", "wrong key")?;

    // Rotation: only the descriptor changes; the old key is refused afterwards, the new one opens
    // what was written before.
    let key_file = repo.use_key("key", KEY)?;
    let new_key = key_file.with_file_name("new-passphrase");
    write_for_pg(&new_key, NEW_PASSPHRASE.as_bytes())?;
    let objects_before = repo.files()?;
    let rekey = agent(
        ARCHIVE_AGENT,
        &repo,
        &["rekey", "--new-key-file", &new_key.display().to_string()],
    )
    .check()?;
    assert!(rekey.stdout.contains("rekeyed"), "{rekey}");
    let objects_after = repo.files()?;
    for (key, size) in &objects_before {
        if key != "walvault.json" {
            assert_eq!(objects_after.get(key), Some(size), "rekey rewrote {key}");
        }
    }
    let descriptor: serde_json::Value = serde_json::from_slice(&repo.read("walvault.json")?)?;
    assert_eq!(
        descriptor["encryption"]["key"]["kdf"], "argon2id",
        "{descriptor:#}"
    );
    let old = agent(RESTORE_AGENT, &repo, &["list"]);
    assert_eq!(
        old.code(),
        Some(1),
        "the old key no longer opens the repository\n{old}"
    );
    assert!(old.stderr.contains("does not open"), "{old}");
    // The new passphrase from a key command this time, as a secret manager would give it.
    repo.use_key_command(&format!("cat {}", new_key.display()))?;
    let list = agent(RESTORE_AGENT, &repo, &["list"]).check()?;
    assert!(list.stdout.contains(&b1.id), "{list}");
    let info = backup::info(&repo)?;
    assert_eq!(info["encryption"]["key"], "argon2id", "{info:#}");
    let target = &more[5];
    let (restored, _) = backup::restore_and_recover(
        &repo,
        "enc-rotated",
        Restore::with(&["--target-time", target.time.as_str()]),
    )?;
    assert_eq!(workload::ledger_contents(&restored)?, target.contents);
    drop(restored);

    // A tampered object stops a real recovery with FATAL, never an early promote.
    let victim = &last;
    repo.flip_middle_byte(&repo.object_key(victim))?;
    let (mut tampered, _) =
        backup::restore_new_cluster(&repo, "enc-tampered", Restore::with(&["--backup", &b1.id]))?;
    let log = tampered.start_expect_failure(RECOVERY_TIMEOUT)?;
    assert_fatal_at(&log, victim, "does not authenticate");
    tampered.assert_stopped_in_recovery_on_timeline_1()?;
    // A swapped object (another segment's, stored under this name) and a truncated one: fetch
    // fails above 125, saying so.
    let names: Vec<String> = repo
        .archived_names()?
        .into_iter()
        .filter(|n| n.len() == 24 && n.as_str() <= last.as_str())
        .collect();
    ensure!(names.len() >= 4, "segments archived: {names:?}");
    let pgdata = repo.scratch().subdir("pgdata")?;
    let pgdata = pgdata.display().to_string();
    let dest = repo.scratch().subdir("pg_wal")?.join("RECOVERYXLOG");
    let (a, b) = (&names[0], &names[1]);
    let swapped = repo.read(&repo.object_key(a))?;
    repo.write(&repo.object_key(b), &swapped)?;
    let run = agents().fetch(&repo, b, &dest, &["--pgdata", &pgdata]);
    assert_eq!(run.code(), Some(i32::from(exit::FATAL)), "swapped {b}\n{run}");
    assert!(run.stderr.contains("corrupt"), "{run}");
    let c = &names[2];
    let len = repo.read(&repo.object_key(c))?.len();
    repo.truncate(&repo.object_key(c), len - 1)?;
    let run = agents().fetch(&repo, c, &dest, &["--pgdata", &pgdata]);
    assert_eq!(run.code(), Some(i32::from(exit::FATAL)), "truncated {c}\n{run}");
    assert!(run.stderr.contains("corrupt"), "{run}");

    Ok(())
}
