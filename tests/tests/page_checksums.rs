//! Page checksums during a backup from disk (issue 27, deliverable 5), on clusters initdb'd with
//! `--data-checksums`: a heap page damaged on disk (server stopped, bytes overwritten, started
//! again) makes the backup complete, name the database, table, fork and block, record it in the
//! manifest and exit 3, and `restore-agent verify` lists it; `--no-page-checksums` exits 0 on
//! the same cluster; and a cluster busy under pgbench gives no false alarm, backup after backup.

use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use serde_json::Value;
use walvault_testkit::agents::{ARCHIVE_AGENT, RESTORE_AGENT, agents};
use walvault_testkit::backup::next_backup_second;
use walvault_testkit::cluster::InitOptions;
use walvault_testkit::host::Finished;
use walvault_testkit::object::Sealed;
use walvault_testkit::{Cluster, Repo};

/// The documented exit status of a backup that found damaged pages.
const DAMAGED_PAGES: i32 = 3;
/// The damaged block of the table.
const BLOCK: u64 = 3;

/// A started cluster initdb'd with `--data-checksums`, archiving into `repo`.
fn checksummed_cluster(name: &str, repo: &Repo) -> Result<Cluster> {
    let mut cluster = Cluster::init(
        name,
        &InitOptions {
            data_checksums: true,
            ..InitOptions::default()
        },
    )?;
    cluster.set_conf(&[
        ("wal_level", "replica"),
        ("archive_mode", "on"),
        ("archive_command", &agents().archive_command(repo, "")),
    ])?;
    cluster.start()?;
    ensure!(
        cluster.query_one_string("SHOW data_checksums")? == "on",
        "initdb --data-checksums"
    );
    Ok(cluster)
}

/// `archive-agent backup --pgdata --pg-url --json <extra>`, not checked.
fn backup(cluster: &Cluster, repo: &Repo, extra: &[&str]) -> Result<Finished> {
    let mut args = vec!["backup".to_string()];
    args.extend(repo.args());
    let data_dir = cluster.data_dir();
    args.extend(
        [
            "--pgdata",
            data_dir.to_str().ok_or_else(|| anyhow!("data dir path"))?,
            "--pg-url",
            &cluster.conn_string(),
            "--json",
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|a| a.to_string()));
    let run = agents().run(ARCHIVE_AGENT, args);
    next_backup_second();
    Ok(run)
}

/// The JSON summary a backup printed.
fn summary(run: &Finished) -> Result<Value> {
    serde_json::from_str(run.stdout.trim()).with_context(|| format!("backup JSON\n{run}"))
}

/// Backup `id`'s manifest, as JSON.
fn manifest(repo: &Repo, id: &str) -> Result<Value> {
    let key = format!("backups/{id}/manifest.wvo");
    let sealed = Sealed::open(&repo.read(&key)?).with_context(|| format!("manifest {key}"))?;
    Ok(serde_json::from_slice(&sealed.content)?)
}

/// Overwrite 16 bytes in the middle of block [`BLOCK`] of `file` (tuple data, far from the
/// page header and its LSN).
fn damage(file: &std::path::Path) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .with_context(|| format!("open {}", file.display()))?;
    f.seek(SeekFrom::Start(BLOCK * 8192 + 6000))?;
    f.write_all(&[0xA5; 16])?;
    f.sync_all()?;
    Ok(())
}

#[test]
fn a_damaged_page_is_named_recorded_and_exits_3() -> Result<()> {
    let repo = Repo::new()?;
    let mut cluster = checksummed_cluster("pages-damaged", &repo)?;
    // Nothing reads the table before the backup (a failing read only errors, and leaves the
    // page as it is on disk anyway).
    cluster.execute("ALTER SYSTEM SET autovacuum = off")?;
    cluster.execute("SELECT pg_reload_conf()")?;
    cluster.execute(
        "CREATE TABLE victim AS SELECT g AS id, md5(g::text) AS body FROM generate_series(1, 3000) g;
         CHECKPOINT",
    )?;
    let rel_path = cluster.query_one_string("SELECT pg_relation_filepath('victim')")?;
    let pages: u64 = cluster
        .query_one_string("SELECT pg_relation_size('victim') / 8192")?
        .parse()?;
    ensure!(pages > BLOCK, "victim has {pages} pages");
    cluster.stop()?;
    damage(&cluster.data_dir().join(&rel_path))?;
    cluster.start()?;

    let run = backup(&cluster, &repo, &[])?;
    ensure!(run.code() == Some(DAMAGED_PAGES), "expected exit 3\n{run}");
    let id = summary(&run)?["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no id\n{run}"))?
        .to_string();
    assert_eq!(summary(&run)?["bad_pages"], 1, "{run}");
    let named = format!("database postgres, relation public.victim, fork main, block {BLOCK} ({rel_path})");
    assert!(
        run.stderr.contains(&named),
        "the log names the page: {named}\n{run}"
    );

    let m = manifest(&repo, &id)?;
    let checks = &m["page_checks"];
    assert_eq!(checks["bad_total"], 1, "{checks}");
    assert!(checks["checked"].as_u64().unwrap_or(0) > 100, "{checks}");
    let bad = &checks["bad"][0];
    assert_eq!(bad["path"], rel_path.as_str());
    assert_eq!(bad["block"], BLOCK);
    assert_eq!(bad["fork"], "main");
    assert_eq!(bad["database"], "postgres");
    assert_eq!(bad["relation"], "public.victim");

    // verify lists it, and the repository is still restorable (exit 0).
    let mut args = vec!["verify".to_string()];
    args.extend(repo.args());
    let verified = agents().run(RESTORE_AGENT, args);
    ensure!(verified.code() == Some(0), "verify\n{verified}");
    assert!(
        verified.stdout.contains(&format!("damaged page: {named}")),
        "verify lists the page\n{verified}"
    );

    // Backed up again (the file read again or taken over unread): still named, still exit 3.
    let again = backup(&cluster, &repo, &[])?;
    ensure!(again.code() == Some(DAMAGED_PAGES), "second backup\n{again}");
    assert!(again.stderr.contains(&named), "{again}");

    // Over the replication protocol the server verifies pages itself: its warning reaches the
    // log. (Known gap, README "Page checksums": the exit status and the manifest do not reflect
    // it yet; the final ERROR comes after CopyDone and is never read.)
    let mut args = vec!["backup".to_string()];
    args.extend(repo.args());
    args.extend(["--pg-url".to_string(), cluster.conn_string()]);
    let over_protocol = agents().run(ARCHIVE_AGENT, args);
    assert!(
        over_protocol.stderr.contains(&format!(
            "checksum verification failed in file \"./{rel_path}\", block {BLOCK}"
        )),
        "the server's warning is in the log\n{over_protocol}"
    );
    next_backup_second();

    // Without the check: exit 0, nothing recorded.
    let off = backup(&cluster, &repo, &["--no-page-checksums", "--read-all"])?;
    ensure!(off.code() == Some(0), "--no-page-checksums\n{off}");
    let off_id = summary(&off)?["id"].as_str().unwrap_or_default().to_string();
    assert!(manifest(&repo, &off_id)?.get("page_checks").is_none());
    Ok(())
}

#[test]
fn a_busy_cluster_gives_no_false_alarm() -> Result<()> {
    let repo = Repo::new()?;
    let cluster = checksummed_cluster("pages-busy", &repo)?;
    cluster.pgbench(&["-i", "-s", "5", "-q"])?;
    let runs = std::thread::scope(|s| -> Result<Vec<Finished>> {
        let load = s.spawn(|| cluster.pgbench(&["-c", "4", "-j", "2", "-T", "25", "-n"]));
        let mut runs = Vec::new();
        std::thread::sleep(Duration::from_secs(2));
        for _ in 0..4 {
            // Every file read, none taken over: every page checked while pgbench writes.
            runs.push(backup(&cluster, &repo, &["--read-all"])?);
            std::thread::sleep(Duration::from_secs(4));
        }
        load.join().map_err(|_| anyhow!("pgbench thread panicked"))??;
        Ok(runs)
    })?;
    for run in &runs {
        ensure!(run.code() == Some(0), "backup under pgbench\n{run}");
        let id = summary(run)?["id"].as_str().unwrap_or_default().to_string();
        let m = manifest(&repo, &id)?;
        let checks = &m["page_checks"];
        assert_eq!(checks["bad_total"], 0, "{checks}\n{run}");
        assert!(checks["checked"].as_u64().unwrap_or(0) > 1000, "{checks}");
        eprintln!(
            "backup {id}: {} pages checked, {} being written",
            checks["checked"], checks["recent"]
        );
    }
    Ok(())
}
