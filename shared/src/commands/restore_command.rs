//! `restore-agent fetch` as PostgreSQL runs it (restore_command): one WAL file fetched, replay
//! progress recorded, the prefetcher kept ahead of recovery, one log line, and the exit code
//! PostgreSQL reads (see [`crate::exit`]).

use std::ffi::OsStr;
use std::path::Path;
use std::time::Instant;

use crate::commands::fetch::{FetchOutcome, fetch_for_replay};
use crate::commands::prefetch::Prefetch;
use crate::config::RepoArgs;
use crate::exit;
use crate::invocation::{AgentCommand, RepoInvocation};
use crate::wal::WalFileName;

/// What PostgreSQL asked for, and where.
#[derive(Debug, Clone)]
pub struct FetchRequest<'a> {
    /// The WAL file name (`%f`), as given: not yet validated.
    pub name: &'a str,
    /// Where to write it (`%p`).
    pub dest: &'a Path,
    /// The data directory being recovered.
    pub pgdata: &'a Path,
    /// It is a standby's (`standby.signal`): failures exit 1, as PostgreSQL retries there.
    pub standby: bool,
    /// Do not start the background prefetcher.
    pub no_prefetch: bool,
}

/// Fetch one file for PostgreSQL and say how it went, as the exit code. `program` is this
/// program, run again with `repo`'s flags as the prefetcher.
pub fn fetch(repo: &RepoArgs, req: &FetchRequest<'_>, program: Option<&Path>) -> u8 {
    let started = Instant::now();
    let FetchRequest {
        name,
        dest,
        pgdata,
        standby,
        no_prefetch,
    } = *req;
    // Prefetch only while the data directory is recovering (the way PostgreSQL runs fetch).
    let prefetch = Some(Prefetch::new(pgdata)).filter(|p| !no_prefetch && p.in_recovery());
    let shown = name.escape_debug().to_string();
    let fail = |message: String, code: u8| {
        if code == exit::NOT_FOUND_OR_RETRY && standby {
            tracing::error!("fetch {shown}: not available (standby mode, PostgreSQL will retry): {message}");
        } else if code == exit::FATAL {
            tracing::error!("fetch {shown}: {message}; stopping recovery rather than ending it early");
        } else {
            tracing::error!("fetch {shown}: {message}");
        }
        code
    };
    let settings = match repo.settings(None) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string(), exit::fetch_failure(standby)),
    };
    // Restored by walvault: each segment is counted against the plan and logged.
    let plan = crate::replay::files::plan_for_fetch(pgdata);
    let fetched = fetch_for_replay(&settings, name, dest, prefetch.as_ref(), plan.is_some());
    let result = match crate::call::run_call(fetched) {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start: {e}"), exit::FATAL),
    };
    let ms = started.elapsed().as_millis();
    match result {
        Ok(FetchOutcome::Restored {
            name,
            size,
            stored_size,
            prefetched,
            latest_commit,
        }) => {
            let from = if prefetched { ", prefetched" } else { "" };
            tracing::info!("fetch {name}: restored, {size} bytes, stored {stored_size} bytes{from}, {ms} ms");
            if let (Some(plan), WalFileName::Segment(seg)) = (&plan, name) {
                let now = crate::time::now_micros();
                if let Some(p) = crate::replay::files::record_fetch(pgdata, plan, &seg, latest_commit, now) {
                    tracing::info!("{}", p.line());
                }
            }
            if let (Some(p), WalFileName::Segment(_)) = (&prefetch, name) {
                keep_prefetching(p, &name, program, (&settings, repo), pgdata);
            }
            exit::SUCCESS
        }
        Ok(FetchOutcome::NotFound { name }) => {
            tracing::info!("fetch {name}: not in the repository, {ms} ms");
            exit::NOT_FOUND_OR_RETRY
        }
        Err(e) => fail(e.to_string(), e.exit_code(standby)),
    }
}

/// Tell the prefetcher where recovery is, starting it (`program prefetch`, with the repository
/// settings this fetch was given) if none runs. Best effort: prefetching only saves time, so a failure here is logged and never fails
/// the fetch.
fn keep_prefetching(
    p: &Prefetch,
    name: &WalFileName,
    program: Option<&Path>,
    (settings, given): (&crate::config::Settings, &RepoArgs),
    pgdata: &Path,
) {
    if let Err(e) = p.request(name) {
        tracing::warn!("prefetch: {e}");
        return;
    }
    let Some(program) = program.filter(|_| !p.running()) else {
        return;
    };
    let repo = match RepoInvocation::new(settings, given) {
        Ok(r) => r,
        Err(e) => return tracing::warn!("prefetch: cannot start: {e}"),
    };
    let prefetcher =
        AgentCommand::new(program, "prefetch", &repo).args([OsStr::new("--pgdata"), pgdata.as_os_str()]);
    let mut cmd = std::process::Command::new(prefetcher.program());
    cmd.args(prefetcher.argv()).envs(prefetcher.env());
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // Its own process group: signals PostgreSQL sends to the startup process's group when
    // recovery ends must not kill it before it removes its spool.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    if let Err(e) = cmd.spawn() {
        tracing::warn!("prefetch: cannot start: {e}");
    }
}
