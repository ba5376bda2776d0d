//! The machine the tests run on: where PostgreSQL lives, which user runs it, scratch directories
//! it can use, and running external programs with a time limit.
//!
//! PostgreSQL refuses to run as root, and CI runs the tests as root. So when the test process is
//! root, every PostgreSQL binary and every agent runs as the `postgres` user (`runuser -u
//! postgres --`), and every directory they touch is handed to that user first.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The operating-system user that runs PostgreSQL when the tests run as root.
pub const PG_USER: &str = "postgres";
/// Every scratch directory starts with this, followed by the owning process id.
const SCRATCH_PREFIX: &str = "walvault-";

/// Directory holding `initdb`, `pg_ctl`, `postgres`, `pg_basebackup`, `pgbench`...
/// (`WALVAULT_PG_BIN`, else the Debian location of PostgreSQL 15).
pub fn pg_bin_dir() -> PathBuf {
    std::env::var_os("WALVAULT_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// Path of one PostgreSQL program.
pub fn pg_bin(program: &str) -> PathBuf {
    pg_bin_dir().join(program)
}

/// Whether the test process runs as root (and so must hand PostgreSQL work to [`PG_USER`]).
pub fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    // Linux: /proc/self belongs to the effective uid (no unsafe `geteuid` call needed).
    *ROOT.get_or_init(|| {
        std::fs::metadata("/proc/self")
            .expect("cannot stat /proc/self")
            .uid()
            == 0
    })
}

/// Uid and gid of [`PG_USER`].
fn pg_user_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let id = |flag: &str| -> u32 {
            let out = Command::new("id")
                .args([flag, PG_USER])
                .output()
                .expect("cannot run `id`");
            assert!(
                out.status.success(),
                "the tests run as root, so PostgreSQL must run as user {PG_USER:?}, which does not exist: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("`id` printed a non-numeric id")
        };
        (id("-u"), id("-g"))
    })
}

/// A command that runs `program` as the user PostgreSQL runs as: [`PG_USER`] when we are root,
/// ourselves otherwise. Its working directory is the temp dir, which that user can always enter.
pub fn pg_user_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", PG_USER, "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.current_dir(std::env::temp_dir());
    cmd
}

/// Hand `path` (recursively) to the PostgreSQL user, so the server and the agents it runs can use
/// it. A no-op when not root.
pub fn give_to_pg_user(path: &Path) -> io::Result<()> {
    if !is_root() {
        return Ok(());
    }
    let (uid, gid) = pg_user_ids();
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            give_to_pg_user(&entry?.path())?;
        }
    }
    Ok(())
}

/// Write `bytes` to `path` and hand the file to the PostgreSQL user.
pub fn write_for_pg(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    give_to_pg_user(path).with_context(|| format!("chown {}", path.display()))
}

/// Set the permission bits of `path`.
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// A temporary directory under the system temp dir, owned by the PostgreSQL user, removed on drop
/// unless `WALVAULT_KEEP_TMP` is set (then its path is printed, for post-mortems).
#[derive(Debug)]
pub struct ScratchDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl ScratchDir {
    /// A new empty directory whose name contains `purpose`.
    pub fn new(purpose: &str) -> Result<ScratchDir> {
        sweep_stale_scratch_dirs();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{SCRATCH_PREFIX}{}-{purpose}-", std::process::id()))
            .tempdir()
            .context("creating a scratch directory")?;
        let path = dir.path().to_path_buf();
        give_to_pg_user(&path).with_context(|| format!("chown {}", path.display()))?;
        Ok(ScratchDir { dir: Some(dir), path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Create (if needed) and return the subdirectory `name`, owned by the PostgreSQL user.
    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        fs::create_dir_all(&p).with_context(|| format!("mkdir {}", p.display()))?;
        give_to_pg_user(&p).with_context(|| format!("chown {}", p.display()))?;
        Ok(p)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::env::var_os("WALVAULT_KEEP_TMP").is_some()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("WALVAULT_KEEP_TMP: keeping {}", dir.keep().display());
        }
    }
}

/// Remove every scratch directory of this process, including the process-lifetime ones. Only
/// for the very end of a program that uses no harness value afterwards (the demo).
pub fn remove_own_scratch_dirs() {
    if std::env::var_os("WALVAULT_KEEP_TMP").is_some() {
        return;
    }
    let ours = format!("{SCRATCH_PREFIX}{}-", std::process::id());
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&ours) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Scratch directories that live as long as the process (staged binaries, shared WAL samples)
/// are never dropped; remove those of test processes that have exited. Runs once per process.
fn sweep_stale_scratch_dirs() {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        if std::env::var_os("WALVAULT_KEEP_TMP").is_some() {
            return;
        }
        let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(SCRATCH_PREFIX)) else {
                continue;
            };
            let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else {
                continue;
            };
            if pid != std::process::id() && !process_alive(pid) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    });
}

/// Whether process `pid` exists and is not a zombie (a daemonized postmaster is not our child,
/// so nobody may reap it promptly inside a container).
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Format: "pid (comm) state ...", and comm may itself contain ") ".
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some(state) => state != "Z" && state != "X",
        None => false,
    }
}

/// What is under `dir`, by relative path: `dir`, `-> <target>` for a symbolic link (not
/// followed), `<size> <blake3>` for a file. `None` when `dir` does not exist. For asserting that
/// something was left exactly as it was.
pub fn snapshot(dir: &Path) -> Result<Option<BTreeMap<String, String>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            let rel = path.strip_prefix(root)?.display().to_string();
            let meta = fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
            if meta.is_symlink() {
                let target = fs::read_link(&path).with_context(|| format!("readlink {}", path.display()))?;
                out.insert(rel, format!("-> {}", target.display()));
            } else if meta.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &path, out)?;
            } else {
                let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                out.insert(rel, format!("{} {}", bytes.len(), blake3::hash(&bytes)));
            }
        }
        Ok(())
    }
    if !dir.exists() {
        return Ok(None);
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(Some(out))
}

/// What a finished program did.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The command line, for messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    /// The exit code, `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panic, quoting the command and its output, unless it exited with `expected`.
    #[track_caller]
    pub fn assert_code(&self, expected: i32) {
        assert_eq!(
            self.code(),
            Some(expected),
            "expected exit code {expected}: {self}"
        );
    }

    /// Panic unless the program failed (any exit but 0) and its standard error names each of
    /// `expected`: how a test asserts a refusal says why.
    #[track_caller]
    pub fn assert_failed_naming(&self, expected: &[&str]) {
        assert_ne!(self.code(), Some(0), "the command must fail: {self}");
        for e in expected {
            assert!(self.stderr.contains(e), "the error must mention {e:?}: {self}");
        }
    }

    /// Panic unless the program wrote at most two lines to standard error (what PostgreSQL's log
    /// gets from an attempt that cannot work), the last one naming `remedy`.
    #[track_caller]
    pub fn assert_quiet_failure(&self, remedy: &str) {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert!(
            !lines.is_empty() && lines.len() <= 2,
            "at most two lines, the last saying what to do:\n{self}"
        );
        assert!(
            lines[lines.len() - 1].contains(remedy),
            "the last line names the remedy ({remedy}):\n{self}"
        );
    }

    /// Fail unless the program exited 0.
    pub fn check(self) -> Result<Finished> {
        if !self.status.success() {
            bail!("{self}");
        }
        Ok(self)
    }
}

impl std::fmt::Display for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = match (self.status.code(), self.status.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("signal {s}"),
            (None, None) => "unknown status".into(),
        };
        write!(
            f,
            "`{}` ended with {status} after {:.1?}",
            self.command, self.elapsed
        )?;
        if !self.stdout.trim().is_empty() {
            write!(f, "\n--- stdout ---\n{}", tail(&self.stdout, 40))?;
        }
        if !self.stderr.trim().is_empty() {
            write!(f, "\n--- stderr ---\n{}", tail(&self.stderr, 40))?;
        }
        Ok(())
    }
}

/// Run `cmd` to completion, capturing its output, killing it (and its process group) when it
/// takes longer than `timeout`. A non-zero exit is not an error here: see [`Finished::check`].
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Finished> {
    let command = describe(cmd);
    let start = Instant::now();
    // Own process group, so a timeout kills runuser *and* the program it started.
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start `{command}`"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{command}` did not finish within {timeout:?}; killed it");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(Finished {
        command,
        status,
        stdout,
        stderr,
        elapsed,
    })
}

/// `cmd` as a shell-like string, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a: &OsStr| {
            let s = a.to_string_lossy();
            if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c.is_control()) {
                format!("{s:?}")
            } else {
                s.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One look at a condition [`wait_for`] waits on.
#[derive(Debug)]
pub enum Poll<T> {
    Done(T),
    /// Not yet; what was seen instead (quoted if the wait times out).
    Waiting(String),
}

/// Look at `check` every `every` until it is [`Poll::Done`], fails (stop at once), or `timeout`
/// has passed (fail with `what` and the last thing seen).
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<Poll<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        match check()? {
            Poll::Done(v) => return Ok(v),
            Poll::Waiting(seen) if start.elapsed() > timeout => {
                bail!("timed out after {timeout:?} waiting for {what}; last seen: {seen}")
            }
            Poll::Waiting(_) => thread::sleep(every),
        }
    }
}

/// A watchdog that kills `pid` once this test process is gone: for servers shared by a whole
/// test process (Garage, Azurite), which live in statics that are never dropped.
pub fn kill_with_this_process(pid: u32) {
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -9 {pid} 2>/dev/null",
        me = std::process::id()
    );
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}
