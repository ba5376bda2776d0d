//! restore-agent: PostgreSQL's restore_command. Thin: flags in, library call, exit code out.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use walvault::cli;
use walvault::cli::progress_bar::Bar;
use walvault::cli::restore_agent::{Cli, Command};
use walvault::cli::restore_args::RestoreArgs;
use walvault::config::RepoArgs;
use walvault::exit;
use walvault::report::{Format, Report};

/// mimalloc: see `walvault::cli::allocator` for why, and for the settings the long commands run
/// with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // As restore_command, a bad command line must not read as "file not found": PostgreSQL
    // would end recovery there and promote (it runs the command in the data directory).
    let usage_code = match invoked_as_fetch() {
        true => exit::fetch_failure(exit::in_standby_mode(std::path::Path::new("."))),
        false => exit::USAGE,
    };
    let cli: Cli = cli::parse_or_exit_with("restore-agent", usage_code);
    if matches!(
        cli.command,
        Command::Restore(_) | Command::Drill { .. } | Command::Extract(_)
    ) {
        cli::allocator::rerun_with_lean_allocator("restore-agent");
    }
    cli::init_logging();
    let repo = cli.repo.with_fallback(cli.fallback);
    let (failed, failure_code) = match &cli.command {
        Command::Fetch {
            wal_name,
            dest_path,
            pgdata,
            no_prefetch,
        } => {
            let pgdata = pgdata.clone().unwrap_or_else(|| PathBuf::from("."));
            let standby = exit::in_standby_mode(&pgdata);
            exit_on_panic(standby);
            let req = walvault::commands::restore_command::FetchRequest {
                name: wal_name,
                dest: dest_path,
                pgdata: &pgdata,
                standby,
                no_prefetch: *no_prefetch,
            };
            let program = std::env::current_exe().ok();
            return ExitCode::from(walvault::commands::restore_command::fetch(
                &repo,
                &req,
                program.as_deref(),
            ));
        }
        Command::Verify { .. } => ("verify failed: ", ExitCode::FAILURE),
        // A drill that ran and failed exits 1; one that could not start, 2.
        Command::Drill { .. } => ("", ExitCode::from(exit::USAGE)),
        _ => ("", ExitCode::FAILURE),
    };
    match run(&repo, cli.command) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            tracing::error!("{failed}{e}");
            failure_code
        }
    }
}

/// Every subcommand but fetch: one library call, its report shown; `Ok(false)` when verify
/// found something at risk or the drill failed.
fn run(repo: &RepoArgs, command: Command) -> anyhow::Result<bool> {
    let now = walvault::time::now_micros;
    match command {
        Command::Fetch { .. } => unreachable!("fetch maps its own exit codes"),
        Command::Prefetch {
            pgdata,
            depth,
            parallel,
        } => {
            let settings = repo.settings(None)?;
            let opts = walvault::commands::prefetch::PrefetchOptions {
                depth,
                parallel,
                ..Default::default()
            };
            // Tokio's default blocking pool: each of its `--parallel` tasks may wait on this
            // thread for a read from the fallback repository (walvault::cli::threads).
            tokio::runtime::Runtime::new()?
                .block_on(walvault::commands::prefetch::run(&settings, &pgdata, &opts))?;
            Ok(true)
        }
        Command::Restore(args) => run_restore(repo, args).map(|()| true),
        Command::Verify { deep, parallel, json } => {
            let settings = repo.settings(None)?;
            let verified = block_on(walvault::commands::verify::verify_repository(
                &settings, deep, parallel,
            ))??;
            show(&verified, Format::from_json_flag(json))?;
            Ok(!verified.at_risk)
        }
        Command::Find {
            since,
            until,
            table,
            min_rows,
            pgdata,
            json,
        } => {
            let settings = repo.settings(None)?;
            let opts = walvault::commands::find::FindOptions {
                since: since.as_deref().map(walvault::time::parse_time).transpose()?,
                until: until.as_deref().map(walvault::time::parse_time).transpose()?,
                table,
                min_rows,
            };
            // The command as this one was invoked, so it runs where this one did.
            let program = std::env::args().next().unwrap_or_else(|| "restore-agent".into());
            let repo = walvault::invocation::RepoInvocation::new(&settings, repo)?;
            let command = walvault::invocation::AgentCommand::new(program, "restore", &repo)
                .args([std::ffi::OsStr::new("--pgdata"), pgdata.as_os_str()]);
            let found = block_on(walvault::commands::find::find_in(&settings, &opts, &command))??;
            show(&found, Format::from_json_flag(json)).map(|()| true)
        }
        Command::Drill { args } => {
            let settings = repo.settings(None)?;
            let opts = args.options(repo, &settings, &std::env::current_exe()?)?;
            let evidence = block_on(walvault::commands::drill::run(&settings, &opts))?;
            show(&evidence, args.deliver(&evidence)?)?;
            Ok(evidence.passed())
        }
        Command::Extract(args) => {
            let settings = repo.settings(None)?;
            let opts = args.options(&settings, repo, &std::env::current_exe()?)?;
            let report = block_on(until_interrupted(walvault::commands::extract::extract(
                &settings, &opts,
            )))??;
            show(&report?, Format::from_json_flag(args.json)).map(|()| true)
        }
        Command::Status { pgdata, json } => {
            let status = walvault::commands::status::status(&pgdata, now())?;
            show(&status, Format::from_json_flag(json)).map(|()| true)
        }
        Command::List => info(repo, false),
        Command::Info { json } => info(repo, json),
    }
}

/// `info` and `list`: the repository described.
fn info(repo: &RepoArgs, json: bool) -> anyhow::Result<bool> {
    let settings = repo.settings(None)?;
    let report = block_on(walvault::commands::info::info(&settings))??;
    show(&report, Format::from_json_flag(json)).map(|()| true)
}

/// `f`, unless Ctrl-C or SIGTERM comes first: then `f` is dropped, which stops what it started
/// (extract's private server, its scratch directory) before the error returns.
async fn until_interrupted<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        out = f => Ok(out),
        _ = int.recv() => anyhow::bail!("interrupted: what extract started was stopped and its scratch directory removed"),
        _ = term.recv() => anyhow::bail!("terminated: what extract started was stopped and its scratch directory removed"),
    }
}

/// Run `f` to completion on a multi-threaded runtime.
fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    Ok(walvault::cli::threads::runtime()?.block_on(f))
}

fn show(report: &impl Report, format: Format) -> anyhow::Result<()> {
    Ok(walvault::report::emit(report, format)?)
}

fn run_restore(repo: &RepoArgs, args: RestoreArgs) -> anyhow::Result<()> {
    use walvault::report::{Format, emit};
    let settings = repo.settings(None)?;
    let opts = args.options(&settings, repo, &std::env::current_exe()?)?;
    let json = args.json;
    let rt = walvault::cli::threads::runtime()?;
    if args.dry_run {
        let plan = rt.block_on(walvault::commands::restore::plan(&settings, &opts))?;
        emit(&plan, Format::from_json_flag(json))?;
        return Ok(());
    }
    let progress: std::sync::Arc<dyn walvault::commands::restore::Progress> =
        if std::io::stderr().is_terminal() {
            std::sync::Arc::new(Bar(indicatif::ProgressBar::new(0)))
        } else {
            std::sync::Arc::new(walvault::commands::restore::NoProgress)
        };
    let r = rt.block_on(walvault::commands::restore::restore(
        &settings,
        &opts,
        progress.clone(),
    ));
    drop(progress);
    emit(&r?, Format::from_json_flag(json))?;
    Ok(())
}

/// Whether the command line asks for `fetch` (the first word that is not an option).
fn invoked_as_fetch() -> bool {
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy();
        match arg.as_ref() {
            // Global options that take a value as the next word.
            "--repo" | "--config" | "--retry-timeout" | "--fallback-repo" => {
                args.next();
            }
            a if a.starts_with('-') => {}
            a => return a == "fetch",
        }
    }
    false
}

/// A panic in fetch is a bug, and must never read as "file not found" (Rust's panic status,
/// 101, would): report it in one line and exit as any other fetch failure does.
fn exit_on_panic(standby: bool) {
    std::panic::set_hook(Box::new(move |info| {
        let code = exit::fetch_failure(standby);
        let what = info.to_string().replace('\n', " ");
        eprintln!("restore-agent: fetch failed: internal error ({what}); exit {code}");
        std::process::exit(i32::from(code));
    }));
}
