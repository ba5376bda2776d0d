//! A throwaway PostgreSQL on a restored copy, as `drill` and `extract` run one: its scratch
//! directory, the binaries of the backup's version, the configuration that makes it a private
//! copy, the OS user it runs as, and starting it, waiting for the end of recovery, connecting
//! and stopping it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What went wrong preparing, starting or reaching the private server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The private configuration could not be written.
    #[error("{}: {source}", path.display())]
    Conf { path: PathBuf, source: std::io::Error },
    #[error("chown: {0}")]
    ChownSpawn(std::io::Error),
    #[error("chown -R {user} {}: {stderr}", dir.display())]
    Chown {
        user: String,
        dir: PathBuf,
        stderr: String,
    },
    /// `seen` says what each candidate directory held.
    #[error("no PostgreSQL {major} server (postgres and pg_ctl) found ({seen}); pass --pg-bin DIR")]
    NoBinaries { major: u32, seen: String },
    #[error("pg_ctl: {0}")]
    PgCtlSpawn(std::io::Error),
    /// `log_tail` is `; server log: <last error line>`, or empty.
    #[error("pg_ctl start: {stderr}{log_tail}")]
    Start { stderr: String, log_tail: String },
    #[error("the server stopped during recovery{log_tail}")]
    StoppedInRecovery { log_tail: String },
    #[error("recovery did not finish within {secs}s{log_tail}")]
    RecoveryTimeout { secs: u64, log_tail: String },
    #[error("{0}")]
    Query(#[from] tokio_postgres::Error),
}

/// Removes the scratch directory when the command (`purpose`: drill, extract) ends, however it
/// ends (a daemon aborting it, Ctrl-C), unless asked to keep it.
pub(crate) struct ScratchGuard {
    pub dir: PathBuf,
    pub keep: bool,
    pub purpose: &'static str,
}

impl Drop for ScratchGuard {
    fn drop(&mut self) {
        let purpose = self.purpose;
        if self.keep {
            tracing::info!(dir = %self.dir.display(), "{purpose}: scratch directory kept");
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), "{purpose}: could not remove the scratch directory: {e}");
        }
    }
}

/// A private (0700) directory `walvault-<purpose>-<id>-<random>` under `parent` [default: the
/// temp dir].
pub(crate) fn make_scratch(parent: Option<&Path>, purpose: &str, id: &str) -> std::io::Result<PathBuf> {
    let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
    let dir = parent.join(format!("walvault-{purpose}-{id}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(dir)
}

pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The user this process runs as, for the checks' role when PostgreSQL runs as ourselves.
pub(crate) fn current_user() -> String {
    std::env::var("USER").unwrap_or_else(|_| "postgres".into())
}

fn is_root() -> bool {
    // The owner of /proc/self is the effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// The OS user to run PostgreSQL as: `None` to run it as ourselves (PostgreSQL refuses root).
pub(crate) fn os_user(run_as: Option<&str>) -> Option<String> {
    match (is_root(), run_as) {
        (true, u) => Some(u.unwrap_or("postgres").to_string()),
        (false, _) => None,
    }
}

/// Settings that make the restored server a private, harmless copy: no TCP, a socket in the
/// scratch directory, its own pg_hba.conf (trust over that socket only), no archiving (it would
/// push a new timeline into the repository), no SSL files from the source's host.
pub(crate) fn write_private_conf(
    pgdata: &Path,
    scratch: &Path,
    port: u16,
    purpose: &str,
) -> Result<(), ServerError> {
    use std::io::Write;
    let conf_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ServerError::Conf { path, source }
    };
    let hba = scratch.join("pg_hba.conf");
    std::fs::write(&hba, "local all all trust\n").map_err(conf_err(&hba))?;
    let q = |p: &Path| crate::recovery_conf::quote(&p.display().to_string());
    let lines = format!(
        "\n# walvault {purpose}: a private copy\nport = {port}\nlisten_addresses = ''\nunix_socket_directories = {}\nhba_file = {}\narchive_mode = off\nssl = off\nhot_standby = on\nlogging_collector = off\nprimary_conninfo = ''\nprimary_slot_name = ''\n",
        q(scratch),
        q(&hba)
    );
    let conf = pgdata.join("postgresql.auto.conf");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .map_err(conf_err(&conf))?;
    f.write_all(lines.as_bytes()).map_err(conf_err(&conf))
}

/// Hand the scratch directory to the OS user PostgreSQL runs as.
pub(crate) async fn chown_tree(dir: &Path, user: &str) -> Result<(), ServerError> {
    let out = tokio::process::Command::new("chown")
        .args(["-R", &format!("{user}:")])
        .arg(dir)
        .output()
        .await
        .map_err(ServerError::ChownSpawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ServerError::Chown {
            user: user.to_string(),
            dir: dir.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
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

/// The directory `pg_config --bindir` names, when there is a `pg_config` on PATH.
pub(crate) async fn pg_config_bindir() -> Option<PathBuf> {
    let out = tokio::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .await
        .ok()?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// `--pg-bin`, else the usual places for `major`, else `pg_config --bindir`; the binaries must be
/// of the backup's major version.
pub(crate) async fn find_pg_bin(given: Option<&Path>, major: u32) -> Result<PathBuf, ServerError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(g) = given {
        candidates.push(g.to_path_buf());
    } else {
        candidates.push(PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
        candidates.push(PathBuf::from(format!("/usr/pgsql-{major}/bin")));
        candidates.extend(pg_config_bindir().await);
    }
    let mut seen = Vec::new();
    for c in candidates {
        match server_major(&c).await {
            Some(m) if m == major => return Ok(c),
            Some(m) => seen.push(format!("{} is PostgreSQL {m}", c.display())),
            None => seen.push(format!("{}: no postgres there", c.display())),
        }
    }
    Err(ServerError::NoBinaries {
        major,
        seen: seen.join("; "),
    })
}

/// The private server.
pub(crate) struct Server {
    bin: PathBuf,
    pgdata: PathBuf,
    log: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    /// OS user to run as (we are root), or `None`.
    user: Option<String>,
    db_user: String,
    stopped: AtomicBool,
}

impl Drop for Server {
    /// A drill or extract cut short (the daemon shutting down, Ctrl-C) must not leave a server
    /// behind.
    fn drop(&mut self) {
        if !self.stopped.load(Ordering::Relaxed) {
            let _ = self.stop_command().output();
        }
    }
}

impl Server {
    /// The server of `pgdata` from the binaries in `bin`, logging and listening (socket only) in
    /// `scratch`, run as OS user `user` (`None`: as ourselves), checked as role `db_user`.
    pub fn new(
        bin: PathBuf,
        pgdata: PathBuf,
        scratch: &Path,
        port: u16,
        user: Option<String>,
        db_user: String,
    ) -> Server {
        Server {
            bin,
            pgdata,
            log: scratch.join("postgresql.log"),
            socket_dir: scratch.to_path_buf(),
            port,
            user,
            db_user,
            stopped: AtomicBool::new(false),
        }
    }

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

    pub async fn start(&self) -> Result<(), ServerError> {
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
            .map_err(ServerError::PgCtlSpawn)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ServerError::Start {
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                log_tail: self.log_tail(),
            })
        }
    }

    pub async fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        let _ = tokio::process::Command::from(self.stop_command()).output().await;
    }

    /// The server's log so far (empty when unreadable).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `; server log: <the last FATAL, PANIC or ERROR line>`, or empty: for error messages.
    fn log_tail(&self) -> String {
        let log = self.log();
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
            .application_name("walvault")
            .connect_timeout(Duration::from_secs(10));
        c
    }

    /// libpq's connection arguments for the client programs (pg_dump): the socket, the port,
    /// the role.
    pub fn client_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--host".into(),
            self.socket_dir.clone().into_os_string(),
            "--port".into(),
            self.port.to_string().into(),
            "--username".into(),
            self.db_user.clone().into(),
        ]
    }

    pub async fn connect(&self, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = self.config(db).connect(tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    fn running(&self) -> bool {
        self.pgdata.join("postmaster.pid").exists()
    }

    /// Wait until recovery has ended (the server promoted) and it answers; the last replayed
    /// transaction's time.
    pub async fn wait_recovered(&self, timeout: Duration) -> Result<Option<i64>, ServerError> {
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
                    return Err(ServerError::StoppedInRecovery {
                        log_tail: self.log_tail(),
                    });
                }
            } else {
                gone_since = None;
            }
            if Instant::now() > deadline {
                return Err(ServerError::RecoveryTimeout {
                    secs: timeout.as_secs(),
                    log_tail: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The databases that accept connections, by name.
    pub async fn databases(&self) -> Result<Vec<String>, ServerError> {
        let c = self.connect("postgres").await?;
        let rows = c
            .query(
                "SELECT datname::text FROM pg_database WHERE datallowconn ORDER BY datname",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_read_as_before() {
        let e = ServerError::NoBinaries {
            major: 15,
            seen: "/x: no postgres there".into(),
        };
        assert_eq!(
            e.to_string(),
            "no PostgreSQL 15 server (postgres and pg_ctl) found (/x: no postgres there); pass --pg-bin DIR"
        );
        let e = ServerError::RecoveryTimeout {
            secs: 30,
            log_tail: "; server log: FATAL: x".into(),
        };
        assert_eq!(
            e.to_string(),
            "recovery did not finish within 30s; server log: FATAL: x"
        );
        let e = ServerError::Chown {
            user: "postgres".into(),
            dir: "/tmp/d".into(),
            stderr: "denied".into(),
        };
        assert_eq!(e.to_string(), "chown -R postgres /tmp/d: denied");
    }
}
