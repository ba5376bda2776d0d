//! What both binaries share on the command line: repository flags, logging, and how a bad command
//! line is reported (one line, exit 2); each command's flags as the options its library function
//! takes (`*_args`), and the progress bar a restore draws on a terminal.

pub mod allocator;
pub mod backup_args;
pub mod daemon_args;
pub mod drill_args;
pub mod progress_bar;
pub mod restore_args;
pub mod target_args;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

use crate::config::{DEFAULT_CONFIG_PATH, Overrides, Settings};
use crate::exit;

/// Where the repository is and how to reach it.
#[derive(Debug, Clone, clap::Args)]
pub struct RepoArgs {
    /// Repository URL: file:///var/lib/walvault, s3://bucket/prefix or az://container/prefix
    #[arg(long, env = "WALVAULT_REPO", global = true, value_name = "URL")]
    pub repo: Option<String>,
    /// TOML file with repo, compress_level, retry_timeout, [s3], [azure], [gcs] credentials, [retention], [encryption] [default: /etc/walvault/walvault.toml if it exists]
    #[arg(long, env = "WALVAULT_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Give up on an unreachable repository after this long (500ms, 30s, 5m) [default: 60s]
    #[arg(long, env = "WALVAULT_RETRY_TIMEOUT", global = true, value_name = "DURATION")]
    pub retry_timeout: Option<String>,
}

impl RepoArgs {
    pub fn settings(&self, compress_level: Option<i32>) -> Result<Settings, crate::config::ConfigError> {
        Settings::resolve(
            Overrides {
                repo: self.repo.clone(),
                config: self.config.clone(),
                compress_level,
                retry_timeout: self.retry_timeout.clone(),
                // Environment only: PostgreSQL logs the command lines it runs.
                encryption_key_file: std::env::var_os("WALVAULT_ENCRYPTION_KEY_FILE")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from),
                encryption_key_command: std::env::var("WALVAULT_ENCRYPTION_KEY_COMMAND")
                    .ok()
                    .filter(|v| !v.is_empty()),
            },
            std::path::Path::new(DEFAULT_CONFIG_PATH),
        )
    }

    /// The flags that give another invocation (a child process) the same repository settings.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        if let Some(r) = &self.repo {
            args.extend(["--repo".into(), r.into()]);
        }
        if let Some(c) = &self.config {
            args.extend(["--config".into(), c.into()]);
        }
        if let Some(t) = &self.retry_timeout {
            args.extend(["--retry-timeout".into(), t.into()]);
        }
        args
    }
}

/// The connection to the local cluster when none is given: libpq's PGHOST, PGPORT and PGUSER,
/// else the Debian socket directory, 5432 and postgres.
pub fn default_pg_conn() -> String {
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    format!(
        "host={} port={} user={} dbname=postgres",
        var("PGHOST", "/var/run/postgresql"),
        var("PGPORT", "5432"),
        var("PGUSER", "postgres")
    )
}

/// Retention rules on the command line (`expire`, `daemon`): the `[retention]` table's keys as
/// flags. Any rule given here replaces the table's rules.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RetentionArgs {
    /// Keep the newest N backups, with every instant since the oldest of them
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep every instant of the last DURATION restorable (14d, 2w, 36h): the backups that
    /// became consistent in it and the newest one before it
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<String>,
    /// Keep the newest backup of each of the last N days that have one (restorable to its
    /// consistency point)
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// ... of each of the last N ISO weeks (Monday to Sunday)
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// ... of each of the last N calendar months
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// ... of each of the last N calendar years
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Time zone of the calendar periods (IANA name, e.g. Europe/Paris) [default: UTC]
    #[arg(long, value_name = "ZONE")]
    pub timezone: Option<String>,
}

impl RetentionArgs {
    pub fn settings(&self) -> crate::config::RetentionSettings {
        crate::config::RetentionSettings {
            keep_last: self.keep_last,
            keep_within: self.keep_within.clone(),
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            timezone: self.timezone.clone(),
        }
    }
}

/// Parse the command line; on a usage error print one line and exit 2 (help and version exit 0).
pub fn parse_or_exit<T: Parser>(program: &str) -> T {
    parse_or_exit_with(program, exit::USAGE)
}

/// [`parse_or_exit`], exiting with `usage_code` on a usage error.
pub fn parse_or_exit_with<T: Parser>(program: &str, usage_code: u8) -> T {
    match T::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            std::process::exit(0);
        }
        Err(e) => {
            // clap's message spans several lines; keep its first paragraph, on one line.
            let text = e.to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = first.join(" ");
            let first = first.strip_prefix("error: ").unwrap_or(&first);
            eprintln!("{program}: {first} (see {program} --help)");
            std::process::exit(i32::from(usage_code));
        }
    }
}

/// Log to stderr, which PostgreSQL captures into its server log. `WALVAULT_LOG` sets the filter
/// (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WALVAULT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,pg_walstream=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

/// A single-threaded runtime: push and fetch handle one file each and must start fast.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Run one bounded call (push, fetch) on a fresh runtime and return without waiting for
/// blocking work it left behind (a stuck DNS lookup or file system call): the call's own time
/// bound is what PostgreSQL waits for, not a thread that outlived it.
pub fn run_call<F: std::future::Future>(call: F) -> std::io::Result<F::Output> {
    let rt = runtime()?;
    let out = rt.block_on(call);
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    Ok(out)
}

/// `s` as one word for `sh` (the shell PostgreSQL runs archive and restore commands with).
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=@+,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
