//! A throwaway PostgreSQL cluster: its own scratch directory (data dir, socket dir, server log),
//! its own TCP port on 127.0.0.1, stopped whenever the [`Cluster`] value goes away, panics
//! included.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::host::{self, Finished, Poll, ScratchDir, pg_bin, pg_user_command, process_alive};
use crate::pg::PgInstall;

/// `pg_ctl -t`: how long a start or stop may take.
const PG_CTL_TIMEOUT_SECS: u64 = 120;
/// Limit for the harness's own runs of `pg_ctl` (a little above its `-t`), `initdb` and friends.
const COMMAND_LIMIT: Duration = Duration::from_secs(PG_CTL_TIMEOUT_SECS + 30);
/// Limit for workloads (`pgbench`).
const WORKLOAD_LIMIT: Duration = Duration::from_secs(900);
/// Lines of server log quoted in error messages.
const LOG_TAIL_LINES: usize = 60;
/// Start attempts on fresh ports when another process took ours in the meantime.
const PORT_ATTEMPTS: usize = 5;

/// Options for `initdb`.
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    /// `--wal-segsize` in MiB (PostgreSQL's default, 16, when `None`).
    pub wal_segsize_mb: Option<u32>,
    /// The server to run ([`PgInstall::default_install`] when `None`).
    pub pg: Option<&'static PgInstall>,
    /// `initdb --data-checksums`.
    pub data_checksums: bool,
}

/// One PostgreSQL cluster owned by the test.
#[derive(Debug)]
pub struct Cluster {
    name: String,
    port: u16,
    /// Whether we started the server and have not seen it stop.
    running: bool,
    /// The server's programs.
    pg: &'static PgInstall,
    // Dropped after `Drop::drop` has stopped the server.
    scratch: ScratchDir,
}

impl Cluster {
    /// `initdb` a new cluster (stopped). Settings for fast throwaway clusters are appended to its
    /// `postgresql.conf`; add more with [`Cluster::set_conf`].
    pub fn init(name: &str, opts: &InitOptions) -> Result<Cluster> {
        let cluster = Cluster::empty(name, opts.pg.unwrap_or_else(PgInstall::default_install))?;
        let mut cmd = cluster.pg.command("initdb");
        cmd.arg("-D").arg(cluster.data_dir()).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "-N",
        ]);
        // --no-instructions exists from PostgreSQL 14.
        if cluster.pg.major() >= 14 {
            cmd.arg("--no-instructions");
        }
        if let Some(mb) = opts.wal_segsize_mb {
            cmd.arg(format!("--wal-segsize={mb}"));
        }
        if opts.data_checksums {
            cmd.arg("--data-checksums");
        }
        host::run(&mut cmd, COMMAND_LIMIT)?
            .check()
            .with_context(|| format!("initdb of cluster {name}"))?;
        cluster.set_conf(&[
            // Durability of a throwaway cluster is not under test; WAL content is the same.
            ("fsync", "off"),
            ("max_connections", "20"),
            ("shared_buffers", "32MB"),
            ("log_checkpoints", "off"),
        ])?;
        Ok(cluster)
    }

    /// A new stopped cluster made by `pg_basebackup -X none` from this running one: the backup
    /// holds no WAL, so it can only be started through archive recovery.
    pub fn base_backup(&self, name: &str) -> Result<Cluster> {
        self.require_client_version("pg_basebackup")?;
        let backup = Cluster::empty(name, self.pg)?;
        let mut cmd = pg_user_command(pg_bin("pg_basebackup"));
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-D",
        ])
        .arg(backup.data_dir())
        .args(["-X", "none", "-c", "fast", "--no-sync"]);
        host::run(&mut cmd, COMMAND_LIMIT)?
            .check()
            .with_context(|| format!("pg_basebackup of {} into {name}\n{}", self.name, self.log_tail()))?;
        Ok(backup)
    }

    /// A cluster with no data directory yet: restore one into [`Cluster::data_dir`] (which
    /// does not exist), then start it here, on a port of its own.
    pub fn uninitialized(name: &str) -> Result<Cluster> {
        Cluster::empty(name, PgInstall::default_install())
    }

    /// [`Cluster::uninitialized`], to be run by the server `pg`.
    pub fn uninitialized_on(name: &str, pg: &'static PgInstall) -> Result<Cluster> {
        Cluster::empty(name, pg)
    }

    fn empty(name: &str, pg: &'static PgInstall) -> Result<Cluster> {
        let scratch = ScratchDir::new(&format!("pg-{name}"))?;
        scratch.subdir("sock")?;
        Ok(Cluster {
            name: name.to_string(),
            port: pick_port()?,
            running: false,
            pg,
            scratch,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Client programs that read a server's files or protocol (pg_basebackup, pg_controldata)
    /// come in one version only, the default server's: refuse them for any other.
    fn require_client_version(&self, program: &str) -> Result<()> {
        let default = PgInstall::default_install();
        if self.pg.major() != default.major() {
            bail!(
                "{program} {} cannot serve cluster {} (PostgreSQL {}): use the agents or SQL",
                default.major(),
                self.name,
                self.pg.major()
            );
        }
        Ok(())
    }

    /// The server this cluster runs.
    pub fn pg(&self) -> &'static PgInstall {
        self.pg
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> PathBuf {
        self.scratch.path().join("data")
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.data_dir().join("pg_wal")
    }

    fn socket_dir(&self) -> PathBuf {
        self.scratch.path().join("sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.scratch.path().join("server.log")
    }

    /// The whole server log (empty before the first start).
    pub fn log(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The end of the server log, labelled, for error messages.
    pub fn log_tail(&self) -> String {
        format!(
            "--- last lines of {} server log ({}) ---\n{}",
            self.name,
            self.log_path().display(),
            host::tail(&self.log(), LOG_TAIL_LINES)
        )
    }

    /// Append settings to `postgresql.conf` (later lines win). Values are quoted for you.
    pub fn set_conf(&self, settings: &[(&str, &str)]) -> Result<()> {
        let path = self.data_dir().join("postgresql.conf");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut text = String::from("\n# walvault-testkit\n");
        for (k, v) in settings {
            text.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
        }
        f.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Configure archive recovery through `restore_command` (archiving off, so a restored cluster
    /// never writes into the repository it restores from), plus `extra` settings, and create
    /// `recovery.signal`.
    pub fn prepare_recovery(&self, restore_command: &str, extra: &[(&str, &str)]) -> Result<()> {
        let mut settings = vec![("restore_command", restore_command), ("archive_mode", "off")];
        settings.extend_from_slice(extra);
        self.set_conf(&settings)?;
        let signal = self.data_dir().join("recovery.signal");
        fs::write(&signal, "").with_context(|| format!("creating {}", signal.display()))?;
        host::give_to_pg_user(&signal)?;
        Ok(())
    }

    /// `START WAL LOCATION` segment from `backup_label` (a base backup that was never started).
    pub fn backup_start_segment(&self) -> Result<String> {
        let label =
            fs::read_to_string(self.data_dir().join("backup_label")).context("reading backup_label")?;
        label
            .lines()
            .find_map(|l| l.strip_prefix("START WAL LOCATION: "))
            .and_then(|l| l.split("(file ").nth(1))
            .map(|l| l.trim_end_matches(')').to_string())
            .ok_or_else(|| anyhow!("no START WAL LOCATION in backup_label:\n{label}"))
    }

    /// The postmaster's pid while a server runs on the data dir.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let pidfile = fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        pidfile.lines().next()?.trim().parse().ok()
    }

    /// Whether a postmaster is alive on the data dir.
    pub fn is_up(&self) -> bool {
        self.postmaster_pid().is_some_and(process_alive)
    }

    /// Start the server and wait until it accepts connections (or, in archive recovery with hot
    /// standby, until it is consistent).
    pub fn start(&mut self) -> Result<()> {
        if !self.launch()? {
            bail!(
                "cluster {} did not become ready within {PG_CTL_TIMEOUT_SECS}s\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// `pg_ctl start -w`, moving to another port when ours was taken. `Ok(true)` once the server
    /// is ready, `Ok(false)` when pg_ctl gave up waiting but the server is still starting (a long
    /// recovery), an error with the server log when the server exited.
    fn launch(&mut self) -> Result<bool> {
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let log_before = self.log().len();
            self.running = true;
            let run = self.pg_ctl_start()?;
            if run.status.success() {
                return Ok(true);
            }
            if self.is_up() {
                return Ok(false);
            }
            let new_log = self.log().get(log_before..).unwrap_or_default().to_string();
            if !port_taken(&new_log) {
                self.running = false;
                bail!(
                    "starting cluster {} failed: {run}\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            last = Some(run);
            self.port = pick_port()?;
        }
        self.running = false;
        bail!(
            "cluster {} found no free port in {PORT_ATTEMPTS} attempts: {}\n{}",
            self.name,
            last.map(|r| r.to_string()).unwrap_or_default(),
            self.log_tail()
        )
    }

    fn pg_ctl_start(&self) -> Result<Finished> {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            self.port,
            self.socket_dir().display()
        );
        let mut cmd = self.pg.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", &PG_CTL_TIMEOUT_SECS.to_string(), "-o", &opts, "start"])
            // Inherited by archive_command / restore_command.
            .env("WALVAULT_LOG", "info");
        host::run(&mut cmd, COMMAND_LIMIT)
    }

    /// Stop the server (`-m fast`, then `-m immediate` if that does not work).
    pub fn stop(&mut self) -> Result<()> {
        if !self.is_up() {
            self.running = false;
            return Ok(());
        }
        let fast = self.pg_ctl_stop("fast")?;
        if !fast.status.success() {
            let immediate = self.pg_ctl_stop("immediate")?;
            if !immediate.status.success() && self.is_up() {
                bail!(
                    "cannot stop cluster {}: {fast}\n{immediate}\n{}",
                    self.name,
                    self.log_tail()
                );
            }
        }
        self.running = false;
        Ok(())
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<Finished> {
        let mut cmd = self.pg.command("pg_ctl");
        cmd.arg("-D").arg(self.data_dir()).args([
            "-m",
            mode,
            "-w",
            "-t",
            &PG_CTL_TIMEOUT_SECS.to_string(),
            "stop",
        ]);
        host::run(&mut cmd, COMMAND_LIMIT)
    }

    fn wait_down(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        while self.is_up() {
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }

    /// Start a server prepared with [`Cluster::prepare_recovery`] and wait until archive
    /// recovery has ended and the server has promoted. Fails as soon as the server exits
    /// instead, with its log.
    pub fn start_and_wait_recovery_end(&mut self, timeout: Duration) -> Result<()> {
        self.launch()?;
        let what = format!("cluster {} to finish recovery", self.name);
        let outcome = host::wait_for(&what, timeout, Duration::from_millis(200), || {
            if !self.is_up() {
                self.running = false;
                bail!("the server exited during recovery");
            }
            // No connections are accepted before the server is consistent.
            Ok(match self.query_one_string("SELECT pg_is_in_recovery()::text") {
                Ok(v) if v == "false" => Poll::Done(()),
                Ok(_) => Poll::Waiting("pg_is_in_recovery() = true".into()),
                Err(e) => Poll::Waiting(format!("{e:#}")),
            })
        });
        outcome.map_err(|e| e.context(self.log_tail()))
    }

    /// Wait until replay has paused at its target (`recovery_target_action = 'pause'`, hot
    /// standby: the server answers once consistent, then replays on to the target). Fails as
    /// soon as the server exits, with its log.
    pub fn wait_replay_paused(&self, timeout: Duration) -> Result<()> {
        host::wait_for(
            "replay to pause at the target",
            timeout,
            Duration::from_millis(200),
            || {
                anyhow::ensure!(self.is_up(), "the server exited:\n{}", self.log_tail());
                Ok(
                    match self.query_one_string("SELECT pg_get_wal_replay_pause_state()") {
                        Ok(s) if s == "paused" => Poll::Done(()),
                        Ok(s) => Poll::Waiting(format!("pg_get_wal_replay_pause_state() = {s}")),
                        Err(e) => Poll::Waiting(format!("{e:#}")),
                    },
                )
            },
        )
    }

    /// Start a server that is expected to fail during startup or recovery: returns the server
    /// log once the postmaster has exited. Errors when it promotes or keeps running past `timeout`.
    pub fn start_expect_failure(&mut self, timeout: Duration) -> Result<String> {
        if self.launch().is_err() {
            return Ok(self.log());
        }
        let what = format!("cluster {} to fail", self.name);
        let outcome = host::wait_for(&what, timeout, Duration::from_millis(200), || {
            if !self.is_up() {
                return Ok(Poll::Done(()));
            }
            match self.query_one_string("SELECT pg_is_in_recovery()::text") {
                Ok(v) if v == "false" => Err(anyhow!("the server finished recovery and promoted")),
                Ok(_) => Ok(Poll::Waiting("the server is still in recovery".into())),
                Err(e) => Ok(Poll::Waiting(format!("{e:#}"))),
            }
        });
        match outcome {
            Ok(()) => {
                self.running = false;
                Ok(self.log())
            }
            Err(e) => Err(e.context(format!(
                "cluster {} did not fail as expected\n{}",
                self.name,
                self.log_tail()
            ))),
        }
    }

    /// A new connection as the superuser to database `postgres`.
    pub fn connect(&self) -> Result<postgres::Client> {
        self.connect_to("postgres")
    }

    /// A connection to database `db`.
    pub fn connect_to(&self, db: &str) -> Result<postgres::Client> {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .connect_timeout(Duration::from_secs(10))
            .connect(postgres::NoTls)
            .with_context(|| {
                format!(
                    "connecting to database {db} of cluster {} on port {}",
                    self.name, self.port
                )
            })
    }

    /// A libpq connection string for this cluster, for `--pg-url`.
    pub fn conn_string(&self) -> String {
        self.conn_string_to("postgres")
    }

    /// A libpq connection string for database `db` of this cluster.
    pub fn conn_string_to(&self, db: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={db}", self.port)
    }

    /// Run SQL statements (separated by `;`) in database `db`, discarding results.
    pub fn execute_in(&self, db: &str, sql: &str) -> Result<()> {
        self.connect_to(db)?
            .batch_execute(sql)
            .with_context(|| format!("in database {db} of cluster {}: {sql}", self.name))
    }

    /// The single non-NULL value a query returns in database `db`, as text.
    pub fn query_in(&self, db: &str, sql: &str) -> Result<String> {
        let messages = self
            .connect_to(db)?
            .simple_query(sql)
            .with_context(|| format!("in database {db} of cluster {}: {sql}", self.name))?;
        messages
            .iter()
            .find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .with_context(|| {
                format!(
                    "in database {db} of cluster {}: {sql} returned no value",
                    self.name
                )
            })
    }

    /// Run SQL statements (separated by `;`), discarding results.
    pub fn execute(&self, sql: &str) -> Result<()> {
        self.connect()?
            .batch_execute(sql)
            .with_context(|| format!("on cluster {}: {sql}", self.name))
    }

    /// All rows of one query, every value as text (`None` for NULL).
    pub fn query_rows(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        let messages = self
            .connect()?
            .simple_query(sql)
            .with_context(|| format!("on cluster {}: {sql}", self.name))?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect())
    }

    /// The single non-NULL value a query returns, as text.
    pub fn query_one_string(&self, sql: &str) -> Result<String> {
        let rows = self.query_rows(sql)?;
        match rows.as_slice() {
            [row] if row.len() == 1 => row[0]
                .clone()
                .ok_or_else(|| anyhow!("on cluster {}: {sql} returned NULL", self.name)),
            _ => bail!("on cluster {}: {sql} returned {rows:?}, not one value", self.name),
        }
    }

    /// `pg_control_system().system_identifier`.
    pub fn system_identifier(&self) -> Result<String> {
        self.query_one_string("SELECT system_identifier::text FROM pg_control_system()")
    }

    /// Unix microseconds now, on the server's clock.
    pub fn clock_micros(&self) -> Result<i64> {
        self.query_one_string("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint::text")?
            .parse()
            .context("server clock")
    }

    /// Unix microseconds of `time` (a timestamptz literal), as the server reads it.
    pub fn unix_micros(&self, time: &str) -> Result<i64> {
        self.query_one_string(&format!(
            "SELECT (extract(epoch FROM '{}'::timestamptz) * 1000000)::bigint::text",
            time.replace('\'', "''")
        ))?
        .parse()
        .with_context(|| format!("time {time:?}"))
    }

    /// Run `pgbench <args> postgres` against this cluster.
    pub fn pgbench(&self, args: &[&str]) -> Result<Finished> {
        let mut cmd = pg_user_command(pg_bin("pgbench"));
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
            .args(args)
            .arg("postgres");
        host::run(&mut cmd, WORKLOAD_LIMIT)?
            .check()
            .with_context(|| format!("pgbench on cluster {}", self.name))
    }

    /// Names of the files recovery restored from the archive, per the server log.
    pub fn restored_from_archive(&self) -> BTreeSet<String> {
        self.log()
            .lines()
            .filter_map(|l| l.split("restored log file \"").nth(1)?.split('"').next())
            .map(str::to_string)
            .collect()
    }

    /// `pg_controldata` as `field -> value`.
    pub fn controldata(&self) -> Result<BTreeMap<String, String>> {
        self.require_client_version("pg_controldata")?;
        let mut cmd = pg_user_command(pg_bin("pg_controldata"));
        cmd.arg("-D").arg(self.data_dir());
        let out = host::run(&mut cmd, COMMAND_LIMIT)?.check()?;
        Ok(out
            .stdout
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect())
    }

    /// The timeline the server writes WAL on now.
    pub fn timeline(&self) -> Result<u32> {
        let hex = self.query_one_string("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")?;
        u32::from_str_radix(&hex, 16).with_context(|| format!("timeline {hex:?}"))
    }

    /// Force a switch to a new WAL segment; returns the name of the segment it completed.
    pub fn switch_wal(&self) -> Result<String> {
        self.query_one_string("SELECT pg_walfile_name(pg_switch_wal())")
    }

    /// Wait until `segment` and everything before it has been archived: the archiver reports
    /// it (or a later file) and no `.ready` file is left in `pg_wal/archive_status`.
    pub fn wait_archived(&self, segment: &str, timeout: Duration) -> Result<()> {
        host::wait_for(
            &format!("cluster {} to archive {segment}", self.name),
            timeout,
            Duration::from_millis(200),
            || {
                let last = self.query_rows(
                    "SELECT last_archived_wal, failed_count::text, last_failed_wal FROM pg_stat_archiver",
                )?;
                let archived = last
                    .first()
                    .and_then(|r| r[0].clone())
                    .is_some_and(|w| w.as_str() >= segment);
                let ready = self.archive_status("ready")?;
                Ok(match archived && ready.is_empty() {
                    true => Poll::Done(()),
                    false => Poll::Waiting(format!("pg_stat_archiver {last:?}, .ready files {ready:?}")),
                })
            },
        )
        .with_context(|| self.log_tail())
    }

    /// Names with a `.<suffix>` file in `pg_wal/archive_status` (`ready` or `done`), sorted.
    pub fn archive_status(&self, suffix: &str) -> Result<Vec<String>> {
        let dir = self.wal_dir().join("archive_status");
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_suffix(&format!(".{suffix}")) {
                names.push(n.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Recovery stopped without promoting: the server is down, no timeline 2 history was
    /// written, recovery.signal is still there, and the control file still says archive recovery
    /// on timeline 1.
    pub fn assert_stopped_in_recovery_on_timeline_1(&self) -> Result<()> {
        assert!(!self.is_up(), "the server must not keep running");
        assert!(
            !self.wal_dir().join("00000002.history").exists(),
            "the server promoted to timeline 2"
        );
        assert!(
            self.data_dir().join("recovery.signal").exists(),
            "recovery.signal was consumed"
        );
        let control = self.controldata()?;
        assert_eq!(
            control["Database cluster state"], "in archive recovery",
            "{control:?}"
        );
        assert_eq!(control["Latest checkpoint's TimeLineID"], "1", "{control:?}");
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Also after a panic: a leftover postmaster would hold its port and shared memory.
        if self.running || self.is_up() {
            let _ = self.pg_ctl_stop("immediate");
            self.wait_down(Duration::from_secs(30));
        }
    }
}

/// Whether a server log excerpt says the server could not listen on its port.
fn port_taken(log: &str) -> bool {
    log.contains("could not bind") || log.contains("could not create any TCP/IP sockets")
}

/// A TCP port on 127.0.0.1 that was free a moment ago and was not handed out before by this
/// process. Another process may still take it before the server binds it: [`Cluster::start`]
/// then moves to another port.
pub(crate) fn pick_port() -> Result<u16> {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("binding a free port")?
            .port();
        if given.insert(port) {
            return Ok(port);
        }
    }
    bail!("no unused free port found")
}

/// A started cluster that streams and does not archive (`wal_level = replica`, `archive_mode =
/// off`, room for walsenders and slots), with each of `roles` created `LOGIN REPLICATION`
/// with `password` and let in through SCRAM, first match, both as a database walsender and for
/// `replication`; everything else in `pg_hba.conf` stays as initdb made it. `extra` are more
/// postgresql.conf settings.
pub fn streaming_cluster(
    pg: &'static crate::pg::PgInstall,
    name: &str,
    roles: &[&str],
    password: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<Cluster> {
    let mut cluster = Cluster::init(
        name,
        &InitOptions {
            pg: Some(pg),
            ..InitOptions::default()
        },
    )?;
    cluster.set_conf(&[
        ("wal_level", "replica"),
        ("archive_mode", "off"),
        ("max_wal_senders", "5"),
        ("max_replication_slots", "5"),
        ("password_encryption", "scram-sha-256"),
        ("hot_standby", "on"),
    ])?;
    cluster.set_conf(extra)?;
    let hba = cluster.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba)?;
    let lines: String = roles
        .iter()
        .map(|role| {
            format!(
                "host all {role} 127.0.0.1/32 scram-sha-256\nhost replication {role} 127.0.0.1/32 scram-sha-256\n"
            )
        })
        .collect();
    crate::host::write_for_pg(&hba, format!("{lines}{old}").as_bytes())?;
    cluster.start()?;
    for role in roles {
        cluster.execute(&format!(
            "CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{password}'"
        ))?;
    }
    Ok(cluster)
}
