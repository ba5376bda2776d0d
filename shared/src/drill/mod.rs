//! Restore drills: prove a repository restores, and measure how long it takes (RTO) and how much
//! history a disaster now would lose (RPO), as the evidence auditors ask for.
//!
//! A drill restores into a scratch directory (the newest state, a target, or a random instant
//! of the restorable window), starts PostgreSQL there on a private socket with archiving off,
//! waits until recovery has reached the target and the server answers, runs the checks (every
//! database accepts a connection, `--check-sql` queries return true, optionally amcheck), then
//! stops the server and removes the directory. The result is an [`Evidence`] record.
//!
//! Phases: [`plan`] (pure: which target, from the catalog and a random number), then
//! [`run`] (restore, server, checks), then the caller stores or prints the evidence.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::config::Settings;
use crate::restore::{RecoveryTarget, RestoreOptions, TargetAction, TimelineTarget};

pub const FORMAT_NAME: &str = "walvault-drill";
pub const FORMAT_VERSION: u32 = 1;

/// Which state a drill restores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrillTarget {
    /// Everything archived.
    Latest,
    /// A random instant inside the restorable window of the latest timeline.
    Random,
    /// Any target `restore` accepts.
    Target(RecoveryTarget),
}

/// How to run a drill.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub target: DrillTarget,
    pub timeline: TimelineTarget,
    pub exclusive: bool,
    /// Directory holding `postgres` and `pg_ctl` [default: found for the backup's version].
    pub pg_bin: Option<PathBuf>,
    /// Where the scratch directory is made [default: the temp dir].
    pub scratch: Option<PathBuf>,
    /// The OS user PostgreSQL runs as when the drill runs as root [default: postgres].
    pub run_as: Option<String>,
    /// The database role checks connect as [default: the OS user PostgreSQL runs as].
    pub pg_user: Option<String>,
    /// Files of SQL queries, separated by `;`, each of which must return true.
    pub check_sql: Vec<PathBuf>,
    /// The database the `check_sql` queries run in.
    pub check_db: String,
    /// Check every B-tree index (and, from PostgreSQL 14, every table) with amcheck.
    pub amcheck: bool,
    pub rto_target: Option<Duration>,
    pub rpo_target: Option<Duration>,
    /// Longest wait for recovery to finish.
    pub timeout: Duration,
    pub parallel: usize,
    /// The restore_command the drill's server runs.
    pub restore_command: String,
    /// Keep the scratch directory (for a look after a failure).
    pub keep: bool,
}

/// One check and its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// A measured objective against its target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Objective {
    /// Seconds measured (`None` when the drill did not get that far).
    pub measured_seconds: Option<f64>,
    pub target_seconds: Option<f64>,
    /// Measured and within the target (`true` without a target when measured).
    pub met: bool,
}

impl Objective {
    fn new(measured: Option<f64>, target: Option<Duration>) -> Objective {
        let target_seconds = target.map(|t| t.as_secs_f64());
        Objective {
            measured_seconds: measured,
            target_seconds,
            met: measured.is_some_and(|m| target_seconds.is_none_or(|t| m <= t)),
        }
    }
}

/// What a drill proved: stored in the repository by the daemon (`drills/<id>.json`), written by
/// `restore-agent drill --json`. Format in docs/FORMAT.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub format: String,
    pub version: u32,
    /// `YYYYMMDDTHHMMSSZ` of the start: the record's name in the repository.
    pub id: String,
    pub started_at: String,
    pub finished_at: String,
    /// `passed` or `failed`.
    pub outcome: String,
    /// The first thing that failed, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    pub repository: String,
    #[serde(default)]
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_version: Option<u32>,
    /// The recovery target as restore describes it.
    pub target: String,
    /// The random instant chosen, for `--target random`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_time: Option<String>,
    /// The last transaction the server replayed (`pg_last_xact_replay_timestamp()`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_to: Option<String>,
    pub bytes_restored: u64,
    pub files_restored: u64,
    pub segments_replayed: u64,
    pub restore_seconds: Option<f64>,
    pub recovery_seconds: Option<f64>,
    /// From the drill's start until the server answered, recovered.
    pub rto: Objective,
    /// Now minus the newest restorable commit in the repository.
    pub rpo: Objective,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_restorable_commit: Option<String>,
    pub checks: Vec<Check>,
}

impl Evidence {
    pub fn passed(&self) -> bool {
        self.outcome == "passed"
    }

    /// A few lines for a terminal or a log.
    pub fn summary(&self) -> String {
        let secs = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.1}s"));
        let mut out = format!(
            "drill {} {}: backup {}, target {}{}\n",
            self.id,
            self.outcome.to_uppercase(),
            self.backup.as_deref().unwrap_or("-"),
            self.target,
            self.target_time
                .as_ref()
                .map_or(String::new(), |t| format!(" ({t})"))
        );
        out.push_str(&format!(
            "  restored {} files, {} bytes in {}; replayed {} segments in {}; recovered to {}\n",
            self.files_restored,
            self.bytes_restored,
            secs(self.restore_seconds),
            self.segments_replayed,
            secs(self.recovery_seconds),
            self.recovered_to.as_deref().unwrap_or("-")
        ));
        let objective = |name: &str, o: &Objective| {
            format!(
                "  {name} {} (target {}): {}\n",
                secs(o.measured_seconds),
                o.target_seconds
                    .map_or("none".to_string(), |t| format!("{t:.0}s")),
                if o.met { "met" } else { "NOT MET" }
            )
        };
        out.push_str(&objective("RTO", &self.rto));
        out.push_str(&objective("RPO", &self.rpo));
        for c in &self.checks {
            out.push_str(&format!(
                "  [{}] {}: {}\n",
                if c.passed { "ok" } else { "FAILED" },
                c.name,
                c.detail
            ));
        }
        if let Some(f) = &self.failure {
            out.push_str(&format!("  failure: {f}\n"));
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("{0}")]
    Setup(String),
}

/// `--check-sql` files as a drill reads them: each must exist, and is named by its absolute
/// path (the drill's server runs elsewhere; the evidence names the file).
pub fn check_sql_files(files: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .and_then(|_| std::path::absolute(f))
                .map_err(|e| format!("{}: {e}", f.display()))
        })
        .collect()
}

/// Store a drill's evidence in the repository (`drills/<id>.json`; records are kept: they are
/// the audit history).
pub async fn store(repo: &crate::repo::Writer, ev: &Evidence) -> Result<(), String> {
    let id: crate::backup::manifest::BackupId = ev.id.parse().map_err(|_| format!("drill id {:?}", ev.id))?;
    let key = crate::repo::layout::drill_key(&id);
    let json = serde_json::to_vec_pretty(ev).expect("evidence serializes");
    repo.writable()
        .put(&key, repo.sealer().seal_record(&key, json))
        .await
        .map_err(|e| e.to_string())
}

/// The newest `n` drills' evidence, newest first. A record that cannot be read is skipped with
/// a warning: the history is informative, never load-bearing.
pub async fn recent(repo: &crate::repo::Reader, n: usize) -> Result<Vec<Evidence>, crate::repo::StoreError> {
    use crate::repo::layout::{Kind, parse_drill_key};
    let mut keys: Vec<String> = repo
        .store()
        .list(Kind::Drill.dirname())
        .await?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| parse_drill_key(k).is_some())
        .collect();
    keys.sort_unstable_by(|a, b| b.cmp(a));
    let mut out = Vec::new();
    for key in keys.into_iter().take(n) {
        let Some(bytes) = repo.store().get(&key).await? else {
            continue;
        };
        let parsed = repo
            .sealer()
            .open_record(&key, &bytes)
            .map_err(|e| e.to_string())
            .and_then(|json| serde_json::from_slice::<Evidence>(&json).map_err(|e| e.to_string()));
        match parsed {
            Ok(ev) if ev.format == FORMAT_NAME => out.push(ev),
            Ok(_) => tracing::warn!("{key}: not a drill record"),
            Err(e) => tracing::warn!("{key}: unreadable drill record: {e}"),
        }
    }
    Ok(out)
}

/// What [`plan`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub target: RecoveryTarget,
    /// The instant chosen for a random drill (unix micros).
    pub random_time: Option<i64>,
    /// Newest restorable commit of the latest timeline (unix micros).
    pub newest_commit: Option<i64>,
}

/// Choose the target: `random` is a number in [0, 1) (injected, for tests). A random drill
/// needs a window with a commit after its earliest backup.
pub fn plan(cat: &Catalog, target: &DrillTarget, random: f64) -> Result<Plan, DrillError> {
    let latest = cat.timelines.latest();
    let window = cat.window(latest);
    let newest_commit = window.as_ref().and_then(|w| w.latest);
    let (target, random_time) = match target {
        DrillTarget::Latest => (RecoveryTarget::End, None),
        DrillTarget::Target(t) => (t.clone(), None),
        DrillTarget::Random => {
            let w = window.ok_or_else(|| {
                DrillError::Setup("no backup to drill: the repository has no restorable window".into())
            })?;
            let latest = w.latest.filter(|l| *l > w.earliest).ok_or_else(|| {
                DrillError::Setup(format!(
                    "--target random needs a commit archived after the earliest backup ({})",
                    w.describe()
                ))
            })?;
            let t = random_instant(w.earliest, latest, random);
            (RecoveryTarget::Time(t), Some(t))
        }
    };
    Ok(Plan {
        target,
        random_time,
        newest_commit,
    })
}

/// An instant in `(earliest, latest]` (unix micros, `earliest < latest`) for `random` in [0, 1):
/// after the backup's consistency point, up to the newest restorable commit.
fn random_instant(earliest: i64, latest: i64, random: f64) -> i64 {
    let span = (latest - earliest - 1) as f64;
    (earliest + 1 + (span * random.clamp(0.0, 1.0)) as i64).min(latest)
}

/// Run a drill. Never fails: whatever goes wrong is the drill's outcome, in the evidence.
pub async fn run(settings: &Settings, opts: &DrillOptions) -> Evidence {
    let started = Instant::now();
    let start_us = crate::time::now_micros();
    let mut ev = Evidence {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        id: crate::time::format_compact(start_us.div_euclid(1_000_000)),
        started_at: crate::time::format_micros(start_us),
        finished_at: String::new(),
        outcome: "failed".into(),
        failure: None,
        repository: settings.repo.to_string(),
        host: hostname(),
        backup: None,
        pg_version: None,
        target: String::new(),
        target_time: None,
        recovered_to: None,
        bytes_restored: 0,
        files_restored: 0,
        segments_replayed: 0,
        restore_seconds: None,
        recovery_seconds: None,
        rto: Objective::new(None, opts.rto_target),
        rpo: Objective::new(None, opts.rpo_target),
        newest_restorable_commit: None,
        checks: Vec::new(),
    };
    let scratch = match make_scratch(opts.scratch.as_deref(), &ev.id) {
        Ok(s) => s,
        Err(e) => {
            ev.failure = Some(format!("cannot make a scratch directory: {e}"));
            ev.finished_at = crate::time::format_micros(crate::time::now_micros());
            return ev;
        }
    };
    let guard = ScratchGuard {
        dir: scratch.clone(),
        keep: opts.keep,
    };
    let mut server = None;
    let result = drill_in(settings, opts, &scratch, started, &mut ev, &mut server).await;
    if let Some(s) = server.take() {
        s.stop().await;
    }
    if let Err(failure) = result {
        ev.checks.push(Check {
            name: failure.0.clone(),
            passed: false,
            detail: failure.1.clone(),
        });
    }
    ev.failure = ev
        .checks
        .iter()
        .find(|c| !c.passed)
        .map(|c| format!("{}: {}", c.name, c.detail));
    let objectives_met = ev.rto.met && ev.rpo.met;
    if ev.failure.is_none() && !objectives_met {
        ev.failure = Some(
            match (ev.rto.met, ev.rpo.met) {
                (false, _) => "the RTO target was not met",
                _ => "the RPO target was not met",
            }
            .into(),
        );
    }
    ev.outcome = if ev.failure.is_none() { "passed" } else { "failed" }.into();
    drop(guard);
    ev.finished_at = crate::time::format_micros(crate::time::now_micros());
    ev
}

/// Removes the scratch directory when the drill ends, however it ends (a daemon aborting it
/// included), unless asked to keep it.
struct ScratchGuard {
    dir: PathBuf,
    keep: bool,
}

impl Drop for ScratchGuard {
    fn drop(&mut self) {
        if self.keep {
            tracing::info!(dir = %self.dir.display(), "drill: scratch directory kept");
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), "drill: could not remove the scratch directory: {e}");
        }
    }
}

/// A failed step: (check name, what happened).
type Failed = (String, String);

fn failed(name: &str, detail: impl std::fmt::Display) -> Failed {
    (name.to_string(), detail.to_string())
}

async fn drill_in(
    settings: &Settings,
    opts: &DrillOptions,
    scratch: &Path,
    started: Instant,
    ev: &mut Evidence,
    server: &mut Option<Server>,
) -> Result<(), Failed> {
    // 1. Plan.
    let reader = crate::repo::Reader::open(&settings.repo, &settings.store_options())
        .await
        .map_err(|e| failed("repository", e))?;
    let cat = Catalog::load(&reader)
        .await
        .map_err(|e| failed("repository", e))?;
    let plan = plan(&cat, &opts.target, rand::random::<f64>()).map_err(|e| failed("plan", e))?;
    ev.newest_restorable_commit = plan.newest_commit.map(crate::time::format_micros);
    ev.target_time = plan.random_time.map(crate::time::format_micros);
    let rpo = plan
        .newest_commit
        .map(|c| (crate::time::now_micros() - c).max(0) as f64 / 1e6);
    ev.rpo = Objective::new(rpo, opts.rpo_target);

    // 2. Restore.
    let pgdata = scratch.join("data");
    let restore_opts = RestoreOptions {
        pgdata: pgdata.clone(),
        backup: None,
        target: plan.target.clone(),
        timeline: opts.timeline,
        action: TargetAction::Promote,
        exclusive: opts.exclusive,
        force: false,
        delta: false,
        parallel: opts.parallel,
        restore_command: opts.restore_command.clone(),
        tablespaces: crate::restore::TablespacePlan {
            all_under: Some(scratch.join("tablespaces")),
            ..Default::default()
        },
    };
    let t = Instant::now();
    // The catalog read for the plan serves the restore too: a large repository's time index is
    // read once, not twice, inside the measured RTO.
    let restored = crate::restore::restore_from(
        settings,
        &reader,
        &cat,
        &restore_opts,
        Arc::new(crate::restore::NoProgress),
    )
    .await
    .map_err(|e| failed("restore", e))?;
    ev.restore_seconds = Some(t.elapsed().as_secs_f64());
    ev.backup = Some(restored.backup.to_string());
    ev.pg_version = Some(restored.pg_version);
    ev.target = restored.target.clone();
    ev.files_restored = restored.files;
    ev.bytes_restored = restored.bytes;
    ev.checks.push(Check {
        name: "restore".into(),
        passed: true,
        detail: format!("backup {} restored, target {}", restored.backup, restored.target),
    });

    // 3. Start PostgreSQL on a private socket and wait for the end of recovery.
    let bin = find_pg_bin(opts.pg_bin.as_deref(), restored.pg_version)
        .await
        .map_err(|e| failed("postgresql binaries", e))?;
    let user = os_user(opts.run_as.as_deref());
    let port = free_port().map_err(|e| failed("server", format!("no free port: {e}")))?;
    write_drill_conf(&pgdata, scratch, port).map_err(|e| failed("server", e))?;
    if let Some(u) = &user {
        chown_tree(scratch, u).await.map_err(|e| failed("server", e))?;
    }
    let t = Instant::now();
    let s = Server {
        bin,
        pgdata: pgdata.clone(),
        log: scratch.join("postgresql.log"),
        socket_dir: scratch.to_path_buf(),
        port,
        user: user.clone(),
        db_user: opts.pg_user.clone().or(user.clone()).unwrap_or_else(current_user),
        stopped: Default::default(),
    };
    let s = server.insert(s);
    s.start().await.map_err(|e| failed("server start", e))?;
    let replayed = s
        .wait_recovered(opts.timeout)
        .await
        .map_err(|e| failed("recovery", e))?;
    ev.recovery_seconds = Some(t.elapsed().as_secs_f64());
    ev.rto = Objective::new(Some(started.elapsed().as_secs_f64()), opts.rto_target);
    ev.recovered_to = replayed.map(crate::time::format_micros);
    let log = std::fs::read_to_string(&s.log).unwrap_or_default();
    ev.segments_replayed = log
        .lines()
        .filter(|l| l.contains("restored log file") && !l.contains(".history"))
        .count() as u64;
    ev.checks
        .push(reached_check(&plan.target, opts.exclusive, replayed, &log));

    // 4. Checks.
    ev.checks.extend(s.connect_every_database().await);
    for file in &opts.check_sql {
        ev.checks.extend(s.check_sql(file, &opts.check_db).await);
    }
    if opts.amcheck {
        ev.checks.extend(s.amcheck(restored.pg_version).await);
    }
    Ok(())
}

/// Whether the server stopped where it was asked to (from its log and replayed time).
fn reached_check(target: &RecoveryTarget, exclusive: bool, replayed: Option<i64>, log: &str) -> Check {
    let stopping = log
        .lines()
        .find(|l| l.contains("recovery stopping"))
        .map(|l| l.split("LOG:").last().unwrap_or(l).trim().to_string());
    let (passed, detail) = match target {
        RecoveryTarget::End => (
            log.contains("archive recovery complete") || log.contains("redo done"),
            format!(
                "replayed to the end of the archive; last transaction at {}",
                replayed.map_or("-".into(), crate::time::format_micros)
            ),
        ),
        RecoveryTarget::Time(t) => {
            let before = replayed.is_none_or(|r| if exclusive { r < *t } else { r <= *t });
            (
                before && stopping.is_some(),
                format!(
                    "{}; last transaction replayed at {} (target {})",
                    stopping
                        .as_deref()
                        .unwrap_or("the log says no \"recovery stopping\""),
                    replayed.map_or("-".into(), crate::time::format_micros),
                    crate::time::format_micros(*t)
                ),
            )
        }
        RecoveryTarget::Immediate => (
            log.contains("consistent recovery state reached"),
            "stopped at the backup's consistency point".into(),
        ),
        _ => (
            stopping.is_some(),
            stopping.unwrap_or_else(|| "the log says no \"recovery stopping\"".into()),
        ),
    };
    Check {
        name: "recovery target reached".into(),
        passed,
        detail,
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn current_user() -> String {
    std::env::var("USER").unwrap_or_else(|_| "postgres".into())
}

fn is_root() -> bool {
    // The owner of /proc/self is the effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// The OS user to run PostgreSQL as: `None` to run it as ourselves (PostgreSQL refuses root).
fn os_user(run_as: Option<&str>) -> Option<String> {
    match (is_root(), run_as) {
        (true, u) => Some(u.unwrap_or("postgres").to_string()),
        (false, _) => None,
    }
}

fn make_scratch(parent: Option<&Path>, id: &str) -> std::io::Result<PathBuf> {
    let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
    let dir = parent.join(format!("walvault-drill-{id}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(dir)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Settings that make the restored server a private, harmless copy: no TCP, a socket in the
/// scratch directory, its own pg_hba.conf (trust over that socket only), no archiving (it would
/// push a new timeline into the repository), no SSL files from the source's host.
fn write_drill_conf(pgdata: &Path, scratch: &Path, port: u16) -> Result<(), String> {
    use std::io::Write;
    let hba = scratch.join("pg_hba.conf");
    std::fs::write(&hba, "local all all trust\n").map_err(|e| format!("{}: {e}", hba.display()))?;
    let q = |p: &Path| crate::recovery_conf::quote(&p.display().to_string());
    let lines = format!(
        "\n# walvault drill: a private copy\nport = {port}\nlisten_addresses = ''\nunix_socket_directories = {}\nhba_file = {}\narchive_mode = off\nssl = off\nhot_standby = on\nlogging_collector = off\nprimary_conninfo = ''\nprimary_slot_name = ''\n",
        q(scratch),
        q(&hba)
    );
    let conf = pgdata.join("postgresql.auto.conf");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .map_err(|e| format!("{}: {e}", conf.display()))?;
    f.write_all(lines.as_bytes())
        .map_err(|e| format!("{}: {e}", conf.display()))
}

async fn chown_tree(dir: &Path, user: &str) -> Result<(), String> {
    let out = tokio::process::Command::new("chown")
        .args(["-R", &format!("{user}:")])
        .arg(dir)
        .output()
        .await
        .map_err(|e| format!("chown: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "chown -R {user} {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The major version `postgres --version` reports.
async fn server_major(bin: &Path) -> Option<u32> {
    let out = tokio::process::Command::new(bin.join("postgres"))
        .arg("--version")
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split_whitespace().last()?;
    v.split(['.', 'b', 'r', 'd']).next()?.parse().ok()
}

/// `--pg-bin`, else the usual places for `major`, else `pg_config --bindir`; the binaries must be
/// of the backup's major version.
async fn find_pg_bin(given: Option<&Path>, major: u32) -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(g) = given {
        candidates.push(g.to_path_buf());
    } else {
        candidates.push(PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
        candidates.push(PathBuf::from(format!("/usr/pgsql-{major}/bin")));
        if let Ok(out) = tokio::process::Command::new("pg_config")
            .arg("--bindir")
            .output()
            .await
        {
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !dir.is_empty() {
                candidates.push(PathBuf::from(dir));
            }
        }
    }
    let mut seen = Vec::new();
    for c in candidates {
        match server_major(&c).await {
            Some(m) if m == major => return Ok(c),
            Some(m) => seen.push(format!("{} is PostgreSQL {m}", c.display())),
            None => seen.push(format!("{}: no postgres there", c.display())),
        }
    }
    Err(format!(
        "no PostgreSQL {major} server found ({}); pass --pg-bin DIR",
        seen.join("; ")
    ))
}

/// The drill's server.
struct Server {
    bin: PathBuf,
    pgdata: PathBuf,
    log: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    /// OS user to run as (we are root), or `None`.
    user: Option<String>,
    db_user: String,
    stopped: std::sync::atomic::AtomicBool,
}

impl Drop for Server {
    /// A drill cut short (the daemon shutting down) must not leave a server behind.
    fn drop(&mut self) {
        if !self.stopped.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = self.stop_command().output();
        }
    }
}

impl Server {
    /// `program` from the server's bin directory, run as the server's OS user.
    fn command(&self, program: &str) -> std::process::Command {
        let path = self.bin.join(program);
        let mut c = match &self.user {
            Some(u) => {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", u, "--"]).arg(&path);
                c
            }
            None => std::process::Command::new(&path),
        };
        c.current_dir(&self.socket_dir);
        c.stdin(std::process::Stdio::null());
        c
    }

    /// `pg_ctl stop -m immediate`: the copy is thrown away, nothing to flush.
    fn stop_command(&self) -> std::process::Command {
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(&self.pgdata)
            .args(["-m", "immediate", "-w", "-t", "60", "stop"]);
        c
    }

    async fn start(&self) -> Result<(), String> {
        // -W: do not wait; recovery can take longer than pg_ctl's wait, which is watched below.
        let mut start = self.command("pg_ctl");
        start
            .arg("-D")
            .arg(&self.pgdata)
            .arg("-l")
            .arg(&self.log)
            .args(["-W", "start"]);
        let out = tokio::process::Command::from(start)
            .output()
            .await
            .map_err(|e| format!("pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start: {}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log_tail()
            ))
        }
    }

    async fn stop(&self) {
        self.stopped.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = tokio::process::Command::from(self.stop_command()).output().await;
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("FATAL") || l.contains("PANIC") || l.contains("ERROR"))
            .collect();
        match lines.last() {
            Some(l) => format!("; server log: {}", l.trim()),
            None => String::new(),
        }
    }

    fn config(&self, db: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.socket_dir)
            .port(self.port)
            .user(&self.db_user)
            .dbname(db)
            .application_name("walvault drill")
            .connect_timeout(Duration::from_secs(10));
        c
    }

    async fn connect(&self, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = self.config(db).connect(tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    fn running(&self) -> bool {
        self.pgdata.join("postmaster.pid").exists()
    }

    /// Wait until recovery has ended (the server promoted) and it answers; the last replayed
    /// transaction's time.
    async fn wait_recovered(&self, timeout: Duration) -> Result<Option<i64>, String> {
        let deadline = Instant::now() + timeout;
        let mut gone_since: Option<Instant> = None;
        loop {
            if let Ok(c) = self.connect("postgres").await
                && let Ok(row) = c
                    .query_one(
                        "SELECT pg_is_in_recovery(), (extract(epoch FROM pg_last_xact_replay_timestamp()) * 1000000)::int8",
                        &[],
                    )
                    .await
                && !row.get::<_, bool>(0)
            {
                return Ok(row.get::<_, Option<i64>>(1));
            }
            // The server stopped (a FATAL in recovery): give pg_ctl's pid file a moment.
            if !self.running() {
                let since = *gone_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(3) {
                    return Err(format!("the server stopped during recovery{}", self.log_tail()));
                }
            } else {
                gone_since = None;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "recovery did not finish within {}s{}",
                    timeout.as_secs(),
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn databases(&self) -> Result<Vec<String>, String> {
        let c = self.connect("postgres").await.map_err(|e| e.to_string())?;
        let rows = c
            .query(
                "SELECT datname::text FROM pg_database WHERE datallowconn ORDER BY datname",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn connect_every_database(&self) -> Vec<Check> {
        let dbs = match self.databases().await {
            Ok(d) => d,
            Err(e) => {
                return vec![Check {
                    name: "databases accept connections".into(),
                    passed: false,
                    detail: e,
                }];
            }
        };
        let mut bad = Vec::new();
        for db in &dbs {
            let ok = match self.connect(db).await {
                Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
                Err(_) => false,
            };
            if !ok {
                bad.push(db.clone());
            }
        }
        vec![Check {
            name: "databases accept connections".into(),
            passed: bad.is_empty(),
            detail: if bad.is_empty() {
                format!("{} databases: {}", dbs.len(), dbs.join(", "))
            } else {
                format!("no connection to {}", bad.join(", "))
            },
        }]
    }

    async fn check_sql(&self, file: &Path, db: &str) -> Vec<Check> {
        let name = |i: usize| format!("{} query {}", file.display(), i + 1);
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                return vec![Check {
                    name: file.display().to_string(),
                    passed: false,
                    detail: format!("cannot read: {e}"),
                }];
            }
        };
        let client = match self.connect(db).await {
            Ok(c) => c,
            Err(e) => {
                return vec![Check {
                    name: file.display().to_string(),
                    passed: false,
                    detail: format!("cannot connect to database {db}: {e}"),
                }];
            }
        };
        let mut checks = Vec::new();
        for (i, query) in split_queries(&text).into_iter().enumerate() {
            let (passed, detail) = match client.query(query.as_str(), &[]).await {
                Ok(rows) => match rows.as_slice() {
                    [row] if row.len() == 1 => match row.try_get::<_, Option<bool>>(0) {
                        Ok(Some(true)) => (true, format!("true: {query}")),
                        Ok(v) => (false, format!("returned {v:?}, not true: {query}")),
                        Err(_) => (false, format!("did not return a boolean: {query}")),
                    },
                    rows => (
                        false,
                        format!("returned {} rows, not one boolean: {query}", rows.len()),
                    ),
                },
                Err(e) => (
                    false,
                    format!(
                        "{}: {query}",
                        e.as_db_error().map_or(e.to_string(), |d| d.message().to_string())
                    ),
                ),
            };
            checks.push(Check {
                name: name(i),
                passed,
                detail,
            });
        }
        checks
    }

    async fn amcheck(&self, major: u32) -> Vec<Check> {
        let dbs = self.databases().await.unwrap_or_default();
        let mut checks = Vec::new();
        for db in dbs {
            let r: Result<String, String> = async {
                let c = self.connect(&db).await.map_err(|e| e.to_string())?;
                let err = |e: tokio_postgres::Error| e.as_db_error().map_or(e.to_string(), |d| d.message().to_string());
                c.batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck").await.map_err(err)?;
                let indexes: i64 = c
                    .query_one(
                        "SELECT count(bt_index_check(c.oid)) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                          JOIN pg_am a ON a.oid = c.relam
                         WHERE a.amname = 'btree' AND i.indisvalid AND c.relpersistence <> 't'",
                        &[],
                    )
                    .await
                    .map_err(err)?
                    .get(0);
                let mut detail = format!("{indexes} B-tree indexes intact");
                if major >= 14 {
                    let row = c
                        .query_one(
                            "SELECT count(*), count(v.blkno) FROM pg_class c
                               LEFT JOIN LATERAL verify_heapam(c.oid) v ON true
                              WHERE c.relkind IN ('r', 't') AND c.relpersistence <> 't'
                                AND c.relam = (SELECT oid FROM pg_am WHERE amname = 'heap')",
                            &[],
                        )
                        .await
                        .map_err(err)?;
                    let corrupt: i64 = row.get(1);
                    if corrupt > 0 {
                        return Err(format!("verify_heapam reports {corrupt} corrupt tuples or pages"));
                    }
                    detail.push_str(", every table's heap intact");
                }
                Ok(detail)
            }
            .await;
            checks.push(Check {
                name: format!("amcheck {db}"),
                passed: r.is_ok(),
                detail: r.unwrap_or_else(|e| e),
            });
        }
        checks
    }
}

/// Queries separated by `;` (outside quotes); `--` comments and blank ones dropped.
fn split_queries(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for line in text.lines() {
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match (quote, c) {
                (None, '-') if chars.peek() == Some(&'-') => break,
                (None, ';') => {
                    out.push(std::mem::take(&mut cur));
                    continue;
                }
                (None, '\'' | '"') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                _ => {}
            }
            cur.push(c);
        }
        cur.push('\n');
    }
    out.push(cur);
    out.into_iter()
        .map(|q| q.trim().to_string())
        .filter(|q| !q.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_split_on_semicolons_outside_quotes_and_comments() {
        let q = split_queries(
            "-- checks\nSELECT count(*) > 0 FROM t;\nSELECT 'a;b' = 'a;b'; -- trailing\n\nSELECT true",
        );
        assert_eq!(
            q,
            vec![
                "SELECT count(*) > 0 FROM t",
                "SELECT 'a;b' = 'a;b'",
                "SELECT true"
            ]
        );
        assert!(split_queries("-- nothing\n;\n").is_empty());
    }

    #[test]
    fn frozen_fixture_v1() {
        let ev: Evidence = serde_json::from_slice(include_bytes!("../../tests/fixtures/drill-v1.json")).unwrap();
        assert_eq!((ev.format.as_str(), ev.version), (FORMAT_NAME, FORMAT_VERSION));
        assert!(!ev.passed());
        assert_eq!(ev.rto.measured_seconds, Some(0.8));
        assert!(ev.rpo.met);
        assert_eq!(ev.checks.len(), 2);
        assert!(!ev.checks[1].passed);
        assert!(ev.summary().contains("[FAILED] /etc/walvault/checks.sql query 2"));
        let again: Evidence = serde_json::from_str(&serde_json::to_string(&ev).unwrap()).unwrap();
        assert_eq!(again, ev);
    }

    #[test]
    fn random_instants_stay_inside_the_window() {
        for r in [0.0, 0.5, 0.999_999, 1.0] {
            let t = random_instant(1_000, 2_000, r);
            assert!((1_001..=2_000).contains(&t), "{r}: {t}");
        }
        assert_eq!(random_instant(1_000, 1_001, 0.7), 1_001);
    }

    #[test]
    fn objectives_are_met_only_when_measured_within_target() {
        assert!(Objective::new(Some(5.0), Some(Duration::from_secs(10))).met);
        assert!(!Objective::new(Some(15.0), Some(Duration::from_secs(10))).met);
        assert!(Objective::new(Some(15.0), None).met);
        assert!(!Objective::new(None, None).met);
    }

    #[test]
    fn the_target_check_reads_the_server_log() {
        let log = "LOG:  recovery stopping before commit of transaction 731, time 2026-11-22 19:33:48.72+00\nLOG:  archive recovery complete\n";
        let c = reached_check(&RecoveryTarget::Time(100), false, Some(90), log);
        assert!(c.passed, "{c:?}");
        let c = reached_check(&RecoveryTarget::Time(100), false, Some(120), log);
        assert!(!c.passed, "replayed past the target: {c:?}");
        let c = reached_check(&RecoveryTarget::Time(100), false, Some(90), "LOG:  redo done\n");
        assert!(!c.passed, "never stopped for the target: {c:?}");
        assert!(reached_check(&RecoveryTarget::End, false, None, log).passed);
    }
}
