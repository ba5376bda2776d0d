//! archive-agent: PostgreSQL's archive_command. Thin: flags in, library call, exit code out.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use walvault::archive::{self, PushOutcome};
use walvault::backup::take::{BackupOptions, DEFAULT_CHUNK_SIZE, FileReading, take_backup_reading};
use walvault::cli::{self, RepoArgs};
use walvault::exit;
use walvault::repo::keys::KeySource;

/// mimalloc returns freed segment-sized buffers to the system; with glibc's allocator the daemon's
/// resident size kept growing with the 16 MiB buffers of parallel uploads (233 MiB peak measured
/// with 2 uploads at once).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The long-running daemon keeps its resident size to the uploads in flight: mimalloc's arenas
/// are committed as used rather than up front (`MIMALLOC_ARENA_EAGER_COMMIT=0`) and freed memory
/// goes back to the system at once (`MIMALLOC_PURGE_DELAY=0`). mimalloc reads these when the
/// process starts, before `main`, so the daemon runs itself again once with them set (measured
/// peak with two parallel uploads on file://: 26 to 31 MiB with them, 54 to 63 MiB without).
/// Settings already in the environment are left as they are; if the exec fails, the daemon
/// carries on with the defaults.
fn rerun_with_daemon_allocator_settings() {
    use std::os::unix::process::CommandExt;
    const SETTINGS: [(&str, &str); 2] = [
        ("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
        ("MIMALLOC_PURGE_DELAY", "0"),
    ];
    if SETTINGS.iter().any(|(k, _)| std::env::var_os(k).is_some()) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let err = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .envs(SETTINGS)
        .exec();
    eprintln!("archive-agent: cannot run itself again with its allocator settings ({err}); carrying on");
}

const AFTER_HELP: &str = "\
In postgresql.conf:
    archive_mode = on
    archive_command = 'archive-agent push %p'

with the repository in WALVAULT_REPO (the server's environment), in /etc/walvault/walvault.toml,
or on the line itself: archive_command = 'archive-agent push --repo file:///var/lib/walvault %p'

Exit status: 0 archived (or already archived with identical content), 1 failed (PostgreSQL
retries), 2 bad arguments or file name, 3 refused (conflicting content, another cluster's WAL,
invalid WAL: needs a human). Never above 125, which would stop PostgreSQL's archiver.";

/// Archive PostgreSQL WAL to a walvault repository.
#[derive(Debug, Parser)]
#[command(name = "archive-agent", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the repository (once, before archive_command is set): a new walvault.json with a
    /// random repository id. push, backup and daemon never create one, so a backup volume that is
    /// not mounted or a mistyped bucket prefix fails loudly instead of growing a new, empty
    /// repository. Refuses when a repository exists there already.
    Init {
        /// The data directory of the cluster whose WAL the repository will hold: its identity
        /// (system identifier, segment and block size, version) is read from the WAL in pg_wal
        /// and recorded, so that no other cluster's WAL is ever accepted. Without it, the first
        /// segment archived binds the repository.
        #[arg(long, env = "PGDATA", value_name = "DIR")]
        pgdata: Option<PathBuf>,
        /// Encrypt everything stored (XChaCha20-Poly1305 under a random master key, wrapped by
        /// the key from key_file or key_command in the [encryption] table, or from
        /// WALVAULT_ENCRYPTION_KEY_FILE / WALVAULT_ENCRYPTION_KEY_COMMAND). Every later command
        /// needs that key; without it the repository cannot be read by anyone, you included.
        #[arg(long)]
        encrypt: bool,
        /// Print the repository's id and URL as JSON
        #[arg(long)]
        json: bool,
    },
    /// Rotate an encrypted repository's key: the master key is wrapped again under the new key
    /// (nothing else is rewritten), and the old key no longer opens the repository. Opens it with
    /// the current key source, then point the configuration at the new one.
    Rekey {
        /// A file holding the new key (64 hex digits: openssl rand -hex 32) or passphrase
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "new_key_command",
            required_unless_present = "new_key_command"
        )]
        new_key_file: Option<PathBuf>,
        /// A shell command printing the new key or passphrase (Vault, a KMS CLI)
        #[arg(long, value_name = "COMMAND")]
        new_key_command: Option<String>,
    },
    /// Archive one WAL file: archive_command = 'archive-agent push %p'
    #[command(after_help = AFTER_HELP)]
    Push {
        /// Path of the file to archive (%p); its last component is the WAL file name
        wal_path: PathBuf,
        /// zstd level, 1 (fastest) to 19 (smallest) [default: 3]
        #[arg(long, env = "WALVAULT_COMPRESS_LEVEL", value_name = "LEVEL")]
        compress_level: Option<i32>,
    },
    /// Take an online base backup of the cluster in --pgdata into the repository
    Backup {
        /// The data directory of the running cluster (read directly from disk)
        #[arg(long, env = "PGDATA", value_name = "DIR")]
        pgdata: PathBuf,
        /// Connection to that cluster, libpq style or URL [default: from PGHOST, PGPORT, PGUSER,
        /// else host=/var/run/postgresql port=5432 user=postgres]
        #[arg(long, env = "WALVAULT_PG_URL", value_name = "CONN")]
        pg_url: Option<String>,
        /// zstd level for the chunks [default: 3]
        #[arg(long, env = "WALVAULT_COMPRESS_LEVEL", value_name = "LEVEL")]
        compress_level: Option<i32>,
        /// Chunks compressed and uploaded in parallel (memory: this many chunks)
        #[arg(long, default_value_t = 4, value_name = "N")]
        parallel: usize,
        /// How long to wait for the backup's WAL to be archived
        #[arg(long, default_value = "5m", value_name = "DURATION")]
        wal_timeout: String,
        /// When --pgdata/--pg-url are a streaming standby: a connection to its primary, used only
        /// to switch WAL there so the backup's last segment is archived at once (without it,
        /// the backup waits for the primary's archive_timeout or traffic)
        #[arg(long, env = "WALVAULT_PRIMARY_URL", value_name = "CONN")]
        primary_url: Option<String>,
        /// Read every file, even those unchanged since the previous backup (by size, mtime,
        /// ctime, inode and device), and make sure every chunk is in the repository, uploading
        /// any that is missing. Without it, unchanged files are taken over from the previous
        /// backup unread: see README, "Base backups".
        #[arg(long)]
        read_all: bool,
        /// Print the manifest summary as JSON
        #[arg(long)]
        json: bool,
    },
    /// Delete the backups no retention rule keeps, and the WAL, history files, time index
    /// summaries and chunks nothing kept needs. Rules come from the [retention] table of the
    /// TOML file, or from these flags (which then replace the table's rules). Says what it kept,
    /// by which rule, and what it deleted. Safe while backups run: chunks are only collected when
    /// no backup is in progress.
    Expire {
        #[command(flatten)]
        rules: walvault::cli::RetentionArgs,
        /// Show what would be kept and deleted, and delete nothing
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Pin a backup: no expire deletes it (nor the WAL to its consistency point) until unpinned
    Pin {
        /// The backup id (restore-agent list)
        id: String,
        /// Why it is kept (shown by restore-agent info)
        #[arg(long, value_name = "TEXT")]
        note: Option<String>,
    },
    /// Remove a backup's pin: the next expire applies the policy to it
    Unpin {
        /// The backup id
        id: String,
    },
    /// Run beside PostgreSQL: upload .ready WAL files ahead of the archiver, in parallel, so that
    /// archive_command = 'archive-agent push %p' answers at once; optionally take scheduled
    /// backups and force WAL switches on an idle cluster. Stops cleanly on SIGTERM or SIGINT.
    Daemon {
        /// The data directory of the cluster to serve
        #[arg(long, env = "PGDATA", value_name = "DIR")]
        pgdata: PathBuf,
        /// Uploads at once; each holds about 40 MiB (a 16 MiB segment and its compressed copy)
        /// [default: the number of CPUs, at most 4]
        #[arg(long, value_name = "N")]
        parallel: Option<usize>,
        /// Rescan pg_wal/archive_status at least this often, whatever the file watcher reports
        #[arg(long, default_value = "10s", value_name = "DURATION")]
        rescan_every: String,
        /// Connection to the cluster, for --backup-every and --max-wal-age
        #[arg(long, env = "WALVAULT_PG_URL", value_name = "CONN")]
        pg_url: Option<String>,
        /// Take a base backup this often (e.g. 24h)
        #[arg(long, value_name = "DURATION")]
        backup_every: Option<String>,
        /// Force a WAL switch when nothing was archived for this long but WAL was written (e.g. 5m)
        #[arg(long, value_name = "DURATION")]
        max_wal_age: Option<String>,
        /// Serve Prometheus metrics on http://ADDR/metrics and a probe on /health
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Run restore-agent's verify (listing-based) this often (e.g. 24h); results in the log
        /// and the walvault_last_verify_* metrics
        #[arg(long, value_name = "DURATION")]
        verify_every: Option<String>,
        /// Expire after each scheduled backup with these rules (or the [retention] table's)
        #[command(flatten)]
        rules: walvault::cli::RetentionArgs,
        /// Restore drills on a schedule (evidence stored in the repository)
        #[command(flatten)]
        drill: Box<DrillArgs>,
    },
}

fn main() -> ExitCode {
    let cli: Cli = cli::parse_or_exit("archive-agent");
    if matches!(cli.command, Command::Daemon { .. }) {
        rerun_with_daemon_allocator_settings();
    }
    cli::init_logging();
    match cli.command {
        Command::Push {
            wal_path,
            compress_level,
        } => ExitCode::from(push(&cli.repo, &wal_path, compress_level)),
        Command::Daemon {
            pgdata,
            parallel,
            rescan_every,
            pg_url,
            backup_every,
            max_wal_age,
            metrics_addr,
            verify_every,
            rules,
            drill,
        } => match daemon(
            &cli.repo,
            pgdata,
            parallel,
            &rescan_every,
            pg_url,
            (backup_every, verify_every),
            max_wal_age,
            metrics_addr,
            &rules,
            drill,
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("daemon failed: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Expire { rules, dry_run, json } => match expire(&cli.repo, &rules, dry_run, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("expire failed: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Pin { id, note } => match pin(&cli.repo, &id, Some(note)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("pin failed: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Unpin { id } => match pin(&cli.repo, &id, None) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("unpin failed: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Init {
            pgdata,
            encrypt,
            json,
        } => match init(&cli.repo, pgdata, encrypt, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("init failed: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Rekey {
            new_key_file,
            new_key_command,
        } => {
            let new_key = match (new_key_file, new_key_command) {
                (Some(f), _) => KeySource::File(f),
                (None, Some(c)) => KeySource::Command(c),
                (None, None) => unreachable!("clap requires one"),
            };
            match rekey(&cli.repo, &new_key) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("rekey failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Backup {
            pgdata,
            pg_url,
            compress_level,
            parallel,
            wal_timeout,
            primary_url,
            read_all,
            json,
        } => {
            let reading = if read_all {
                FileReading::All
            } else {
                FileReading::Changed
            };
            match backup(
                &cli.repo,
                pgdata,
                pg_url,
                primary_url,
                compress_level,
                parallel,
                &wal_timeout,
                reading,
                json,
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("backup failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn daemon(
    repo: &RepoArgs,
    pgdata: PathBuf,
    parallel: Option<usize>,
    rescan_every: &str,
    pg_url: Option<String>,
    (backup_every, verify_every): (Option<String>, Option<String>),
    max_wal_age: Option<String>,
    metrics_addr: Option<std::net::SocketAddr>,
    rules: &walvault::cli::RetentionArgs,
    drill: Box<DrillArgs>,
) -> anyhow::Result<()> {
    use walvault::config::parse_duration;
    let settings = repo.settings(None)?;
    let drill_every = drill.drill_every.as_deref().map(parse_duration).transpose()?;
    let drill = match drill_every {
        Some(_) => Some(drill.options(repo, &settings)?),
        None => None,
    };
    let retention = Some(settings.retention.policy(&rules.settings())?).filter(|p| !p.is_empty());
    if retention.is_some() && backup_every.is_none() {
        tracing::warn!(
            "a retention policy is set but no --backup-every: the daemon expires only after its own scheduled backups"
        );
    }
    let needs_conn = backup_every.is_some() || max_wal_age.is_some();
    let opts = walvault::daemon::DaemonOptions {
        pgdata,
        parallel: parallel
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get().min(4))),
        rescan_every: parse_duration(rescan_every)?,
        pg_conn: if needs_conn {
            Some(pg_url.unwrap_or_else(default_pg_conn))
        } else {
            pg_url
        },
        backup_every: backup_every.as_deref().map(parse_duration).transpose()?,
        max_wal_age: max_wal_age.as_deref().map(parse_duration).transpose()?,
        metrics_addr,
        retention,
        verify_every: verify_every.as_deref().map(parse_duration).transpose()?,
        drill_every,
        drill,
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler installs");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        let metrics = std::sync::Arc::new(walvault::daemon::Metrics::default());
        walvault::daemon::run(settings, opts, metrics, shutdown).await
    })?;
    tracing::info!("daemon stopped");
    Ok(())
}

/// `archive-agent daemon --drill-every` and the drills' settings.
#[derive(Debug, clap::Args)]
struct DrillArgs {
    /// Run a restore drill this often (e.g. 7d); evidence is stored in the repository (see
    /// restore-agent info) and the walvault_last_drill_* metrics
    #[arg(long, value_name = "DURATION")]
    drill_every: Option<String>,
    /// What the drills restore: random (an instant of the restorable window) or latest
    #[arg(long, value_name = "WHAT", default_value = "random", value_parser = ["random", "latest"])]
    drill_target: String,
    /// Directory with postgres and pg_ctl of the cluster's version [default: the usual places]
    #[arg(long, value_name = "DIR")]
    drill_pg_bin: Option<PathBuf>,
    /// Where drills make their scratch directory [default: the temp dir]
    #[arg(long, value_name = "DIR")]
    drill_scratch: Option<PathBuf>,
    /// OS user the drill's PostgreSQL runs as when the daemon runs as root
    #[arg(long, value_name = "USER", default_value = "postgres")]
    drill_run_as: String,
    /// SQL file whose queries must each return true (repeatable)
    #[arg(long, value_name = "FILE")]
    drill_check_sql: Vec<PathBuf>,
    /// Database the --drill-check-sql queries run in
    #[arg(long, value_name = "DB", default_value = "postgres")]
    drill_check_db: String,
    /// Also run amcheck in drills
    #[arg(long)]
    drill_amcheck: bool,
    /// Recovery time objective the drills are held to (e.g. 1h)
    #[arg(long, value_name = "DURATION")]
    drill_rto_target: Option<String>,
    /// Recovery point objective the drills are held to (e.g. 15m)
    #[arg(long, value_name = "DURATION")]
    drill_rpo_target: Option<String>,
}

impl DrillArgs {
    fn options(
        &self,
        repo: &RepoArgs,
        settings: &walvault::config::Settings,
    ) -> anyhow::Result<walvault::drill::DrillOptions> {
        use walvault::config::parse_duration;
        // The drill's server fetches WAL with restore-agent, installed beside archive-agent.
        let exe = std::env::current_exe()?;
        let restore_agent = exe.with_file_name("restore-agent");
        if !restore_agent.exists() {
            anyhow::bail!(
                "--drill-every needs restore-agent beside archive-agent ({} is missing)",
                restore_agent.display()
            );
        }
        Ok(walvault::drill::DrillOptions {
            target: match self.drill_target.as_str() {
                "latest" => walvault::drill::DrillTarget::Latest,
                _ => walvault::drill::DrillTarget::Random,
            },
            timeline: walvault::restore::TimelineTarget::Latest,
            exclusive: false,
            pg_bin: self.drill_pg_bin.clone(),
            scratch: self.drill_scratch.clone(),
            run_as: Some(self.drill_run_as.clone()),
            pg_user: None,
            check_sql: walvault::drill::check_sql_files(&self.drill_check_sql)
                .map_err(|e| anyhow::anyhow!("--drill-check-sql {e}"))?,
            check_db: self.drill_check_db.clone(),
            amcheck: self.drill_amcheck,
            rto_target: self.drill_rto_target.as_deref().map(parse_duration).transpose()?,
            rpo_target: self.drill_rpo_target.as_deref().map(parse_duration).transpose()?,
            timeout: std::time::Duration::from_secs(6 * 3600),
            parallel: 4,
            restore_command: walvault::restore::restore_command_line(
                &restore_agent,
                settings,
                repo.config.as_deref(),
                repo.retry_timeout.as_deref(),
            )?,
            keep: false,
        })
    }
}

fn expire(
    repo: &RepoArgs,
    rules: &walvault::cli::RetentionArgs,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let settings = repo.settings(None)?;
    let policy = settings.retention.policy(&rules.settings())?;
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(async {
        let writer = walvault::repo::Writer::open_writable(&settings.repo, &settings.store_options()).await?;
        anyhow::Ok(walvault::expire::expire(&writer, &policy, dry_run, walvault::time::now_micros()).await?)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.render());
    }
    Ok(())
}

/// Pin (`note` is `Some`) or unpin backup `id`.
fn pin(repo: &RepoArgs, id: &str, note: Option<Option<String>>) -> anyhow::Result<()> {
    let settings = repo.settings(None)?;
    let id: walvault::backup::BackupId = id.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let writer = walvault::repo::Writer::open_writable(&settings.repo, &settings.store_options()).await?;
        match &note {
            Some(note) => walvault::expire::pin(&writer, &id, note.clone()).await?,
            None => walvault::expire::unpin(&writer, &id).await?,
        }
        anyhow::Ok(())
    })?;
    match note {
        Some(_) => println!("pinned {id}"),
        None => println!("unpinned {id}"),
    }
    Ok(())
}

fn rekey(repo: &RepoArgs, new_key: &KeySource) -> anyhow::Result<()> {
    let settings = repo.settings(None)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut writer =
            walvault::repo::Writer::open_writable(&settings.repo, &settings.store_options()).await?;
        writer.rekey(new_key, walvault::time::now_micros()).await?;
        anyhow::Ok(())
    })?;
    println!(
        "rekeyed repository {}: it opens with the {new_key} only; point key_file / key_command (or WALVAULT_ENCRYPTION_KEY_*) at it everywhere before the next push, fetch or restore (a running daemon keeps working)",
        settings.repo
    );
    Ok(())
}

fn init(repo: &RepoArgs, pgdata: Option<PathBuf>, encrypt: bool, json: bool) -> anyhow::Result<()> {
    let settings = repo.settings(None)?;
    let cluster = pgdata
        .as_deref()
        .map(walvault::repo::init::cluster_of_data_dir)
        .transpose()?;
    let rt = tokio::runtime::Runtime::new()?;
    let created = rt.block_on(walvault::repo::Writer::init(
        &settings.repo,
        &settings.store_options(),
        cluster,
        walvault::time::now_micros(),
        encrypt,
    ))?;
    let encrypted = created.sealer().is_encrypted();
    if json {
        let doc = serde_json::json!({
            "repository": settings.repo.to_string(),
            "id": created.id(),
            "cluster": created.cluster(),
            "encrypted": encrypted,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        match created.cluster() {
            Some(c) => println!(
                "created {}repository {} (id {}) for {c}",
                if encrypted { "encrypted " } else { "" },
                settings.repo,
                created.id()
            ),
            None => println!(
                "created {}repository {} (id {}); the first WAL segment archived binds it to its cluster",
                if encrypted { "encrypted " } else { "" },
                settings.repo,
                created.id()
            ),
        }
        if encrypted {
            println!(
                "keep the key safe and apart from the repository: without it nothing in the repository can be read"
            );
        }
    }
    Ok(())
}

fn default_pg_conn() -> String {
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    format!(
        "host={} port={} user={} dbname=postgres",
        var("PGHOST", "/var/run/postgresql"),
        var("PGPORT", "5432"),
        var("PGUSER", "postgres")
    )
}

#[allow(clippy::too_many_arguments)]
fn backup(
    repo: &RepoArgs,
    pgdata: PathBuf,
    pg_url: Option<String>,
    primary_url: Option<String>,
    compress_level: Option<i32>,
    parallel: usize,
    wal_timeout: &str,
    reading: FileReading,
    json: bool,
) -> anyhow::Result<()> {
    let settings = repo.settings(compress_level)?;
    let opts = BackupOptions {
        pgdata,
        pg_conn: pg_url.unwrap_or_else(default_pg_conn),
        chunk_size: DEFAULT_CHUNK_SIZE,
        parallel,
        wal_timeout: walvault::config::parse_duration(wal_timeout)?,
        primary_conn: primary_url,
    };
    let started = Instant::now();
    let rt = tokio::runtime::Runtime::new()?;
    let m = rt.block_on(take_backup_reading(&settings, &opts, reading))?;
    let s = &m.stats;
    tracing::info!(
        "backup {} done: {} files ({} unchanged, taken over unread), {} bytes, {} chunks ({} new, {} bytes uploaded), WAL {}..{}, {:.1}s",
        m.id,
        s.files,
        s.reused_files,
        s.logical_bytes,
        s.chunks,
        s.new_chunks,
        s.new_bytes,
        m.start_wal,
        m.stop_wal,
        started.elapsed().as_secs_f64()
    );
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&walvault::catalog::BackupInfo::from(&m))?
        );
    } else {
        println!("{}", m.id);
    }
    Ok(())
}

fn push(repo: &RepoArgs, wal_path: &std::path::Path, compress_level: Option<i32>) -> u8 {
    let started = Instant::now();
    let settings = match repo.settings(compress_level) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("push {}: {e}", wal_path.display());
            return exit::USAGE;
        }
    };
    let result = match cli::run_call(archive::push(&settings, wal_path)) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("push {}: cannot start: {e}", wal_path.display());
            return exit::NOT_FOUND_OR_RETRY;
        }
    };
    let ms = started.elapsed().as_millis();
    match result {
        Ok(PushOutcome {
            name,
            size,
            stored_size,
            newly_stored,
            ..
        }) => {
            let what = if newly_stored {
                "archived"
            } else {
                "already archived, identical"
            };
            tracing::info!("push {name}: {what}, {size} bytes, stored {stored_size} bytes, {ms} ms");
            exit::SUCCESS
        }
        Err(e) => {
            tracing::error!("push {}: {e}", wal_path.display());
            e.exit_code()
        }
    }
}
