//! restore-agent: PostgreSQL's restore_command. Thin: flags in, library call, exit code out.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use walvault::cli::{self, RepoArgs};
use walvault::exit;
use walvault::fetch::{self, FetchOutcome};

const AFTER_HELP: &str = "\
In postgresql.conf (or postgresql.auto.conf) of the server being recovered:
    restore_command = 'restore-agent fetch %f %p'

with the repository in WALVAULT_REPO (the server's environment), in /etc/walvault/walvault.toml,
or on the line itself: restore_command = 'restore-agent fetch --repo file:///var/lib/walvault %f %p'

Exit status of fetch: 0 restored (verified), 1 not in the repository (PostgreSQL ends recovery
there), 200 anything else (the repository could not be read, the stored copy is corrupt, a bad
argument or file name, an internal error): recovery stops with FATAL instead of ending early. In
standby mode (standby.signal present) failures exit 1 instead, as PostgreSQL retries there. Other
commands exit 2 on bad arguments.";

/// Restore PostgreSQL WAL from a walvault repository.
#[derive(Debug, Parser)]
#[command(name = "restore-agent", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fetch one WAL file: restore_command = 'restore-agent fetch %f %p'
    #[command(after_help = AFTER_HELP)]
    Fetch {
        /// WAL file name PostgreSQL asks for (%f)
        wal_name: String,
        /// Where to write it (%p)
        dest_path: PathBuf,
        /// Data directory, to detect standby mode (standby.signal) [default: the current directory,
        /// which is the data directory when PostgreSQL runs the command]
        #[arg(long, value_name = "DIR")]
        pgdata: Option<PathBuf>,
        /// Do not start the background prefetcher
        #[arg(long, env = "WALVAULT_NO_PREFETCH")]
        no_prefetch: bool,
    },
    /// Download the next WAL segments ahead of recovery (started by fetch; runs until recovery ends)
    #[command(hide = true)]
    Prefetch {
        #[arg(long, value_name = "DIR")]
        pgdata: PathBuf,
        /// Segments kept ahead of recovery
        #[arg(long, default_value_t = 8)]
        depth: u64,
        /// Downloads at once
        #[arg(long, default_value_t = 4)]
        parallel: usize,
    },
    /// Rebuild a data directory from a base backup, set up to recover to a target
    #[command(group(clap::ArgGroup::new("goal").args(["target_time", "target_lsn", "target_xid", "target_name", "target"])))]
    Restore {
        /// The new data directory (empty, replaced with --force, or rewritten with --delta)
        #[arg(long, value_name = "DIR")]
        pgdata: PathBuf,
        #[command(flatten)]
        goal: TargetArgs,
        /// 'immediate': stop as soon as the backup is consistent
        #[arg(long, value_name = "immediate", value_parser = ["immediate"])]
        target: Option<String>,
        /// What PostgreSQL does at the target: promote, pause or shutdown
        #[arg(long, default_value = "promote", value_parser = ["promote", "pause", "shutdown"])]
        target_action: String,
        /// Backup to restore [default: the newest one consistent before the target]
        #[arg(long, value_name = "ID")]
        backup: Option<String>,
        /// Replace the contents of a non-empty --pgdata
        #[arg(long, conflicts_with = "delta")]
        force: bool,
        /// Restore over an existing data directory (an old primary, a lagging copy) with the
        /// server stopped: only chunks whose content differs are fetched and rewritten; files and
        /// directories the backup does not have are removed (pg_wal contents too)
        #[arg(long)]
        delta: bool,
        /// Chunks fetched and written in parallel [default: 16 for file://, 32 for s3://, az:// and
        /// gs:// (measured)]
        #[arg(long, value_name = "N")]
        parallel: Option<usize>,
        /// Restore tablespace OID into DIR (repeatable)
        #[arg(long, value_name = "OID=DIR")]
        tablespace_map: Vec<String>,
        /// Restore every other tablespace into DIR/<oid>
        #[arg(long, value_name = "DIR")]
        tablespace_map_all: Option<PathBuf>,
        /// Restore every other tablespace to its location on the source
        #[arg(long)]
        tablespace_original: bool,
        /// Print the restore's plan (backup, target, timeline, files, tablespaces, recovery
        /// settings, replay) and write nothing: not even --pgdata is created
        #[arg(long)]
        dry_run: bool,
        /// Print the report (or with --dry-run the plan) as JSON
        #[arg(long)]
        json: bool,
    },
    /// Check that every backup can be restored: manifests and chunks present, WAL continuous from
    /// each backup's start to the end of its timelines, history files and summaries readable;
    /// prints one line per problem (the object, and what depends on it), the restorable windows
    /// and a summary. Read-only: runs with read-only credentials. Exit status 0 when everything
    /// restorable is intact, 1 when something is at risk or the repository could not be read.
    Verify {
        /// Also read every WAL file, summary and chunk, decompress it and check its hashes
        #[arg(long)]
        deep: bool,
        /// Objects read at once with --deep
        #[arg(long, default_value_t = 4, value_name = "N")]
        parallel: usize,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// List the destructive transactions in the archived WAL, newest first: DROP, TRUNCATE (or
    /// a rewrite), DROP DATABASE, and DELETE or UPDATE of many rows of one table. Each comes
    /// with the restore command that recovers the moment just before it. Tables are named from
    /// the relation map of the newest backup before the event; relations created after it show
    /// by file number.
    Find {
        /// Only events at or after this time ('YYYY-MM-DD HH:MM:SS[+TZ]', UTC without a zone)
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only events at or before this time
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Only events touching this table (name or schema.name)
        #[arg(long, value_name = "TABLE")]
        table: Option<String>,
        /// Rows of one table a DELETE or UPDATE transaction must change to be listed (100 or more)
        #[arg(long, default_value_t = 1000, value_name = "N")]
        min_rows: u64,
        /// Data directory to put in the printed restore commands
        #[arg(long, value_name = "DIR", default_value = "NEW_PGDATA")]
        pgdata: PathBuf,
        /// Print the events as JSON
        #[arg(long)]
        json: bool,
    },
    /// Restore drill: restore into a scratch directory, start PostgreSQL there (private socket,
    /// archiving off), wait until recovery reaches the target and the server answers, run the
    /// checks, stop it and remove the directory. Reports RTO (start until the server answered)
    /// and RPO (now minus the newest restorable commit) against their targets. Exit status 0
    /// only when every check passed and every target was met.
    #[command(group(clap::ArgGroup::new("goal").args(["target_time", "target_lsn", "target_xid", "target_name", "target"])))]
    Drill {
        /// latest (everything archived, the default), random (an instant inside the restorable
        /// window), or immediate
        #[arg(long, value_name = "WHAT", value_parser = ["latest", "random", "immediate"])]
        target: Option<String>,
        #[command(flatten)]
        goal: TargetArgs,
        /// Directory with the backup's PostgreSQL version's postgres and pg_ctl [default:
        /// /usr/lib/postgresql/<version>/bin, /usr/pgsql-<version>/bin, or pg_config --bindir]
        #[arg(long, value_name = "DIR")]
        pg_bin: Option<PathBuf>,
        /// Where to make the scratch directory [default: the temp dir]
        #[arg(long, value_name = "DIR")]
        scratch: Option<PathBuf>,
        /// OS user to run PostgreSQL as when the drill runs as root
        #[arg(long, value_name = "USER", default_value = "postgres")]
        run_as: String,
        /// Database role the checks connect as [default: the OS user PostgreSQL runs as]
        #[arg(long, value_name = "ROLE")]
        pg_user: Option<String>,
        /// File of SQL queries separated by ';', each of which must return true (repeatable)
        #[arg(long, value_name = "FILE")]
        check_sql: Vec<PathBuf>,
        /// Database the --check-sql queries run in
        #[arg(long, value_name = "DB", default_value = "postgres")]
        check_db: String,
        /// Also check every B-tree index (and from PostgreSQL 14 every table) with amcheck
        #[arg(long)]
        amcheck: bool,
        /// Recovery time objective, like 15m: the drill fails when restore and recovery take longer
        #[arg(long, value_name = "DURATION")]
        rto_target: Option<String>,
        /// Recovery point objective, like 5m: the drill fails when the newest restorable commit is older
        #[arg(long, value_name = "DURATION")]
        rpo_target: Option<String>,
        /// Longest wait for recovery
        #[arg(long, value_name = "DURATION", default_value = "6h")]
        timeout: String,
        /// Chunks fetched and written in parallel
        #[arg(long, default_value_t = 4, value_name = "N")]
        parallel: usize,
        /// Write the evidence as JSON to FILE ('-' for standard output)
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Keep the scratch directory afterwards
        #[arg(long)]
        keep: bool,
    },
    /// How far the recovery of a data directory restored by `restore-agent restore` has got:
    /// segment n of the segments up to the target, the commit time reached, an ETA; or that it
    /// finished. Reads only the data directory. Exit status 1 when it holds no walvault recovery.
    Status {
        /// The restored data directory
        #[arg(long, value_name = "DIR")]
        pgdata: PathBuf,
        /// Print the status as JSON
        #[arg(long)]
        json: bool,
    },
    /// List backups, timelines and archived WAL
    List,
    /// Describe the repository (backups, timelines, WAL coverage); --json for machines
    Info {
        #[arg(long)]
        json: bool,
    },
}

/// The recovery targets restore and drill share.
#[derive(Debug, clap::Args)]
struct TargetArgs {
    /// Recover to this time: 'YYYY-MM-DD HH:MM:SS[.ffffff][+TZ]' (UTC when no zone is given)
    #[arg(long, value_name = "TIME")]
    target_time: Option<String>,
    /// Recover to this LSN (like 0/16B3748)
    #[arg(long, value_name = "LSN")]
    target_lsn: Option<String>,
    /// Recover to the commit of this transaction id
    #[arg(long, value_name = "XID")]
    target_xid: Option<u64>,
    /// Recover to this restore point (pg_create_restore_point)
    #[arg(long, value_name = "NAME")]
    target_name: Option<String>,
    /// Timeline to follow: latest, current, or a timeline id
    #[arg(long, default_value = "latest", value_name = "TIMELINE")]
    target_timeline: String,
    /// Stop just before the target rather than just after it
    #[arg(long)]
    target_exclusive: bool,
}

impl TargetArgs {
    /// The target named by a --target-* flag, if one is.
    fn target(&self) -> anyhow::Result<Option<walvault::restore::RecoveryTarget>> {
        use walvault::restore::RecoveryTarget;
        Ok(Some(match self {
            TargetArgs {
                target_time: Some(t), ..
            } => RecoveryTarget::Time(walvault::time::parse_time(t)?),
            TargetArgs {
                target_lsn: Some(l), ..
            } => RecoveryTarget::Lsn(l.parse()?),
            TargetArgs {
                target_xid: Some(x), ..
            } => RecoveryTarget::Xid(*x),
            TargetArgs {
                target_name: Some(n), ..
            } => RecoveryTarget::Name(n.clone()),
            _ => return Ok(None),
        }))
    }
}

fn main() -> ExitCode {
    // As restore_command, a bad command line must not read as "file not found": PostgreSQL
    // would end recovery there and promote (it runs the command in the data directory).
    let usage_code = match invoked_as_fetch() {
        true => exit::fetch_failure(exit::in_standby_mode(std::path::Path::new("."))),
        false => exit::USAGE,
    };
    let cli: Cli = cli::parse_or_exit_with("restore-agent", usage_code);
    cli::init_logging();
    match cli.command {
        Command::Fetch {
            wal_name,
            dest_path,
            pgdata,
            no_prefetch,
        } => ExitCode::from(fetch(&cli.repo, &wal_name, &dest_path, pgdata, no_prefetch)),
        Command::Prefetch {
            pgdata,
            depth,
            parallel,
        } => report(prefetch(&cli.repo, &pgdata, depth, parallel)),
        Command::Verify { deep, parallel, json } => match verify(&cli.repo, deep, parallel, json) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                tracing::error!("verify failed: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Find {
            since,
            until,
            table,
            min_rows,
            pgdata,
            json,
        } => report(find(&cli.repo, since, until, table, min_rows, &pgdata, json)),
        drill @ Command::Drill { .. } => match run_drill(&cli.repo, drill) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(exit::USAGE)
            }
        },
        Command::Status { pgdata, json } => report(status(&pgdata, json)),
        Command::List => report(info(&cli.repo, false)),
        Command::Info { json } => report(info(&cli.repo, json)),
        restore @ Command::Restore { .. } => report(run_restore(&cli.repo, restore)),
    }
}

fn prefetch(repo: &RepoArgs, pgdata: &std::path::Path, depth: u64, parallel: usize) -> anyhow::Result<()> {
    let settings = repo.settings(None)?;
    let opts = walvault::prefetch::PrefetchOptions {
        depth,
        parallel,
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(walvault::prefetch::run(&settings, pgdata, &opts))?;
    Ok(())
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run_restore(repo: &RepoArgs, cmd: Command) -> anyhow::Result<()> {
    use walvault::report::{Format, emit};
    use walvault::restore::{RecoveryTarget, RestoreOptions, TargetAction};
    let Command::Restore {
        pgdata,
        goal,
        target,
        target_action,
        backup,
        force,
        delta,
        parallel,
        tablespace_map,
        tablespace_map_all,
        tablespace_original,
        dry_run,
        json,
    } = cmd
    else {
        unreachable!("called for restore only")
    };
    let settings = repo.settings(None)?;
    let target = match (goal.target()?, target) {
        (Some(t), _) => t,
        (None, Some(_)) => RecoveryTarget::Immediate,
        (None, None) => RecoveryTarget::End,
    };
    let timeline = parse_timeline(&goal.target_timeline)?;
    let action = match target_action.as_str() {
        "pause" => TargetAction::Pause,
        "shutdown" => TargetAction::Shutdown,
        _ => TargetAction::Promote,
    };
    let restore_command = walvault::restore::restore_command_line(
        &std::env::current_exe()?,
        &settings,
        repo.config.as_deref(),
        repo.retry_timeout.as_deref(),
    )?;
    let mut tablespaces = walvault::restore::TablespacePlan {
        all_under: tablespace_map_all,
        original: tablespace_original,
        ..Default::default()
    };
    for m in tablespace_map {
        let (oid, dir) = m
            .split_once('=')
            .and_then(|(o, d)| Some((o.parse::<u32>().ok()?, PathBuf::from(d))))
            .ok_or_else(|| anyhow::anyhow!("--tablespace-map {m:?}: expected OID=DIR"))?;
        tablespaces.map.insert(oid, dir);
    }
    let opts = RestoreOptions {
        tablespaces,
        pgdata,
        backup: backup.map(|b| b.parse()).transpose()?,
        target,
        timeline,
        action,
        exclusive: goal.target_exclusive,
        force,
        delta,
        parallel: parallel.unwrap_or_else(|| walvault::restore::default_parallel(&settings.repo.location())),
        restore_command,
    };
    let rt = tokio::runtime::Runtime::new()?;
    if dry_run {
        let plan = rt.block_on(walvault::restore::plan(&settings, &opts))?;
        emit(&plan, Format::from_json_flag(json))?;
        return Ok(());
    }
    let progress: std::sync::Arc<dyn walvault::restore::Progress> = if std::io::stderr().is_terminal() {
        std::sync::Arc::new(Bar(indicatif::ProgressBar::new(0)))
    } else {
        std::sync::Arc::new(walvault::restore::NoProgress)
    };
    let r = rt.block_on(walvault::restore::restore(&settings, &opts, progress.clone()));
    drop(progress);
    emit(&r?, Format::from_json_flag(json))?;
    Ok(())
}

fn status(pgdata: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let status = walvault::progress::files::status(pgdata, walvault::time::now_micros())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status.to_json())?);
    } else {
        println!("{}", status.render());
    }
    Ok(())
}

/// Restore points a restore can reach on timeline `t`. A name used more than once is marked:
/// `--target-name` stops at the first one replay meets.
fn restore_points_json(cat: &walvault::catalog::Catalog, t: u32) -> Vec<serde_json::Value> {
    let points = cat.reachable_restore_points(t);
    let mut uses = std::collections::HashMap::new();
    for (name, _, _) in &points {
        *uses.entry(name.clone()).or_insert(0u32) += 1;
    }
    points
        .into_iter()
        .map(|(name, lsn, time)| {
            serde_json::json!({
                "name_reused": uses.get(&name).is_some_and(|&n| n > 1),
                "name": name,
                "lsn": lsn.to_string(),
                "time": time.map(walvault::time::format_micros),
            })
        })
        .collect()
}

/// Run a drill; `Ok(false)` when it failed (the evidence says why).
fn run_drill(repo: &RepoArgs, cmd: Command) -> anyhow::Result<bool> {
    use walvault::config::parse_duration;
    use walvault::drill::{DrillOptions, DrillTarget};
    use walvault::restore::RecoveryTarget;
    let Command::Drill {
        target,
        goal,
        pg_bin,
        scratch,
        run_as,
        pg_user,
        check_sql,
        check_db,
        amcheck,
        rto_target,
        rpo_target,
        timeout,
        parallel,
        json,
        keep,
    } = cmd
    else {
        unreachable!("called for drill only")
    };
    let settings = repo.settings(None)?;
    let target = match (goal.target()?, target.as_deref()) {
        (Some(t), _) => DrillTarget::Target(t),
        (None, Some("random")) => DrillTarget::Random,
        (None, Some("immediate")) => DrillTarget::Target(RecoveryTarget::Immediate),
        _ => DrillTarget::Latest,
    };
    let opts = DrillOptions {
        target,
        timeline: parse_timeline(&goal.target_timeline)?,
        exclusive: goal.target_exclusive,
        pg_bin,
        scratch,
        run_as: Some(run_as),
        pg_user,
        check_sql: walvault::drill::check_sql_files(&check_sql)
            .map_err(|e| anyhow::anyhow!("--check-sql {e}"))?,
        check_db,
        amcheck,
        rto_target: rto_target.as_deref().map(parse_duration).transpose()?,
        rpo_target: rpo_target.as_deref().map(parse_duration).transpose()?,
        timeout: parse_duration(&timeout)?,
        parallel,
        restore_command: walvault::restore::restore_command_line(
            &std::env::current_exe()?,
            &settings,
            repo.config.as_deref(),
            repo.retry_timeout.as_deref(),
        )?,
        keep,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let evidence = rt.block_on(walvault::drill::run(&settings, &opts));
    let doc = serde_json::to_string_pretty(&evidence)?;
    match json.as_deref() {
        Some(p) if p == std::path::Path::new("-") => println!("{doc}"),
        Some(p) => {
            walvault::fsutil::write_durably(p, doc.as_bytes())
                .map_err(|e| anyhow::anyhow!("--json {}: {e}", p.display()))?;
            print!("{}", evidence.summary());
        }
        None => print!("{}", evidence.summary()),
    }
    Ok(evidence.passed())
}

fn parse_timeline(s: &str) -> anyhow::Result<walvault::restore::TimelineTarget> {
    use walvault::restore::TimelineTarget;
    Ok(match s {
        "latest" => TimelineTarget::Latest,
        "current" => TimelineTarget::Current,
        n => {
            TimelineTarget::Id(n.parse().map_err(|_| {
                anyhow::anyhow!("--target-timeline {n:?}: use latest, current or a timeline id")
            })?)
        }
    })
}

fn find(
    repo: &RepoArgs,
    since: Option<String>,
    until: Option<String>,
    table: Option<String>,
    min_rows: u64,
    pgdata: &std::path::Path,
    json: bool,
) -> anyhow::Result<()> {
    let settings = repo.settings(None)?;
    let opts = walvault::find::FindOptions {
        since: since.as_deref().map(walvault::time::parse_time).transpose()?,
        until: until.as_deref().map(walvault::time::parse_time).transpose()?,
        table,
        min_rows,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let found = rt.block_on(async {
        let repo = walvault::repo::Reader::open(&settings.repo, &settings.store_options()).await?;
        anyhow::Ok(walvault::find::find(&repo, &opts).await?)
    })?;
    // The command as this one was invoked, so it runs where this one did.
    let program = std::env::args().next().unwrap_or_else(|| "restore-agent".into());
    let mut prefix = format!(
        "{} --repo {}",
        walvault::cli::sh_quote(&program),
        walvault::cli::sh_quote(settings.repo.as_str())
    );
    if let Some(config) = &repo.config {
        prefix.push_str(&format!(
            " --config {}",
            walvault::cli::sh_quote(&std::path::absolute(config)?.display().to_string())
        ));
    }
    let command = |e: &walvault::find::FoundEvent| {
        e.restorable.then(|| {
            let args: Vec<String> = e
                .restore_args
                .iter()
                .map(|a| walvault::cli::sh_quote(a))
                .collect();
            format!(
                "{prefix} restore --pgdata {} {}",
                walvault::cli::sh_quote(&pgdata.display().to_string()),
                args.join(" ")
            )
        })
    };
    if json {
        let events: Vec<serde_json::Value> = found
            .events
            .iter()
            .map(|e| {
                let mut v = serde_json::to_value(e).expect("an event serializes");
                v["restore_command"] = command(e).into();
                v
            })
            .collect();
        let doc = serde_json::json!({
            "events": events,
            "segments_not_searched": found.segments_not_searched,
            "segments_without_summary": found.segments_without_summary,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    if found.events.is_empty() {
        println!("no destructive transactions found in the archived WAL");
    }
    for e in &found.events {
        println!(
            "{}  xid {}  {}  (commit at {}, timeline {})",
            e.time,
            e.xid,
            e.database.as_deref().unwrap_or("database unknown"),
            e.lsn,
            e.timeline
        );
        for a in &e.actions {
            println!("    {}", a.describe());
        }
        for n in &e.notes {
            println!("    note: {n}");
        }
        match command(e) {
            Some(c) => println!("    restore just before it:  {c}"),
            None => println!("    not restorable: no backup of this timeline was taken before it"),
        }
        println!();
    }
    if found.segments_not_searched > 0 {
        println!(
            "{} segments were indexed by an older walvault, which did not record these events: they were not searched",
            found.segments_not_searched
        );
    }
    if found.segments_without_summary > 0 {
        println!(
            "{} archived segments have no time index summary: they were not searched",
            found.segments_without_summary
        );
    }
    Ok(())
}

/// Run verify; `Ok(false)` when something restorable is at risk.
fn verify(repo: &RepoArgs, deep: bool, parallel: usize, json: bool) -> anyhow::Result<bool> {
    let settings = repo.settings(None)?;
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(async {
        let repo = walvault::repo::Reader::open(&settings.repo, &settings.store_options()).await?;
        anyhow::Ok(walvault::verify::verify(&repo, deep, parallel).await?)
    })?;
    if json {
        let mut doc = serde_json::to_value(&report)?;
        doc["at_risk"] = report.at_risk().into();
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("{}", report.render());
    }
    Ok(!report.at_risk())
}

fn info(repo: &RepoArgs, json: bool) -> anyhow::Result<()> {
    use walvault::catalog::{BackupInfo, Catalog};
    let settings = repo.settings(None)?;
    let rt = tokio::runtime::Runtime::new()?;
    let (cat, encryption, drills) = rt.block_on(async {
        let repo = walvault::repo::Reader::open(&settings.repo, &settings.store_options()).await?;
        let encryption = repo.descriptor().encryption.as_ref().map(|e| {
            serde_json::json!({
                "cipher": e.cipher,
                "chunk_ids": e.chunk_ids,
                "key": e.key.kdf,
                "wrapped_at": e.wrapped_at,
            })
        });
        let drills = walvault::drill::recent(&repo, 5).await?;
        anyhow::Ok((Catalog::load(&repo).await?, encryption, drills))
    })?;
    let backups: Vec<BackupInfo> = cat
        .backups
        .iter()
        .map(|m| BackupInfo {
            pinned: cat.pinned.contains(&m.id),
            ..BackupInfo::from(m)
        })
        .collect();
    let timelines: Vec<serde_json::Value> = cat
        .timeline_ids()
        .into_iter()
        .map(|t| {
            let h = cat.timelines.history(t);
            serde_json::json!({
                "timeline": t,
                "parent": h.parent().map(|p| p.timeline),
                "switch_lsn": h.parent().map(|p| p.switch_lsn.to_string()),
                "reason": h.parent().map(|p| p.reason.clone()),
                "wal": cat.ranges(t),
                "restorable": cat.window(t).map(|w| serde_json::json!({
                    "earliest": walvault::time::format_micros(w.earliest),
                    "latest_before": w.latest.map(walvault::time::format_micros),
                    "end_lsn": w.end_lsn.to_string(),
                })),
                "restore_points": restore_points_json(&cat, t),
            })
        })
        .collect();
    if json {
        let doc = serde_json::json!({
            "repository": settings.repo.to_string(),
            "repository_id": cat.repo_id,
            "cluster": cat.cluster,
            "encryption": encryption,
            "backups": backups,
            "timelines": timelines,
            "damaged": cat.damaged,
            "drills": drills,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    match &cat.cluster {
        Some(c) => println!("repository {} ({c}), id {}", settings.repo, cat.repo_id),
        None => println!(
            "repository {}, id {}: no WAL archived yet",
            settings.repo, cat.repo_id
        ),
    }
    if let Some(e) = &encryption {
        println!(
            "encrypted: {}, keyed chunk ids, key {} (wrapped {})",
            e["cipher"].as_str().unwrap_or("?"),
            e["key"].as_str().unwrap_or("?"),
            e["wrapped_at"].as_str().unwrap_or("at init")
        );
    }
    println!();
    println!(
        "{:<18} {:>3}  {:<22}  {:<22}  {:>12}  {:>12}  {:>12}  pin",
        "backup", "tli", "start", "stop (consistent)", "size", "stored", "new"
    );
    for b in &backups {
        println!(
            "{:<18} {:>3}  {:<22}  {:<22}  {:>12}  {:>12}  {:>12}  {}",
            b.id,
            b.timeline,
            b.start_time,
            b.stop_time,
            human(b.logical_bytes),
            human(b.stored_bytes),
            human(b.new_bytes),
            if b.pinned { "pinned" } else { "" }
        );
    }
    println!();
    println!(
        "{:<4} {:<7} {:<12}  {:<24}  {:<34}  wal",
        "tli", "parent", "switch lsn", "restorable from", "to just before"
    );
    for t in &timelines {
        let ranges: Vec<String> = t["wal"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        format!(
                            "{}..{}",
                            r["first"].as_str().unwrap_or(""),
                            r["last"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let gaps = if ranges.len() > 1 {
            format!("  ({} gaps)", ranges.len() - 1)
        } else {
            String::new()
        };
        println!(
            "{:<4} {:<7} {:<12}  {:<24}  {:<34}  {}{gaps}",
            t["timeline"].as_u64().unwrap_or(0),
            t["parent"].as_u64().map_or("-".into(), |p| p.to_string()),
            t["switch_lsn"].as_str().unwrap_or("-"),
            t["restorable"]["earliest"].as_str().unwrap_or("-"),
            t["restorable"]["latest_before"].as_str().unwrap_or("-"),
            if ranges.is_empty() {
                "none".to_string()
            } else {
                ranges.join(", ")
            }
        );
    }
    for d in &cat.damaged {
        println!("DAMAGED {} ({}), left out: {}", d.what, d.key, d.reason);
    }
    if !drills.is_empty() {
        println!();
        println!(
            "{:<18} {:<7} {:>9} {:>9}  {:<18}  target",
            "drill", "outcome", "rto", "rpo", "backup"
        );
        let secs = |o: &walvault::drill::Objective| {
            o.measured_seconds.map_or("-".to_string(), |s| {
                format!("{s:.1}s{}", if o.met { "" } else { "!" })
            })
        };
        for d in &drills {
            println!(
                "{:<18} {:<7} {:>9} {:>9}  {:<18}  {}{}",
                d.id,
                d.outcome,
                secs(&d.rto),
                secs(&d.rpo),
                d.backup.as_deref().unwrap_or("-"),
                d.target_time.as_deref().unwrap_or(&d.target),
                d.failure
                    .as_ref()
                    .map_or(String::new(), |f| format!("  FAILED: {f}"))
            );
        }
    }
    for t in &timelines {
        for rp in t["restore_points"].as_array().into_iter().flatten() {
            println!(
                "restore point {:?} on timeline {} at {} ({}){}",
                rp["name"].as_str().unwrap_or(""),
                t["timeline"].as_u64().unwrap_or(0),
                rp["time"].as_str().unwrap_or("-"),
                rp["lsn"].as_str().unwrap_or("-"),
                if rp["name_reused"].as_bool() == Some(true) {
                    "  (name used again: --target-name stops at the first)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

/// A progress bar on stderr, shown only on a terminal.
struct Bar(indicatif::ProgressBar);

impl walvault::restore::Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
        self.0.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// Tell the prefetcher where recovery is, starting it if none runs. Best effort: prefetching
/// only saves time, so a failure here is logged and never fails the fetch.
fn start_prefetch(
    repo: &RepoArgs,
    p: &walvault::prefetch::Prefetch,
    pgdata: &std::path::Path,
    name: &walvault::wal::WalFileName,
) {
    if let Err(e) = p.request(name) {
        tracing::warn!("prefetch: {e}");
        return;
    }
    if p.running() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut cmd = std::process::Command::new(exe);
    if let Some(r) = &repo.repo {
        cmd.args(["--repo", r]);
    }
    if let Some(c) = &repo.config {
        cmd.arg("--config").arg(c);
    }
    if let Some(t) = &repo.retry_timeout {
        cmd.args(["--retry-timeout", t]);
    }
    cmd.arg("prefetch").arg("--pgdata").arg(pgdata);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // Its own process group: signals PostgreSQL sends to the startup process's group when
    // recovery ends must not kill it before it removes its spool.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    if let Err(e) = cmd.spawn() {
        tracing::warn!("prefetch: cannot start: {e}");
    }
}

/// Whether the command line asks for `fetch` (the first word that is not an option).
fn invoked_as_fetch() -> bool {
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy();
        match arg.as_ref() {
            // Global options that take a value as the next word.
            "--repo" | "--config" | "--retry-timeout" => {
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

fn fetch(
    repo: &RepoArgs,
    name: &str,
    dest: &std::path::Path,
    pgdata: Option<PathBuf>,
    no_prefetch: bool,
) -> u8 {
    let started = Instant::now();
    let pgdata = pgdata.unwrap_or_else(|| PathBuf::from("."));
    let standby = exit::in_standby_mode(&pgdata);
    exit_on_panic(standby);
    // Prefetch only while the data directory is recovering (the way PostgreSQL runs fetch).
    let prefetch =
        Some(walvault::prefetch::Prefetch::new(&pgdata)).filter(|p| !no_prefetch && p.in_recovery());
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
        Err(e) => {
            return fail(
                e.to_string(),
                if standby {
                    exit::NOT_FOUND_OR_RETRY
                } else {
                    exit::FATAL
                },
            );
        }
    };
    // Restored by walvault: each segment is counted against the plan and logged.
    let plan = walvault::progress::files::plan_for_fetch(&pgdata);
    let fetched = fetch::fetch_for_replay(&settings, name, dest, prefetch.as_ref(), plan.is_some());
    let result = match cli::run_call(fetched) {
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
            if let (Some(plan), walvault::wal::WalFileName::Segment(seg)) = (&plan, name) {
                let now = walvault::time::now_micros();
                if let Some(p) =
                    walvault::progress::files::record_fetch(&pgdata, plan, &seg, latest_commit, now)
                {
                    tracing::info!("{}", p.line());
                }
            }
            if let (Some(p), walvault::wal::WalFileName::Segment(_)) = (&prefetch, name) {
                start_prefetch(repo, p, &pgdata, &name);
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
