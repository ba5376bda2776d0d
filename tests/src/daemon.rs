//! `archive-agent daemon` beside a running cluster, as a DBA runs it: in the foreground, as the
//! PostgreSQL user, logging to a file; stopped with SIGTERM, or killed with SIGKILL to play a
//! crash. Its `/metrics` and `/health` endpoints, and the spool it shares with `archive-agent
//! push` (`<pgdata>/walvault.spool/`), seen from outside.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::agents::{ARCHIVE_AGENT, agents};
use crate::cluster::Cluster;
use crate::host::{self, ScratchDir};
use crate::object::Sealed;
use crate::repo::Repo;

/// Name of the spool directory inside the data directory (independent of the library's constant).
pub const SPOOL_DIR: &str = "walvault.spool";
/// How long the daemon may take to start, or to stop after SIGTERM (it finishes uploads first).
const START_STOP_LIMIT: Duration = Duration::from_secs(60);
/// Start attempts on fresh metrics ports when another process took ours in the meantime.
const PORT_ATTEMPTS: usize = 5;

/// A running `archive-agent daemon`, killed (with its process group) when dropped, panics
/// included.
#[derive(Debug)]
pub struct Daemon {
    /// `runuser` when the tests run as root, else the agent itself; leads its process group.
    child: Option<Child>,
    /// The agent's own pid: the process to signal (runuser would turn SIGTERM into SIGKILL
    /// two seconds later).
    pid: u32,
    metrics_addr: SocketAddr,
    log_path: PathBuf,
    _dir: ScratchDir,
}

/// How a daemon ended, and everything it logged.
#[derive(Debug)]
pub struct Ended {
    pub status: ExitStatus,
    pub log: String,
}

impl Ended {
    /// The exit code (through `runuser`, the agent's), `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl Daemon {
    /// Start `archive-agent daemon --repo <repo> --pgdata <cluster's data dir> --metrics-addr
    /// 127.0.0.1:<free port> <extra...>` and wait until it logs "daemon started".
    pub fn start(cluster: &Cluster, repo: &Repo, extra: &[&str]) -> Result<Daemon> {
        let pgdata = cluster.data_dir().display().to_string();
        Daemon::start_serving(repo, &["--pgdata", &pgdata], extra)
    }

    /// `archive-agent daemon --repo <repo> --stream --pg-url <pg_url> --metrics-addr
    /// 127.0.0.1:<free port> <extra...>`, started like [`Daemon::start`].
    pub fn start_streaming(repo: &Repo, pg_url: &str, extra: &[&str]) -> Result<Daemon> {
        Daemon::start_serving(repo, &["--stream", "--pg-url", pg_url], extra)
    }

    fn start_serving(repo: &Repo, what: &[&str], extra: &[&str]) -> Result<Daemon> {
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let addr = free_local_addr()?;
            match Daemon::launch(what, repo, extra, addr)? {
                Ok(daemon) => return Ok(daemon),
                Err(log) if log.contains("cannot serve metrics") => last = log,
                Err(log) => bail!("archive-agent daemon did not start:\n{}", host::tail(&log, 40)),
            }
        }
        bail!("archive-agent daemon found no free metrics port in {PORT_ATTEMPTS} attempts:\n{last}")
    }

    /// One start on `addr`: the daemon once it said it started, or its log once it exited.
    fn launch(
        what: &[&str],
        repo: &Repo,
        extra: &[&str],
        addr: SocketAddr,
    ) -> Result<Result<Daemon, String>> {
        let dir = ScratchDir::new("daemon")?;
        let log_path = dir.path().join("daemon.log");
        let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = agents().command(ARCHIVE_AGENT);
        cmd.arg("daemon").args(repo.args()).args(what);
        if what.contains(&"--stream") && !extra.contains(&"--stream-dir") {
            // Its working directory inside this scratch directory, removed with it: the default,
            // one per repository in the system's temporary directory, outlives the test.
            cmd.arg("--stream-dir").arg(dir.path().join("stream"));
        }
        cmd.args(["--metrics-addr", &addr.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Own process group, so that dropping the handle kills runuser *and* the agent.
            .process_group(0);
        let command = host::describe(&cmd);
        let child = cmd.spawn().with_context(|| format!("cannot start `{command}`"))?;
        let mut daemon = Daemon {
            pid: child.id(),
            child: Some(child),
            metrics_addr: addr,
            log_path,
            _dir: dir,
        };
        let started = host::wait_for(
            &format!("`{command}` to start"),
            START_STOP_LIMIT,
            Duration::from_millis(50),
            || {
                if let Some(status) = daemon.try_wait()? {
                    return Ok(host::Poll::Done(Err(format!(
                        "exited with {status}:\n{}",
                        daemon.log()
                    ))));
                }
                Ok(match daemon.log().contains("daemon started") {
                    true => host::Poll::Done(Ok(())),
                    false => host::Poll::Waiting(host::tail(&daemon.log(), 10)),
                })
            },
        )?;
        if let Err(log) = started {
            return Ok(Err(log));
        }
        if host::is_root() {
            daemon.pid = runuser_child(daemon.pid)?;
        }
        Ok(Ok(daemon))
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `GET <path>` on the metrics address: the body of a 200 response.
    pub fn http_get(&self, path: &str) -> Result<String> {
        http_get(self.metrics_addr, path)
    }

    /// `/metrics`, parsed: the value of the sample `name` (with its labels, if any, e.g.
    /// `walvault_last_archived_info{file="..."}`), `None` when absent.
    pub fn metric(&self, name: &str) -> Result<Option<f64>> {
        Ok(metric_value(&self.http_get("/metrics")?, name))
    }

    /// SIGTERM, then wait for the daemon to finish its uploads and exit.
    pub fn stop(mut self) -> Result<Ended> {
        signal(self.pid, "TERM")?;
        self.wait_exit(START_STOP_LIMIT)
    }

    /// SIGKILL the agent (a crash: no cleanup of any kind), and reap it.
    pub fn kill9(mut self) -> Result<Ended> {
        signal(self.pid, "KILL")?;
        self.wait_exit(START_STOP_LIMIT)
    }

    /// The exit status once the daemon has exited (then reaped: its pid may be reused).
    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let status = match self.child.as_mut() {
            Some(c) => c.try_wait()?,
            None => bail!("the daemon was already reaped"),
        };
        if status.is_some() {
            self.child = None;
        }
        Ok(status)
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<Ended> {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.try_wait()? {
                break status;
            }
            if start.elapsed() > timeout {
                bail!(
                    "archive-agent daemon (pid {}) still runs {timeout:?} after the signal:\n{}",
                    self.pid,
                    host::tail(&self.log(), 40)
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        Ok(Ended {
            status,
            log: self.log(),
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `kill -<sig> <pid>` (no unsafe `libc::kill` in this workspace).
fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed: {status}");
    }
    Ok(())
}

/// The one child of `runuser` (pid `parent`): the program it runs as the PostgreSQL user.
fn runuser_child(parent: u32) -> Result<u32> {
    let path = format!("/proc/{parent}/task/{parent}/children");
    host::wait_for(
        &format!("runuser (pid {parent}) to start its child"),
        START_STOP_LIMIT,
        Duration::from_millis(20),
        || {
            let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
            let pids: Vec<u32> = text.split_whitespace().filter_map(|p| p.parse().ok()).collect();
            Ok(match pids.as_slice() {
                [pid] => host::Poll::Done(*pid),
                _ => host::Poll::Waiting(format!("children: {text:?}")),
            })
        },
    )
}

/// An address on 127.0.0.1 whose port was free a moment ago.
fn free_local_addr() -> Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("binding a free port")
}

/// A minimal HTTP/1.1 GET: the body of a 200 response, an error otherwise.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let timeout = Duration::from_secs(10);
    let mut sock =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    // In one write: the daemon takes what its first read returns for the whole request, and
    // `write!` may send the request in pieces.
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    sock.write_all(request.as_bytes())?;
    let mut response = String::new();
    sock.read_to_string(&mut response)
        .with_context(|| format!("reading the response to GET {path} from {addr}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET {path}: malformed response {response:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("GET {path} from {addr}: {status}\n{body}");
    }
    Ok(body.to_string())
}

/// The value of sample `name` (metric name plus labels, exactly as exposed) in Prometheus text.
pub fn metric_value(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (sample, value) = l.rsplit_once(' ')?;
        (sample.trim() == name).then(|| value.trim().parse().ok())?
    })
}

/// The spool directory of a data directory.
pub fn spool_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(SPOOL_DIR)
}

/// Make `cluster`'s archiver wait (up to 30 s per file) for the daemon's "archived" marker of a
/// file before running push, and reload: the daemon, not push, uploads each file, so a test of
/// the markers or of push answering from them does not depend on who wins the race to a
/// `.ready` file. Call it once the daemon runs (without one, each file waits the 30 s out).
pub fn archiver_waits_for_daemon(cluster: &Cluster, repo: &Repo) -> Result<()> {
    let marker = spool_dir(&cluster.data_dir()).join("archived/%f");
    let gated = format!(
        "i=0; while [ ! -e '{}' ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; {}",
        marker.display(),
        agents().archive_command(repo, "")
    );
    cluster.set_conf(&[("archive_command", &gated)])?;
    cluster.execute("SELECT pg_reload_conf()")
}

/// Names with an "archived" marker in the spool (`archived/<name>`; temporary files, which
/// start with a dot, left out), sorted. Empty when there is no spool.
pub fn archived_markers(data_dir: &Path) -> Result<Vec<String>> {
    let dir = spool_dir(data_dir).join("archived");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(vec![]);
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Whether process `pid` has an upload in progress: an entry in the spool's `inflight/`
/// directory naming it (`<pid> <start time>`, docs/FORMAT.md).
pub fn uploading(inflight: &Path, pid: u32) -> bool {
    let pid = pid.to_string();
    fs::read_dir(inflight).into_iter().flatten().flatten().any(|e| {
        fs::read_to_string(e.path()).is_ok_and(|t| t.split_whitespace().next() == Some(pid.as_str()))
    })
}

/// Every spool marker of `cluster` names an object in `repo` holding exactly the bytes the
/// marker records. Returns the marker names.
pub fn assert_markers_match_repository(cluster: &Cluster, repo: &Repo) -> Result<Vec<String>> {
    let markers = archived_markers(&cluster.data_dir())?;
    for name in &markers {
        let path = spool_dir(&cluster.data_dir()).join("archived").join(name);
        let marker: serde_json::Value = serde_json::from_slice(&fs::read(&path)?)
            .with_context(|| format!("marker {}", path.display()))?;
        assert_eq!(
            marker["repo_id"].as_str(),
            Some(repo.id()?.as_str()),
            "marker {name}: {marker}"
        );
        assert!(
            repo.has_object(name),
            "the spool says {name} is archived, but the repository has no {}",
            repo.object_key(name)
        );
        let stored =
            Sealed::open(&repo.read(&repo.object_key(name))?).with_context(|| format!("object {name}"))?;
        assert_eq!(
            marker["blake3"].as_str(),
            Some(blake3::hash(&stored.content).to_hex().as_str()),
            "marker {name} records other bytes than the repository holds: {marker}"
        );
        assert_eq!(
            marker["size"].as_u64(),
            Some(stored.content.len() as u64),
            "marker {name}: {marker}"
        );
    }
    Ok(markers)
}
