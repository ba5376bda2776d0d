//! `archive-agent backup --pg-url` without the data directory: a base backup over the replication
//! protocol (`BASE_BACKUP` on a `replication=database` walsender), by a role with only the
//! REPLICATION attribute, run as an operating-system user that cannot read the data directory,
//! into a repository on Garage (S3), with `archive_mode = off` and `archive-agent daemon
//! --stream` storing the WAL.
//!
//! - The cluster has a user tablespace (outside the data directory, mode 0700, the server's),
//!   pgbench's tables, a table whose contents have a known md5, and pgbench writing while the
//!   backup runs. The agent runs as `nobody`, which is first shown unable to read
//!   `global/pg_control` or the tablespace.
//! - The repository then lists the backup (`list`, `info --json`), `verify --deep` passes, and its
//!   manifest, read here from the documented format, is an ordinary one: the cluster's identity,
//!   the tablespace declared with its files under `pg_tblspc/<oid>/`, nothing PostgreSQL's own
//!   base backup leaves out.
//! - After more writes (in the tablespace too, and a table created there), a restore to the end
//!   of the archive into a new data directory, with the tablespace mapped to a new location,
//!   holds every table exactly as the source does (rows and md5 over ordered rows), and the
//!   known table the md5 computed from its definition.
//! - On PostgreSQL 14 the backup is refused in one error line naming PostgreSQL 15, and nothing
//!   is written.
//! - `--incremental`, on PostgreSQL 17 and 18 with `summarize_wal = on`: the first backup is a
//!   full one, with a warning that there is nothing to build on; after a few hundred rows changed
//!   across the tables (in the tablespace too; tables truncated, dropped, created, moved) the
//!   next one is an increment on it, and the one after an increment on that increment: the
//!   server sends less than half the full backup's bytes (counted by a relay in front of it),
//!   and the manifests name their base. A restore from the first increment to the end of the
//!   archive, and one of exactly the second increment, hold every table as the source did at
//!   that point; `verify --deep` passes. `reused_bytes` then counts every byte that did not
//!   cross the network (checked last).
//! - On PostgreSQL 15 `--incremental` takes full backups, each with a warning naming PostgreSQL
//!   17.
//!
//! Named `matrix_` so that they run once, in the matrix part of the suite, not again on each
//! store.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use walvault_testkit::agents::{ARCHIVE_AGENT, RESTORE_AGENT};
use walvault_testkit::backup::{self, BackupSummary, Restore};
use walvault_testkit::daemon::Daemon;
use walvault_testkit::garage::Garage;
use walvault_testkit::host::{self, Finished, Poll, ScratchDir};
use walvault_testkit::object::{KIND_MANIFEST, Sealed};
use walvault_testkit::pg::PgInstall;
use walvault_testkit::workload::{self, TableFingerprint};
use walvault_testkit::{Cluster, Repo, agents};

/// The stream daemon's role (as in `streaming.rs`).
const STREAM_ROLE: &str = "walvault";
/// The backup's role: LOGIN and REPLICATION, nothing else.
const BACKUP_ROLE: &str = "walbackup";
const PASSWORD: &str = "protocol-secret";
/// The operating-system user the backup runs as: it can read neither the data directory nor the
/// tablespace.
const OUTSIDER: &str = "nobody";
/// How long the backup may run, its WAL wait (`--wal-timeout 2m`) included.
const BACKUP_LIMIT: Duration = Duration::from_secs(300);
/// Rows of the table whose md5 is known from its definition.
const KNOWN_ROWS: u32 = 20_000;
/// The known table's rows, as a query: the table is filled from it, and its md5 computed from it
/// on the restored server without reading the table.
fn known_rows_sql() -> String {
    format!("SELECT g AS id, md5('walvault-' || g) AS body FROM generate_series(1, {KNOWN_ROWS}) g")
}

/// A started cluster that streams and does not archive, with the roles [`STREAM_ROLE`] and
/// [`BACKUP_ROLE`], each allowed in through SCRAM for replication and for a database walsender;
/// `conf` are more postgresql.conf settings.
fn streaming_cluster(pg: &'static PgInstall, name: &str, conf: &[(&str, &str)]) -> Result<Cluster> {
    walvault_testkit::cluster::streaming_cluster(pg, name, &[STREAM_ROLE, BACKUP_ROLE], PASSWORD, conf)
}

fn pg_url(cluster: &Cluster, role: &str) -> String {
    pg_url_at(cluster.port(), role)
}

fn pg_url_at(port: u16, role: &str) -> String {
    format!("host=127.0.0.1 port={port} user={role} password={PASSWORD}")
}

/// The backup role has LOGIN and REPLICATION and nothing else: no superuser, no other attribute,
/// no membership (so no `pg_read_server_files`, no `pg_read_all_data`).
fn assert_replication_only(cluster: &Cluster) -> Result<()> {
    let attrs = cluster.query_rows(&format!(
        "SELECT rolsuper::text, rolcreaterole::text, rolcreatedb::text, rolbypassrls::text,
                rolcanlogin::text, rolreplication::text,
                (SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid)::text
         FROM pg_roles r WHERE rolname = '{BACKUP_ROLE}'"
    ))?;
    let expected = ["false", "false", "false", "false", "true", "true", "0"];
    let expected: Vec<Option<String>> = expected.iter().map(|v| Some(v.to_string())).collect();
    ensure!(
        attrs == vec![expected],
        "{BACKUP_ROLE} must have only LOGIN and REPLICATION: {attrs:?}"
    );
    Ok(())
}

/// Uid and gid of an operating-system user.
fn user_ids(user: &str) -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id")
            .args([flag, user])
            .output()
            .context("running id")?;
        ensure!(out.status.success(), "no user {user:?}");
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// `runuser -u <OUTSIDER> -- <program>`, in `cwd`, with no walvault or PostgreSQL settings from
/// the test's environment (no PGDATA: the backup must not find a data directory anywhere).
fn outsider_command(program: impl AsRef<std::ffi::OsStr>, cwd: &Path) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", OUTSIDER, "--"]).arg(program).current_dir(cwd);
    for var in [
        "PGDATA",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "WALVAULT_REPO",
        "WALVAULT_CONFIG",
        "WALVAULT_PG_URL",
        "WALVAULT_COMPRESS_LEVEL",
        "WALVAULT_RETRY_TIMEOUT",
        "WALVAULT_ENCRYPTION_KEY_FILE",
        "WALVAULT_ENCRYPTION_KEY_COMMAND",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("WALVAULT_LOG", "info");
    cmd
}

/// A directory of [`OUTSIDER`]'s own holding the repository's configuration (the Garage
/// credentials), mode 0600, which only that user (and root) can read.
struct OutsiderHome {
    dir: ScratchDir,
    config: PathBuf,
}

impl OutsiderHome {
    fn new(garage: &Garage) -> Result<OutsiderHome> {
        let (uid, gid) = user_ids(OUTSIDER)?;
        let dir = ScratchDir::new("outsider")?;
        let config = dir.path().join("walvault.toml");
        fs::write(&config, garage.config_toml()).context("writing the outsider's config")?;
        host::set_mode(&config, 0o600)?;
        std::os::unix::fs::chown(&config, Some(uid), Some(gid))?;
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        host::set_mode(dir.path(), 0o700)?;
        Ok(OutsiderHome { dir, config })
    }

    /// `--repo <repo> --config <the outsider's config>`.
    fn repo_args(&self, repo: &Repo) -> Vec<String> {
        vec![
            "--repo".into(),
            repo.url(),
            "--config".into(),
            self.config.display().to_string(),
        ]
    }

    /// `archive-agent backup --pg-url <url> --json --wal-timeout 2m <extra...>`, as [`OUTSIDER`].
    fn backup(&self, repo: &Repo, url: &str, extra: &[&str]) -> Result<Finished> {
        let mut cmd = outsider_command(agents().archive_agent(), self.dir.path());
        cmd.arg("backup")
            .args(self.repo_args(repo))
            .args(["--pg-url", url, "--json", "--wal-timeout", "2m"])
            .args(extra);
        host::run(&mut cmd, BACKUP_LIMIT)
    }
}

/// The data directory is as initdb leaves it (mode 0700, the server's), and [`OUTSIDER`] can read
/// neither `global/pg_control` nor the tablespace: a backup by that user cannot have come from
/// the disk.
fn assert_outsider_locked_out(cluster: &Cluster, tablespace: &Path, home: &OutsiderHome) -> Result<()> {
    let (pg_uid, _) = user_ids(host::PG_USER)?;
    for dir in [cluster.data_dir(), tablespace.to_path_buf()] {
        let meta = fs::metadata(&dir).with_context(|| format!("stat {}", dir.display()))?;
        ensure!(
            meta.mode() & 0o777 == 0o700 && meta.uid() == pg_uid,
            "{} must be mode 0700 and {}'s: mode {:o}, uid {}",
            dir.display(),
            host::PG_USER,
            meta.mode() & 0o7777,
            meta.uid()
        );
    }
    let control = cluster.data_dir().join("global").join("pg_control");
    ensure!(control.is_file(), "{} is missing", control.display());
    for (program, path) in [("cat", &control), ("ls", &tablespace.to_path_buf())] {
        let mut cmd = outsider_command(program, home.dir.path());
        cmd.arg(path);
        let run = host::run(&mut cmd, Duration::from_secs(30))?;
        ensure!(
            !run.status.success() && run.stderr.contains("Permission denied"),
            "{OUTSIDER} must not be able to read {}: {run}",
            path.display()
        );
    }
    Ok(())
}

/// The user tablespace `ts1` at `location`, holding `in_ts` (its primary key index there too);
/// pgbench's tables and `known` in the default one. Returns the tablespace's oid.
fn fill(cluster: &Cluster, location: &Path) -> Result<String> {
    cluster.execute(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        location.display()
    ))?;
    cluster.execute(&format!(
        "CREATE TABLE in_ts (id integer PRIMARY KEY USING INDEX TABLESPACE ts1, body text NOT NULL)
             TABLESPACE ts1;
         INSERT INTO in_ts SELECT g, md5(g::text) FROM generate_series(1, 10000) g;
         CREATE TABLE known (id integer PRIMARY KEY, body text NOT NULL);
         INSERT INTO known {}",
        known_rows_sql()
    ))?;
    cluster.pgbench(&["-i", "-q", "-s", "2"])?;
    cluster.query_one_string("SELECT oid::text FROM pg_tablespace WHERE spcname = 'ts1'")
}

/// Changes after the backup, which only the streamed WAL holds: in the tablespace (rows, updates,
/// deletes, a new table there), and pgbench transactions.
fn write_after_backup(cluster: &Cluster) -> Result<()> {
    cluster.execute(
        "INSERT INTO in_ts SELECT g, md5(g::text) FROM generate_series(10001, 14000) g;
         UPDATE in_ts SET body = md5(body) WHERE id % 10 = 0;
         DELETE FROM in_ts WHERE id % 13 = 0;
         CREATE TABLE late_ts TABLESPACE ts1 AS
             SELECT g AS id, repeat(md5(g::text), 4) AS body FROM generate_series(1, 3000) g",
    )?;
    cluster.pgbench(&["-n", "-c", "2", "-t", "300"])?;
    Ok(())
}

/// pgbench for `secs` seconds in the background (writing while the backup runs), with `extra`
/// options (a rate: `-R 100`).
fn pgbench_during(cluster: &Cluster, secs: u32, extra: &[&str]) -> thread::JoinHandle<Result<Finished>> {
    let port = cluster.port().to_string();
    let secs = secs.to_string();
    let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
    thread::spawn(move || {
        let mut cmd = host::pg_user_command(host::pg_bin("pgbench"));
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(["-n", "-c", "2", "-T", &secs])
            .args(&extra)
            .arg("postgres");
        host::run(&mut cmd, Duration::from_secs(600))?.check()
    })
}

/// The tables of schema `public`, sorted.
fn public_tables(cluster: &Cluster) -> Result<Vec<String>> {
    Ok(cluster
        .query_rows("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")?
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect())
}

/// Rows and md5 over the rows (ordered by their text) of every table of schema `public`.
fn every_table(cluster: &Cluster) -> Result<Vec<TableFingerprint>> {
    public_tables(cluster)?
        .iter()
        .map(|t| workload::table_fingerprint(cluster, t, "t::text"))
        .collect()
}

/// Wait until the daemon reports everything the server wrote so far stored.
fn wait_flushed(daemon: &Daemon, cluster: &Cluster) -> Result<()> {
    let lsn: f64 = cluster
        .query_one_string("SELECT (pg_current_wal_lsn() - '0/0')::text")?
        .parse()?;
    host::wait_for(
        "the daemon to store the WAL",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || {
            let flushed = daemon.metric("walvault_stream_flushed_lsn")?.unwrap_or(0.0);
            Ok(match flushed >= lsn {
                true => Poll::Done(()),
                false => Poll::Waiting(format!("flushed {flushed} < {lsn}")),
            })
        },
    )
    .with_context(|| daemon.log())
}

/// What the source said of itself when the backup was taken, to hold the manifest against.
struct Source<'a> {
    major: u32,
    system_identifier: String,
    oid: &'a str,
    location: &'a Path,
    /// `pg_relation_filepath` and size of `in_ts` (in the tablespace) and `known`.
    relations: Vec<(String, u64)>,
}

fn relation_files(cluster: &Cluster) -> Result<Vec<(String, u64)>> {
    ["in_ts", "known"]
        .iter()
        .map(|rel| {
            let row = cluster.query_rows(&format!(
                "SELECT pg_relation_filepath('{rel}'), pg_relation_size('{rel}')::text"
            ))?;
            match row.as_slice() {
                [r] if r.len() == 2 => Ok((
                    r[0].clone().context("relation path")?,
                    r[1].clone().context("relation size")?.parse()?,
                )),
                _ => bail!("relation file of {rel}: {row:?}"),
            }
        })
        .collect()
}

/// Backup `id`'s manifest, read from the repository through the documented format.
fn stored_manifest(repo: &Repo, id: &str) -> Result<Value> {
    let sealed = Sealed::open(&repo.read(&repo.manifest_key(id))?).context("the manifest object")?;
    ensure!(
        sealed.kind == KIND_MANIFEST && sealed.name == id,
        "manifest object kind {} name {:?}",
        sealed.kind,
        sealed.name
    );
    let m: Value = serde_json::from_slice(&sealed.content).context("manifest JSON")?;
    ensure!(
        m["format"] == "walvault-backup-manifest" && m["id"] == id,
        "not a walvault manifest of {id}: {}",
        m["format"]
    );
    Ok(m)
}

/// The backup's manifest, read from the repository through the documented format: an ordinary
/// manifest of this cluster, declaring the tablespace, with its files and the relations' files,
/// and none of what a base backup leaves out.
fn assert_manifest(repo: &Repo, taken: &BackupSummary, source: &Source) -> Result<()> {
    let m = stored_manifest(repo, &taken.id)?;
    ensure!(
        m["system_identifier"] == source.system_identifier.as_str() && m["pg_version"] == source.major,
        "manifest of another cluster: system_identifier {}, pg_version {}",
        m["system_identifier"],
        m["pg_version"]
    );
    ensure!(
        m["start_wal"] == taken.start_wal.as_str() && m["stop_wal"] == taken.stop_wal.as_str(),
        "the manifest's WAL range differs from what backup printed"
    );
    let label = m["backup_label"].as_str().unwrap_or_default();
    ensure!(
        label.contains("START WAL LOCATION") && label.contains(&taken.start_wal),
        "backup_label: {label:?}"
    );
    let declared = m["tablespaces"].as_array().context("tablespaces")?;
    ensure!(
        declared.len() == 1
            && declared[0]["oid"].as_u64().map(|o| o.to_string()).as_deref() == Some(source.oid)
            && declared[0]["location"] == source.location.display().to_string().as_str(),
        "the manifest must declare tablespace {} at {}: {declared:?}",
        source.oid,
        source.location.display()
    );
    let entries = m["entries"].as_array().context("entries")?;
    let entry = |path: &str| entries.iter().find(|e| e["path"] == path);
    let is_file = |path: &str| entry(path).is_some_and(|e| e["kind"] == "file");
    for path in [
        "global/pg_control",
        "PG_VERSION",
        "postgresql.conf",
        "pg_hba.conf",
    ] {
        ensure!(is_file(path), "the manifest has no file {path}");
    }
    let version_dir = format!("pg_tblspc/{}/PG_{}_", source.oid, source.major);
    let in_tablespace = entries
        .iter()
        .filter(|e| e["kind"] == "file")
        .filter(|e| e["path"].as_str().is_some_and(|p| p.starts_with(&version_dir)))
        .count();
    ensure!(
        in_tablespace >= 2,
        "the manifest has {in_tablespace} files under {version_dir}*"
    );
    for (path, size) in &source.relations {
        let e = entry(path).with_context(|| format!("the manifest has no {path}"))?;
        ensure!(
            e["kind"] == "file" && e["size"] == *size,
            "{path} should be a file of {size} bytes: {e}"
        );
    }
    for e in entries {
        let path = e["path"].as_str().unwrap_or_default();
        let left_out = [
            "postmaster.pid",
            "postmaster.opts",
            "backup_label",
            "tablespace_map",
        ];
        ensure!(
            !left_out.contains(&path) && (!path.starts_with("pg_wal/") || e["kind"] != "file"),
            "the manifest holds {path}, which a base backup leaves out"
        );
    }
    Ok(())
}

/// `archive-agent backup <repo args> --pg-url <url> <extra...>`, as the PostgreSQL user and
/// without PGDATA (a backup over the protocol).
fn server_user_backup(repo: &Repo, url: &str, extra: &[&str]) -> Result<Finished> {
    let mut cmd = agents().command(ARCHIVE_AGENT);
    cmd.env_remove("PGDATA")
        .env_remove("WALVAULT_PG_URL")
        .arg("backup")
        .args(repo.args())
        .args(["--pg-url", url])
        .args(extra);
    host::run(&mut cmd, BACKUP_LIMIT)
}

/// `restore-agent <args...> <repo args>`, checked.
fn restore_agent(repo: &Repo, args: &[&str]) -> Result<Finished> {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(repo.args());
    agents().run(RESTORE_AGENT, all).check()
}

/// `list` and `info --json` show these backups and no other, and `verify --deep` finds nothing
/// wrong.
fn assert_listed_and_verified(repo: &Repo, taken: &[&BackupSummary]) -> Result<()> {
    let list = restore_agent(repo, &["list"])?;
    let info = backup::info(repo)?;
    let shown = info["backups"].as_array().context("info --json: backups")?;
    ensure!(
        shown.len() == taken.len(),
        "info --json shows {} backups, not {}: {info:#}",
        shown.len(),
        taken.len()
    );
    for b in taken {
        ensure!(
            list.stdout.contains(&b.id),
            "list does not show backup {}:\n{list}",
            b.id
        );
        let one = shown
            .iter()
            .find(|s| s["id"] == b.id.as_str())
            .with_context(|| format!("info --json does not show backup {}: {info:#}", b.id))?;
        ensure!(
            one["timeline"] == b.timeline,
            "info shows backup {} on another timeline: {one}",
            b.id
        );
    }
    // Exit 0: every backup restorable, its chunks read and their hashes checked.
    let verify = restore_agent(repo, &["verify", "--deep"])?;
    ensure!(
        verify
            .stdout
            .contains(&format!("verified {} backups", taken.len())),
        "verify did not check the {} backups:\n{verify}",
        taken.len()
    );
    Ok(())
}

/// The restored cluster holds exactly what the source holds, table by table; the known table
/// the md5 its definition gives; and the tablespace lives where the restore put it.
fn assert_restored(
    restored: &Cluster,
    expected: &[TableFingerprint],
    oid: &str,
    location: &Path,
) -> Result<()> {
    let found = every_table(restored)?;
    ensure!(
        found == expected,
        "the restored tables differ from the source's:\nsource:\n{}\nrestored:\n{}\n{}",
        expected.iter().map(|f| format!("  {f}\n")).collect::<String>(),
        found.iter().map(|f| format!("  {f}\n")).collect::<String>(),
        restored.log_tail()
    );
    let known = workload::table_fingerprint(restored, "known", "id")?;
    let md5 = restored.query_one_string(&format!(
        "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM ({}) t",
        known_rows_sql()
    ))?;
    ensure!(
        known.rows == u64::from(KNOWN_ROWS) && known.md5 == md5,
        "known: {known}, expected {KNOWN_ROWS} rows with md5 {md5}"
    );
    // The primary key index in the tablespace answers as the table does.
    let by_index = restored.query_rows(
        "SET enable_seqscan = off; SET enable_bitmapscan = off;
         SELECT count(*)::text, sum(id)::text FROM in_ts WHERE id BETWEEN 5000 AND 12000",
    )?;
    let by_scan = restored
        .query_rows("SELECT count(*)::text, sum(id)::text FROM in_ts WHERE id + 0 BETWEEN 5000 AND 12000")?;
    ensure!(
        by_index == by_scan,
        "in_ts by its index {by_index:?}, by a scan {by_scan:?}"
    );
    ensure!(
        restored.query_one_string(&format!("SELECT pg_tablespace_location({oid})"))?
            == location.display().to_string(),
        "the restored server must see tablespace {oid} at {}",
        location.display()
    );
    let version_dir = fs::read_dir(location)
        .with_context(|| format!("listing {}", location.display()))?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("PG_"));
    ensure!(
        version_dir,
        "the tablespace's files must be in {}",
        location.display()
    );
    Ok(())
}

/// The tests that run the backup as [`OUTSIDER`] need root.
fn ensure_root() -> Result<()> {
    ensure!(
        host::is_root(),
        "this test runs the backup as another operating-system user ({OUTSIDER}) than the one \
         owning the data directory, which needs root: run it as root (CI does), it cannot pass \
         otherwise"
    );
    Ok(())
}

/// Restore with `args` (a backup, a target) into a new data directory, the tablespace `oid`
/// mapped to a new location, and start it: the restore used backup `id`, and the server holds
/// `expected` (see [`assert_restored`]).
fn assert_restores_with_tablespace(
    pg: &'static PgInstall,
    repo: &Repo,
    name: &str,
    args: &[&str],
    id: &str,
    expected: &[TableFingerprint],
    oid: &str,
) -> Result<()> {
    let restored_ts = ScratchDir::new(&format!("{name}-ts"))?;
    let location = restored_ts.path().join("ts1");
    let map = format!("{oid}={}", location.display());
    let mut all = args.to_vec();
    all.extend(["--tablespace-map", &map]);
    let started = std::time::Instant::now();
    let (restored, report) = backup::restore_and_recover(repo, name, Restore::with(&all).on(pg))?;
    ensure!(
        report.contains(id),
        "{name}: backup {id} must be the one restored:\n{report}"
    );
    assert_restored(&restored, expected, oid, &location)
        .with_context(|| format!("{name}, restored with {all:?}"))?;
    eprintln!(
        "{name}: backup {id} restored ({args:?}) and recovered in {:.1?}: {} tables as expected",
        started.elapsed(),
        expected.len()
    );
    Ok(())
}

/// Stream, back up over the protocol as `nobody` with a replication-only role, write more,
/// restore to the end into a new data directory and tablespace location, compare every table.
fn protocol_backup_restores_exactly(major: u32) -> Result<()> {
    ensure_root()?;
    let pg = PgInstall::of_major(major)?;
    let garage = Garage::shared();
    let repo = Repo::new_s3(garage)?;
    let source = streaming_cluster(pg, &format!("protocol{major}"), &[])?;
    assert_replication_only(&source)?;
    let ts_parent = ScratchDir::new("protocol-ts")?;
    let ts_location = ts_parent.subdir("ts1")?;
    host::set_mode(&ts_location, 0o700)?;
    let oid = fill(&source, &ts_location)?;
    let home = OutsiderHome::new(garage)?;
    assert_outsider_locked_out(&source, &ts_location, &home)?;

    let daemon = Daemon::start_streaming(&repo, &pg_url(&source, STREAM_ROLE), &["--stream-flush", "500ms"])?;
    let facts = Source {
        major,
        system_identifier: source.system_identifier()?,
        oid: &oid,
        location: &ts_location,
        relations: relation_files(&source)?,
    };
    let bench = pgbench_during(&source, 10, &[]);
    let run = home.backup(&repo, &pg_url(&source, BACKUP_ROLE), &[])?;
    let bench = bench.join().expect("pgbench's thread does not panic");
    ensure!(
        run.status.success(),
        "the backup over the protocol failed: {run}\n--- daemon ---\n{}\n{}",
        host::tail(&daemon.log(), 30),
        source.log_tail()
    );
    bench.context("pgbench while the backup ran")?;
    let taken = BackupSummary::parse(&run.stdout)?;
    ensure!(
        taken.timeline == 1 && taken.files > 0 && taken.start_wal <= taken.stop_wal,
        "backup summary: {taken:?}"
    );
    eprintln!(
        "PostgreSQL {major}: backup {} over the protocol as {OUTSIDER}: {} files, {} bytes, WAL {}..{}, {:.1?}",
        taken.id, taken.files, taken.logical_bytes, taken.start_wal, taken.stop_wal, run.elapsed
    );
    assert_manifest(&repo, &taken, &facts)?;
    assert_listed_and_verified(&repo, &[&taken])?;

    write_after_backup(&source)?;
    let expected = every_table(&source)?;
    ensure!(
        expected.len() == 7 && expected.iter().all(|f| f.rows > 0),
        "the source's tables: {expected:?}"
    );
    wait_flushed(&daemon, &source)?;
    let log = daemon.log();
    let ended = daemon.stop()?;
    ensure!(ended.code() == Some(0), "daemon: {ended:?}\n{log}");

    assert_restores_with_tablespace(
        pg,
        &repo,
        &format!("protocol{major}-restored"),
        &[],
        &taken.id,
        &expected,
        &oid,
    )
}

#[test]
fn matrix_protocol_backup_pg15_replication_only_role_restores_every_table() -> Result<()> {
    protocol_backup_restores_exactly(15)
}

#[test]
fn matrix_protocol_backup_pg18_replication_only_role_restores_every_table() -> Result<()> {
    protocol_backup_restores_exactly(18)
}

#[test]
fn matrix_protocol_backup_pg14_is_refused_in_one_line_naming_postgresql_15() -> Result<()> {
    let pg = PgInstall::of_major(14)?;
    let repo = Repo::new_s3(Garage::shared())?;
    let cluster = streaming_cluster(pg, "protocol14", &[])?;
    let before = repo.files()?;
    let run = server_user_backup(&repo, &pg_url(&cluster, BACKUP_ROLE), &["--wal-timeout", "30s"])?;
    ensure!(!run.status.success(), "PostgreSQL 14 must be refused: {run}");
    let errors: Vec<&str> = run.stderr.lines().filter(|l| l.contains("ERROR")).collect();
    ensure!(
        errors.len() == 1 && errors[0].contains("PostgreSQL 15"),
        "expected one error line naming PostgreSQL 15: {run}"
    );
    eprintln!("PostgreSQL 14 refused: {}", errors[0]);
    let after = repo.files()?;
    ensure!(
        after == before,
        "a refused backup must write nothing; new objects: {:?}",
        after
            .keys()
            .filter(|k| !before.contains_key(*k))
            .collect::<Vec<_>>()
    );
    let running = cluster.query_one_string("SELECT count(*)::text FROM pg_stat_progress_basebackup")?;
    ensure!(running == "0", "a base backup still runs on the server");
    Ok(())
}

/// How `backup --incremental` starts the warning it logs when it takes a full backup instead.
const FULL_INSTEAD: &str = "--incremental: taking a full backup:";

/// Tables that the changes between incremental backups truncate, drop or move, beside
/// [`fill`]'s: two in each tablespace.
const TABLES_TO_CHANGE: &str = "
    CREATE TABLE small AS SELECT g AS id, md5(g::text) AS body FROM generate_series(1, 2000) g;
    CREATE TABLE doomed AS SELECT g AS id, md5(g::text) AS body FROM generate_series(1, 2000) g;
    CREATE TABLE small_ts TABLESPACE ts1 AS
        SELECT g AS id, md5(g::text) AS body FROM generate_series(1, 2000) g;
    CREATE TABLE doomed_ts TABLESPACE ts1 AS
        SELECT g AS id, md5(g::text) AS body FROM generate_series(1, 2000) g";

/// A TCP relay in front of the server counting the bytes the server sends through it: what a
/// backup taken through it received over the network, measured outside walvault.
struct CountingRelay {
    port: u16,
    from_server: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl CountingRelay {
    fn start(server_port: u16) -> Result<CountingRelay> {
        let listener = TcpListener::bind("127.0.0.1:0").context("relay listen")?;
        let relay = CountingRelay {
            port: listener.local_addr()?.port(),
            from_server: Arc::default(),
            stop: Arc::default(),
        };
        let (counter, stop) = (Arc::clone(&relay.from_server), Arc::clone(&relay.stop));
        thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)) else {
                    continue;
                };
                let counter = Arc::clone(&counter);
                thread::spawn(move || pass_through(client, server, &counter));
            }
        });
        Ok(relay)
    }

    /// Bytes the server sent so far.
    fn received(&self) -> u64 {
        self.from_server.load(Ordering::Relaxed)
    }
}

impl Drop for CountingRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accepting thread so that it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copy both ways until either side closes, counting what the server sends.
fn pass_through(client: TcpStream, server: TcpStream, from_server: &AtomicU64) {
    let (Ok(mut client_in), Ok(mut server_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = thread::spawn(move || {
        let _ = io::copy(&mut client_in, &mut server_out);
        let _ = server_out.shutdown(Shutdown::Write);
    });
    let (mut server_in, mut client_out) = (server, client);
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n @ 1..) = server_in.read(&mut buf) {
        from_server.fetch_add(n as u64, Ordering::Relaxed);
        if client_out.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = client_out.shutdown(Shutdown::Write);
    let _ = up.join();
}

/// One backup of an incremental chain: what it printed, its run, and the bytes the server sent
/// for it.
struct Link {
    taken: BackupSummary,
    run: Finished,
    received: u64,
}

/// The lines of a backup's log saying that `--incremental` took a full backup, and why.
fn full_backup_warnings(run: &Finished) -> Vec<&str> {
    run.stderr.lines().filter(|l| l.contains(FULL_INSTEAD)).collect()
}

/// `archive-agent backup --incremental` as [`OUTSIDER`] with the replication-only role, through
/// `relay`, which must succeed.
fn incremental_backup(
    home: &OutsiderHome,
    repo: &Repo,
    relay: &CountingRelay,
    cluster: &Cluster,
) -> Result<Link> {
    let before = relay.received();
    let run = home.backup(repo, &pg_url_at(relay.port, BACKUP_ROLE), &["--incremental"])?;
    ensure!(
        run.status.success(),
        "backup --incremental failed: {run}\n{}",
        cluster.log_tail()
    );
    let received = relay.received() - before;
    let taken = BackupSummary::parse(&run.stdout)?;
    eprintln!(
        "PostgreSQL {}: backup {}: {} files, logical_bytes {}, reused_bytes {}, new_bytes {} \
         ({} chunks), {received} bytes received from the server, {:.1?}",
        cluster.pg().major(),
        taken.id,
        taken.files,
        taken.logical_bytes,
        taken.reused_bytes,
        taken.new_bytes,
        taken.new_chunks,
        run.elapsed
    );
    Ok(Link { taken, run, received })
}

/// `--incremental` took a full backup and said why in one warning naming `why`: nothing came
/// from a previous backup, the stored manifest names no base, and it keeps the server's
/// `backup_manifest` for the next increment.
fn assert_full_instead(repo: &Repo, taken: &BackupSummary, run: &Finished, why: &str) -> Result<()> {
    let warned = full_backup_warnings(run);
    ensure!(
        warned.len() == 1 && warned[0].contains("WARN") && warned[0].contains(why),
        "expected one WARN line `{FULL_INSTEAD} ...` naming {why:?}: {run}"
    );
    ensure!(
        taken.reused_files == 0 && taken.reused_bytes == 0,
        "a full backup takes nothing from a previous one: {taken:?}"
    );
    let m = stored_manifest(repo, &taken.id)?;
    ensure!(
        m["incremental_from"].is_null(),
        "the manifest of full backup {} names a base: {}",
        taken.id,
        m["incremental_from"]
    );
    ensure!(
        m["server_manifest"]["size"].as_u64().unwrap_or(0) > 0,
        "backup {} keeps no server backup_manifest: {}",
        taken.id,
        m["server_manifest"]
    );
    eprintln!("backup {}: {}", taken.id, warned[0]);
    Ok(())
}

/// An increment on top of `base`: no warning, less than half the bytes of the `full` backup
/// received from the server, the stored manifest naming `base`, and its `backup_label` without
/// the `INCREMENTAL FROM` lines PostgreSQL would refuse to start with.
fn assert_increment(repo: &Repo, link: &Link, base: &BackupSummary, full: &Link) -> Result<()> {
    let taken = &link.taken;
    ensure!(
        full_backup_warnings(&link.run).is_empty(),
        "backup {} should be an increment on {}: {}",
        taken.id,
        base.id,
        link.run
    );
    ensure!(
        link.received * 2 < full.received,
        "only the changed blocks cross the network: the increment {} received {} bytes, the full \
         backup {} received {}",
        taken.id,
        link.received,
        full.taken.id,
        full.received
    );
    let m = stored_manifest(repo, &taken.id)?;
    ensure!(
        m["incremental_from"] == base.id.as_str(),
        "the manifest of {} must name its base {}: {}",
        taken.id,
        base.id,
        m["incremental_from"]
    );
    let label = m["backup_label"].as_str().unwrap_or_default();
    ensure!(
        label.contains(&taken.start_wal) && !label.contains("INCREMENTAL"),
        "backup {}'s stored backup_label: {label:?}",
        taken.id
    );
    Ok(())
}

/// `reused_bytes` of an increment counts the bytes that did not cross the network (docs/
/// FORMAT.md): every byte it does not count was received from the server, so together they
/// cover `logical_bytes`; after a few changes, that is most of them.
fn assert_reuse_counted(link: &Link) -> Result<()> {
    let t = &link.taken;
    ensure!(
        t.reused_bytes + link.received >= t.logical_bytes && t.reused_bytes * 2 > t.logical_bytes,
        "backup {}: reused_bytes {} must count every byte of its logical_bytes {} that did not \
         cross the network, yet only {} bytes came from the server: at least {} bytes were taken \
         from the previous backup",
        t.id,
        t.reused_bytes,
        t.logical_bytes,
        link.received,
        t.logical_bytes.saturating_sub(link.received)
    );
    Ok(())
}

/// A small fraction of the rows changed, in both tablespaces, between increments (`round` 1 or
/// 2): a few hundred rows updated across the whole of `pgbench_accounts` and `in_ts`, rows
/// inserted and deleted; a table truncated, one dropped, one created, one moved; then a
/// checkpoint.
fn change_a_little(cluster: &Cluster, round: u32) -> Result<()> {
    // Row ids new to each round, away from fill's and write_after_backup's.
    let (aid, id) = (200_000 + 1000 * round, 10_000 * (round + 1));
    cluster.execute(&format!(
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 500 = {round};
         INSERT INTO pgbench_accounts SELECT g, 1, 0, 'round {round}'
             FROM generate_series({aid} + 1, {aid} + 300) g;
         DELETE FROM pgbench_accounts WHERE aid % 997 = {round};
         UPDATE in_ts SET body = md5(body) WHERE id % 97 = {round};
         INSERT INTO in_ts SELECT g, md5(g::text) FROM generate_series({id} + 1, {id} + 300) g;
         DELETE FROM in_ts WHERE id % 101 = {round}"
    ))?;
    cluster.execute(match round {
        1 => {
            "TRUNCATE small;
             INSERT INTO small VALUES (1, 'after the truncate');
             DROP TABLE doomed;
             CREATE TABLE fresh_ts TABLESPACE ts1 AS
                 SELECT g AS id, md5(g::text) AS body FROM generate_series(1, 1000) g"
        }
        _ => {
            "TRUNCATE small_ts;
             DROP TABLE doomed_ts;
             CREATE TABLE fresh AS SELECT g AS id, md5(g::text) AS body FROM generate_series(1, 1000) g;
             ALTER TABLE small SET TABLESPACE ts1"
        }
    })?;
    // The visibility map and free space map change too.
    cluster.execute("VACUUM pgbench_accounts")?;
    cluster.execute("CHECKPOINT")
}

/// A full backup with `--incremental` (nothing to build on), an increment on it while pgbench
/// writes, an increment on that increment; then restores from the first increment to the end
/// of the archive and of exactly the second increment, each holding every table as the source
/// did.
fn incremental_chain_restores_exactly(major: u32) -> Result<()> {
    ensure_root()?;
    let pg = PgInstall::of_major(major)?;
    let garage = Garage::shared();
    let repo = Repo::new_s3(garage)?;
    let source = streaming_cluster(pg, &format!("incremental{major}"), &[("summarize_wal", "on")])?;
    assert_replication_only(&source)?;
    let ts_parent = ScratchDir::new("incremental-ts")?;
    let ts_location = ts_parent.subdir("ts1")?;
    host::set_mode(&ts_location, 0o700)?;
    let oid = fill(&source, &ts_location)?;
    source.execute(TABLES_TO_CHANGE)?;
    let home = OutsiderHome::new(garage)?;
    let relay = CountingRelay::start(source.port())?;
    let daemon = Daemon::start_streaming(&repo, &pg_url(&source, STREAM_ROLE), &["--stream-flush", "500ms"])?;

    let first = incremental_backup(&home, &repo, &relay, &source)?;
    assert_full_instead(
        &repo,
        &first.taken,
        &first.run,
        "no backup of this cluster to build on",
    )?;
    backup::next_backup_second();
    change_a_little(&source, 1)?;
    // Writes while the increment streams: replay puts them over the rebuilt files.
    let bench = pgbench_during(&source, 3, &["-R", "100"]);
    let second = incremental_backup(&home, &repo, &relay, &source)?;
    let bench = bench.join().expect("pgbench's thread does not panic");
    bench.context("pgbench while the backup ran")?;
    assert_increment(&repo, &second, &first.taken, &first)?;
    backup::next_backup_second();
    change_a_little(&source, 2)?;
    let third = incremental_backup(&home, &repo, &relay, &source)?;
    assert_increment(&repo, &third, &second.taken, &first)?;
    // Nothing wrote during the third backup: what a restore of exactly that backup holds.
    let at_third = every_table(&source)?;

    write_after_backup(&source)?;
    let at_end = every_table(&source)?;
    wait_flushed(&daemon, &source)?;
    let log = daemon.log();
    let ended = daemon.stop()?;
    ensure!(ended.code() == Some(0), "daemon: {ended:?}\n{log}");
    assert_listed_and_verified(&repo, &[&first.taken, &second.taken, &third.taken])?;

    // From the first increment to the end of the archive; then exactly the second increment.
    let (b2, b3) = (second.taken.id.as_str(), third.taken.id.as_str());
    let name = format!("incremental{major}-end");
    assert_restores_with_tablespace(pg, &repo, &name, &["--backup", b2], b2, &at_end, &oid)?;
    let name = format!("incremental{major}-third");
    let args = ["--backup", b3, "--target", "immediate"];
    assert_restores_with_tablespace(pg, &repo, &name, &args, b3, &at_third, &oid)?;
    // Last, as it is about the figure and not the data.
    assert_reuse_counted(&second)?;
    assert_reuse_counted(&third)
}

#[test]
fn matrix_protocol_backup_pg17_incremental_chain_restores_every_table() -> Result<()> {
    incremental_chain_restores_exactly(17)
}

#[test]
fn matrix_protocol_backup_pg18_incremental_chain_restores_every_table() -> Result<()> {
    incremental_chain_restores_exactly(18)
}

#[test]
fn matrix_protocol_backup_pg15_incremental_falls_back_to_a_full_backup_with_a_warning() -> Result<()> {
    let pg = PgInstall::of_major(15)?;
    let repo = Repo::new_s3(Garage::shared())?;
    let cluster = streaming_cluster(pg, "incremental15", &[])?;
    cluster.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g")?;
    let _daemon = Daemon::start_streaming(
        &repo,
        &pg_url(&cluster, STREAM_ROLE),
        &["--stream-flush", "500ms"],
    )?;
    let url = pg_url(&cluster, BACKUP_ROLE);
    let mut taken = Vec::new();
    for _ in 0..2 {
        if !taken.is_empty() {
            backup::next_backup_second();
        }
        let args = ["--incremental", "--json", "--wal-timeout", "2m"];
        let run = server_user_backup(&repo, &url, &args)?.check()?;
        let b = BackupSummary::parse(&run.stdout)?;
        // The second time too, with a protocol backup to build on: the server is the reason.
        assert_full_instead(&repo, &b, &run, "PostgreSQL 17")?;
        taken.push(b);
    }
    assert_listed_and_verified(&repo, &taken.iter().collect::<Vec<_>>())
}

/// One daemon, off the database host: `daemon --stream --backup-every` stores the WAL and takes
/// backups over the protocol on schedule, each followed by an expire (`--keep-last 1`); the
/// backup it keeps restores exactly.
#[test]
fn matrix_protocol_backup_pg15_stream_daemon_backs_up_on_schedule_and_expires() -> Result<()> {
    let pg = PgInstall::of_major(15)?;
    let repo = Repo::new_s3(Garage::shared())?;
    let source = streaming_cluster(pg, "scheduled15", &[])?;
    let ts_parent = ScratchDir::new("scheduled-ts")?;
    let ts_location = ts_parent.subdir("ts1")?;
    host::set_mode(&ts_location, 0o700)?;
    let oid = fill(&source, &ts_location)?;
    let daemon = Daemon::start_streaming(
        &repo,
        &pg_url(&source, STREAM_ROLE),
        &[
            "--stream-flush",
            "500ms",
            "--backup-every",
            "4s",
            "--keep-last",
            "1",
        ],
    )?;
    // Two scheduled backups, then the expire after the second leaves the newest alone.
    let newest = host::wait_for(
        "two scheduled backups, the first expired",
        Duration::from_secs(150),
        Duration::from_millis(500),
        || {
            let log = daemon.log();
            let done: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("scheduled backup ") && l.contains(" done:"))
                .collect();
            if done.len() < 2 {
                return Ok(Poll::Waiting(format!("{} scheduled backups done", done.len())));
            }
            let info = backup::info(&repo)?;
            let shown = info["backups"]
                .as_array()
                .context("info --json: backups")?
                .clone();
            Ok(match shown.as_slice() {
                [one] => Poll::Done(one["id"].as_str().context("a backup id")?.to_string()),
                _ => Poll::Waiting(format!("{} backups listed", shown.len())),
            })
        },
    )
    .with_context(|| host::tail(&daemon.log(), 40))?;
    ensure!(
        !daemon.log().contains("scheduled backup failed"),
        "a scheduled backup failed:\n{}",
        daemon.log()
    );
    let stored = stored_manifest(&repo, &newest)?;
    ensure!(
        stored["server_manifest"].is_object(),
        "a scheduled backup beside the stream is taken over the protocol: {}",
        stored["server_manifest"]
    );
    write_after_backup(&source)?;
    let expected = every_table(&source)?;
    wait_flushed(&daemon, &source)?;
    let log = daemon.log();
    let ended = daemon.stop()?;
    ensure!(ended.code() == Some(0), "daemon: {ended:?}\n{log}");
    let verify = restore_agent(&repo, &["verify", "--deep"])?;
    ensure!(verify.stdout.contains("verified 1 backups"), "verify:\n{verify}");
    assert_restores_with_tablespace(pg, &repo, "scheduled15-restored", &[], &newest, &expected, &oid)
}
