//! What both binaries share on the command line: logging, and how a bad command line is reported
//! (one line, exit 2); each command's flags as the options its library function
//! takes (`*_args`), and the progress bar a restore draws on a terminal.

pub mod allocator;
pub mod archive_agent;
pub mod backup_args;
pub mod daemon_args;
pub mod drill_args;
pub mod extract_args;
pub mod progress_bar;
pub mod restore_agent;
pub mod restore_args;
pub mod target_args;
pub mod threads;

use clap::Parser;

use crate::exit;

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

/// The connection to the cluster (`backup`, `daemon`): one flag, declared once.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PgUrlArgs {
    /// Connection to the cluster, libpq style or URL [default: from PGHOST, PGPORT, PGUSER, else
    /// host=/var/run/postgresql port=5432 user=postgres]. Over the replication protocol (`backup`
    /// without --pgdata, `daemon --stream`) several hosts and target_session_attrs are accepted;
    /// pg_hba.conf needs a line for the database for a backup, a `replication` line for a stream
    #[arg(long, env = "WALVAULT_PG_URL", value_name = "CONN")]
    pub pg_url: Option<String>,
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
