//! archive-agent: PostgreSQL's archive_command. Thin: flags in, library call, exit code out.

use std::process::ExitCode;

use walvault::cli;
use walvault::cli::archive_agent::{Cli, Command};
use walvault::commands::{admin, expire};
use walvault::config::RepoArgs;
use walvault::repo::keys::KeySource;
use walvault::report::{Format, Report};

/// mimalloc: see `walvault::cli::allocator` for why, and for the settings the long commands run
/// with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli: Cli = cli::parse_or_exit("archive-agent");
    if matches!(cli.command, Command::Daemon { .. } | Command::Backup { .. }) {
        cli::allocator::rerun_with_lean_allocator("archive-agent");
    }
    cli::init_logging();
    if let Command::Push { wal_path, compress } = &cli.command {
        return ExitCode::from(walvault::commands::archive_command::push(
            &cli.repo,
            wal_path,
            compress.compress_level,
        ));
    }
    let what = cli.command.name();
    match run(&cli.repo, cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!("{what} failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Every subcommand but push: one library call, its report shown; the exit status.
fn run(repo: &RepoArgs, command: Command) -> anyhow::Result<u8> {
    let now = walvault::time::now_micros;
    let shown = match command {
        Command::Init {
            copy_of: Some(source),
            json,
            ..
        } => {
            let settings = repo.settings(None)?;
            let source = repo.elsewhere(&source, None).settings(None)?;
            show(&block_on(admin::init_copy(&settings, &source))??, json)
        }
        Command::Init {
            pgdata,
            encrypt,
            json,
            copy_of: None,
        } => {
            let settings = repo.settings(None)?;
            show(
                &block_on(admin::init(&settings, pgdata.as_deref(), encrypt, now()))??,
                json,
            )
        }
        Command::Rekey {
            new_key_file,
            new_key_command,
        } => {
            let new_key = match (new_key_file, new_key_command) {
                (Some(f), _) => KeySource::File(f),
                (None, Some(c)) => KeySource::Command(c),
                (None, None) => unreachable!("clap requires one"),
            };
            let settings = repo.settings(None)?;
            show(&block_on(admin::rekey(&settings, &new_key, now()))??, false)
        }
        Command::Push { .. } => unreachable!("push maps its own exit codes"),
        Command::Copy {
            to,
            to_config,
            parallel,
            prune,
            max_rate,
            json,
        } => {
            let from = repo.settings(None)?;
            let mut target = repo.elsewhere(&to, to_config.as_deref()).settings(None)?;
            target.cap_writes(max_rate);
            let opts = walvault::commands::copy::CopyOptions { parallel, prune };
            let report = block_on(walvault::commands::copy::copy_repository(&from, &target, &opts))??;
            show(&report, json)?;
            return Ok(report.exit_code());
        }
        Command::Backup { args } => {
            let mut settings = repo.settings(args.compress.compress_level)?;
            settings.cap_writes(args.max_rate);
            let opts = args.options()?;
            let taken = block_on(walvault::commands::backup::take_and_log(
                &settings,
                &opts,
                args.reading(),
            ))??;
            show(&taken, args.json)?;
            return Ok(taken.exit_code());
        }
        Command::Expire { rules, dry_run, json } => {
            let settings = repo.settings(None)?;
            show(
                &block_on(expire::expire_repository(&settings, &rules, dry_run, now()))??,
                json,
            )
        }
        Command::Pin { id, note } => {
            let settings = repo.settings(None)?;
            show(&block_on(admin::pin(&settings, &id, Some(note)))??, false)
        }
        Command::Unpin { id } => {
            let settings = repo.settings(None)?;
            show(&block_on(admin::pin(&settings, &id, None))??, false)
        }
        Command::Daemon { args } => {
            let mut settings = repo.settings(None)?;
            settings.cap_writes(args.max_rate);
            let opts = args.options(repo, &settings)?;
            block_on(walvault::commands::daemon::serve(settings, opts))??;
            tracing::info!("daemon stopped");
            Ok(())
        }
    };
    shown.map(|()| walvault::exit::SUCCESS)
}

/// Run `f` to completion on a multi-threaded runtime.
fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    Ok(walvault::cli::threads::runtime()?.block_on(f))
}

/// Print the report: as JSON with `--json`, else as text.
fn show(report: &impl Report, json: bool) -> anyhow::Result<()> {
    Ok(walvault::report::emit(report, Format::from_json_flag(json))?)
}
