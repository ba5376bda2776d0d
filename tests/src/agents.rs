//! The `archive-agent` and `restore-agent` binaries under test: found next to the running test
//! executable (or in `WALVAULT_BIN_DIR`), copied once per process to a directory the PostgreSQL
//! user can read (the target dir may live under `/root`), and run the way PostgreSQL runs them.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::host::{self, Finished, ScratchDir};
use crate::repo::Repo;

pub const ARCHIVE_AGENT: &str = "archive-agent";
pub const RESTORE_AGENT: &str = "restore-agent";

/// Exit codes of the agents: the contract PostgreSQL relies on (independent of the library's
/// own constants, so a change there shows up here as a failing test).
pub mod exit {
    pub const SUCCESS: i32 = 0;
    /// fetch: not in the repository (or, in standby mode, not available now);
    /// push: failed, PostgreSQL should retry.
    pub const NOT_FOUND_OR_RETRY: i32 = 1;
    /// Bad arguments or invalid WAL file name; nothing touched.
    pub const USAGE: i32 = 2;
    /// push refused for good.
    pub const REFUSED: i32 = 3;
    /// fetch cannot tell or the stored copy is corrupt: above 125, so recovery stops with FATAL.
    pub const FATAL: i32 = 200;
}

/// How long a single agent run may take before the harness kills it. Far above any
/// `--retry-timeout` the tests pass.
const AGENT_RUN_LIMIT: Duration = Duration::from_secs(180);

/// The staged agent binaries.
#[derive(Debug)]
pub struct Agents {
    dir: ScratchDir,
}

/// The agents, staged on first use. Panics with instructions when they were not built.
pub fn agents() -> &'static Agents {
    static AGENTS: OnceLock<Agents> = OnceLock::new();
    AGENTS.get_or_init(|| Agents::stage().unwrap_or_else(|e| panic!("{e:#}")))
}

impl Agents {
    fn stage() -> Result<Agents> {
        let source = find_bin_dir()?;
        let dir = ScratchDir::new("bin")?;
        host::set_mode(dir.path(), 0o755)?;
        for name in [ARCHIVE_AGENT, RESTORE_AGENT] {
            let to = dir.path().join(name);
            fs::copy(source.join(name), &to)
                .with_context(|| format!("copying {} to {}", source.join(name).display(), to.display()))?;
            host::set_mode(&to, 0o755)?;
            host::give_to_pg_user(&to)?;
        }
        Ok(Agents { dir })
    }

    pub fn archive_agent(&self) -> PathBuf {
        self.dir.path().join(ARCHIVE_AGENT)
    }

    pub fn restore_agent(&self) -> PathBuf {
        self.dir.path().join(RESTORE_AGENT)
    }

    /// An `archive_command` value pushing into `repo`, with `extra` flags (e.g. `--retry-timeout 5s`).
    pub fn archive_command(&self, repo: &Repo, extra: &str) -> String {
        let bin = self.archive_agent();
        join_words(&[&bin.display().to_string(), "push", &repo.args_line(), extra, "%p"])
    }

    /// A `restore_command` value fetching from `repo`, with `extra` flags.
    pub fn restore_command(&self, repo: &Repo, extra: &str) -> String {
        let bin = self.restore_agent();
        join_words(&[
            &bin.display().to_string(),
            "fetch",
            &repo.args_line(),
            extra,
            "%f",
            "%p",
        ])
    }

    /// `<agent> <args...>` for any subcommand of [`ARCHIVE_AGENT`] or [`RESTORE_AGENT`], run as
    /// the PostgreSQL user (backups read the data directory; restores must create files the
    /// server owns).
    pub fn run<S: AsRef<OsStr>>(&self, agent: &str, args: impl IntoIterator<Item = S>) -> Finished {
        assert!(
            [ARCHIVE_AGENT, RESTORE_AGENT].contains(&agent),
            "unknown agent {agent:?}"
        );
        let mut cmd = agent_command(&self.dir.path().join(agent));
        cmd.args(args);
        run_agent(&mut cmd)
    }

    /// A command for `agent` (not started) as [`Agents::run`] runs it: as the PostgreSQL user,
    /// with no walvault settings from the caller's environment. For long-running subcommands
    /// (`archive-agent daemon`) that the caller spawns and watches itself.
    pub fn command(&self, agent: &str) -> Command {
        assert!(
            [ARCHIVE_AGENT, RESTORE_AGENT].contains(&agent),
            "unknown agent {agent:?}"
        );
        agent_command(&self.dir.path().join(agent))
    }

    /// `archive-agent push <repo args> <extra...> <wal_path>`, run as PostgreSQL would.
    pub fn push(&self, repo: &Repo, wal_path: impl AsRef<OsStr>, extra: &[&str]) -> Finished {
        let mut cmd = agent_command(&self.archive_agent());
        cmd.arg("push").args(repo.args()).args(extra).arg(wal_path);
        run_agent(&mut cmd)
    }

    /// `archive-agent push <repo_args...> <extra...> <wal_path>`, for repositories that are not a
    /// [`Repo`].
    pub fn push_with(&self, repo_args: &[String], wal_path: impl AsRef<OsStr>, extra: &[&str]) -> Finished {
        let mut cmd = agent_command(&self.archive_agent());
        cmd.arg("push").args(repo_args).args(extra).arg(wal_path);
        run_agent(&mut cmd)
    }

    /// `restore-agent fetch <repo_args...> <extra...> <name> <dest>`, for repositories that are
    /// not a [`Repo`].
    pub fn fetch_with(
        &self,
        repo_args: &[String],
        name: impl AsRef<OsStr>,
        dest: &Path,
        extra: &[&str],
    ) -> Finished {
        let mut cmd = agent_command(&self.restore_agent());
        cmd.arg("fetch").args(repo_args).args(extra).arg(name).arg(dest);
        run_agent(&mut cmd)
    }

    /// `restore-agent fetch <repo args> <extra...> <name> <dest>`, run as PostgreSQL would.
    pub fn fetch(&self, repo: &Repo, name: impl AsRef<OsStr>, dest: &Path, extra: &[&str]) -> Finished {
        let mut cmd = agent_command(&self.restore_agent());
        cmd.arg("fetch").args(repo.args()).args(extra).arg(name).arg(dest);
        run_agent(&mut cmd)
    }
}

/// A command for one agent, with no walvault settings leaking in from the caller's environment.
fn agent_command(bin: &Path) -> Command {
    let mut cmd = host::pg_user_command(bin);
    for var in [
        "WALVAULT_REPO",
        "WALVAULT_FALLBACK_REPO",
        "WALVAULT_CONFIG",
        "WALVAULT_COMPRESS_LEVEL",
        "WALVAULT_RETRY_TIMEOUT",
        "WALVAULT_MAX_RATE",
        "WALVAULT_ENCRYPTION_KEY_FILE",
        "WALVAULT_ENCRYPTION_KEY_COMMAND",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("WALVAULT_LOG", "info");
    cmd
}

fn run_agent(cmd: &mut Command) -> Finished {
    host::run(cmd, AGENT_RUN_LIMIT).unwrap_or_else(|e| panic!("{e:#}"))
}

fn join_words(words: &[&str]) -> String {
    words
        .iter()
        .filter(|w| !w.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where cargo put the agents: `WALVAULT_BIN_DIR`, else `target/<profile>/` above the running
/// executable (tests run from `target/<profile>/deps/`, the demo from `target/<profile>/`).
/// The error says how to build them.
pub fn find_bin_dir() -> Result<PathBuf> {
    let has_agents = |d: &Path| [ARCHIVE_AGENT, RESTORE_AGENT].iter().all(|b| d.join(b).is_file());
    if let Some(dir) = std::env::var_os("WALVAULT_BIN_DIR") {
        let dir = PathBuf::from(dir);
        anyhow::ensure!(
            has_agents(&dir),
            "WALVAULT_BIN_DIR={} does not contain both {ARCHIVE_AGENT} and {RESTORE_AGENT}",
            dir.display()
        );
        return Ok(dir);
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut searched = Vec::new();
    for dir in exe.ancestors().skip(1).take(3) {
        if has_agents(dir) {
            return Ok(dir.to_path_buf());
        }
        searched.push(dir.display().to_string());
    }
    let profile = if cfg!(debug_assertions) { "" } else { " --release" };
    anyhow::bail!(
        "{ARCHIVE_AGENT} and {RESTORE_AGENT} not found (looked in {}). Build them first with the same \
         profile as the tests: `cargo build --workspace --bins{profile}`, or set WALVAULT_BIN_DIR",
        searched.join(", ")
    )
}
