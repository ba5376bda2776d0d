//! Restore drills: prove a repository restores, and measure how long it takes (RTO) and how much
//! history a disaster now would lose (RPO), as the evidence auditors ask for.
//!
//! A drill restores into a scratch directory (the newest state, a target, or a random instant
//! of the restorable window), starts PostgreSQL there on a private socket with archiving off,
//! waits until recovery has reached the target and the server answers, runs the checks (every
//! database accepts a connection, `--check-sql` queries return true, optionally amcheck), then
//! stops the server and removes the directory. The result is an [`Evidence`] record.
//!
//! Phases, a module each: `plan` (pure: which target, from the catalog and a random number),
//! the restore (wired here), `server` (the throwaway PostgreSQL), `checks` (what is checked and
//! measured), `evidence` (the record, stored or printed by the caller). [`run`] wires them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::catalog::Catalog;
use crate::commands::restore::{RecoveryTarget, RestoreOptions, TimelineTarget};
use crate::config::Settings;

mod checks;
mod evidence;
mod plan;

pub use crate::commands::private_server::ServerError;
pub use checks::{ChecksError, check_sql_files};
pub use evidence::{Check, Evidence, EvidenceError, FORMAT_NAME, FORMAT_VERSION, Objective, recent, store};
pub use plan::{Plan, PlanError, plan};

use crate::commands::private_server::{self as server, ScratchGuard, Server};

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
        host: evidence::hostname(),
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
    let scratch = match server::make_scratch(opts.scratch.as_deref(), "drill", &ev.id) {
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
        purpose: "drill",
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
    conclude(&mut ev);
    drop(guard);
    ev.finished_at = crate::time::format_micros(crate::time::now_micros());
    ev
}

/// The outcome: the first failed check, else the first objective not met, fails the drill.
fn conclude(ev: &mut Evidence) {
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
}

/// A failed step: (check name, what happened).
type Failed = (String, String);

fn failed(name: &str, detail: impl std::fmt::Display) -> Failed {
    (name.to_string(), detail.to_string())
}

/// The phases in order; the first that fails ends the drill (as a failed check named for it).
async fn drill_in(
    settings: &Settings,
    opts: &DrillOptions,
    scratch: &Path,
    started: Instant,
    ev: &mut Evidence,
    server: &mut Option<Server>,
) -> Result<(), Failed> {
    // 1. Plan.
    let reader = settings
        .open_reader()
        .await
        .map_err(|e| failed("repository", e))?;
    let cat = Catalog::load_outlines(&reader)
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
    let pg_version = restore(
        settings,
        &reader,
        &cat,
        &restore_options(opts, &plan, scratch, &pgdata),
        ev,
    )
    .await?;

    // 3. Start PostgreSQL on a private socket and wait for the end of recovery.
    let s = server.insert(prepare_server(opts, scratch, pgdata, pg_version).await?);
    let t = Instant::now();
    s.start().await.map_err(|e| failed("server start", e))?;
    let replayed = s
        .wait_recovered(opts.timeout)
        .await
        .map_err(|e| failed("recovery", e))?;
    ev.recovery_seconds = Some(t.elapsed().as_secs_f64());
    ev.rto = Objective::new(Some(started.elapsed().as_secs_f64()), opts.rto_target);
    ev.recovered_to = replayed.map(crate::time::format_micros);
    let log = s.log();
    ev.segments_replayed = checks::segments_replayed(&log);
    ev.checks.push(checks::reached_check(
        &plan.target,
        opts.exclusive,
        replayed,
        &log,
    ));

    // 4. Checks.
    ev.checks.extend(checks::connect_every_database(s).await);
    for file in &opts.check_sql {
        ev.checks.extend(checks::check_sql(s, file, &opts.check_db).await);
    }
    if opts.amcheck {
        ev.checks.extend(checks::amcheck(s, pg_version).await);
    }
    Ok(())
}

/// The restore a drill runs: the plan's target into `pgdata`, promoted at the end, tablespaces
/// under the scratch directory.
fn restore_options(opts: &DrillOptions, plan: &Plan, scratch: &Path, pgdata: &Path) -> RestoreOptions {
    RestoreOptions {
        target: plan.target.clone(),
        timeline: opts.timeline,
        exclusive: opts.exclusive,
        parallel: opts.parallel,
        // The restore a DBA would run, so the drill's RTO is that restore's (and never a syncfs
        // of a scratch file system shared with a production server): the default sync method.
        tablespaces: crate::commands::restore::TablespacePlacement {
            all_under: Some(scratch.join("tablespaces")),
            ..Default::default()
        },
        ..RestoreOptions::new(pgdata, opts.restore_command.clone())
    }
}

/// Restore and record what was restored; the backup's PostgreSQL major version.
async fn restore(
    settings: &Settings,
    reader: &crate::repo::Reader,
    cat: &Catalog,
    restore_opts: &RestoreOptions,
    ev: &mut Evidence,
) -> Result<u32, Failed> {
    let t = Instant::now();
    // The catalog read for the plan serves the restore too: a large repository's time index is
    // read once, not twice, inside the measured RTO.
    let restored = crate::commands::restore::restore_from(
        settings,
        reader,
        cat,
        restore_opts,
        Arc::new(crate::commands::restore::NoProgress),
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
    Ok(restored.pg_version)
}

/// The server of the restored `pgdata`, ready to start: binaries of its version found, the
/// private configuration written, the scratch directory owned by the OS user it runs as.
async fn prepare_server(
    opts: &DrillOptions,
    scratch: &Path,
    pgdata: PathBuf,
    major: u32,
) -> Result<Server, Failed> {
    let bin = server::find_pg_bin(opts.pg_bin.as_deref(), major)
        .await
        .map_err(|e| failed("postgresql binaries", e))?;
    let user = server::os_user(opts.run_as.as_deref());
    let port = server::free_port().map_err(|e| failed("server", format!("no free port: {e}")))?;
    server::write_private_conf(&pgdata, scratch, port, "drill").map_err(|e| failed("server", e))?;
    if let Some(u) = &user {
        server::chown_tree(scratch, u)
            .await
            .map_err(|e| failed("server", e))?;
    }
    let db_user = opts
        .pg_user
        .clone()
        .or(user.clone())
        .unwrap_or_else(server::current_user);
    Ok(Server::new(bin, pgdata, scratch, port, user, db_user))
}
