//! Another invocation of an agent, with the repository settings this one was given: the
//! `restore_command` a restore writes (`restore-agent fetch ... %f %p`), the restores `find`
//! prints, the prefetcher `fetch` starts, and the one bounded call push and fetch each make.
//!
//! One type builds them all ([`AgentCommand`]), so that every printed or written form carries
//! the same settings: the repository, the configuration file (absolute, so that it holds from
//! any working directory, and the place for the store's credentials, which therefore never
//! appear on a command line), the retry timeout, and a key file named by
//! `WALVAULT_ENCRYPTION_KEY_FILE` (as the same variable: a path, never the key). A key command
//! from the environment is not copied: it may hold a token, and PostgreSQL logs
//! `restore_command` ([`RepoInvocation::key_command_left_out`]).

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config::{RepoArgs, Settings};
use crate::repo::keys::KeySource;

/// The repository settings another invocation needs to reach the repository this one reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoInvocation {
    /// The repository's URL, as resolved (from the flag, the environment or the file).
    pub repo: String,
    /// `--config`, absolute.
    pub config: Option<PathBuf>,
    /// `--retry-timeout`, as given.
    pub retry_timeout: Option<String>,
    /// restore-agent's `--fallback-repo`, as given (from the file, `--config` carries it).
    pub fallback_repo: Option<String>,
    /// `WALVAULT_ENCRYPTION_KEY_FILE`, absolute, when the key came from it.
    pub key_file: Option<PathBuf>,
    /// Whether the key came from `WALVAULT_ENCRYPTION_KEY_COMMAND`, which is not copied.
    pub key_command_left_out: bool,
}

impl RepoInvocation {
    /// The settings `given` on this command line resolved to `settings`.
    pub fn new(settings: &Settings, given: &RepoArgs) -> std::io::Result<RepoInvocation> {
        let (key_file, key_command_left_out) = match (&settings.key, settings.key_from_env) {
            (Some(KeySource::File(path)), true) => (Some(std::path::absolute(path)?), false),
            (Some(KeySource::Command(_)), true) => (None, true),
            _ => (None, false),
        };
        Ok(RepoInvocation {
            repo: settings.repo.as_str().to_string(),
            config: given.config.as_deref().map(std::path::absolute).transpose()?,
            retry_timeout: given.retry_timeout.clone(),
            fallback_repo: given.fallback_repo.clone(),
            key_file,
            key_command_left_out,
        })
    }

    /// The flags that give another invocation these settings (the key file goes in its
    /// environment: see [`AgentCommand::env`]).
    pub fn flags(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--repo".into(), self.repo.clone().into()];
        if let Some(c) = &self.config {
            args.extend(["--config".into(), c.into()]);
        }
        if let Some(t) = &self.retry_timeout {
            args.extend(["--retry-timeout".into(), t.into()]);
        }
        if let Some(f) = &self.fallback_repo {
            args.extend(["--fallback-repo".into(), f.into()]);
        }
        args
    }
}

/// The `restore_command` line a restored server runs: `restore_agent fetch` with the settings
/// `given` on this command line (resolved to `settings`). Warns when the key command is left out.
pub fn restore_command_line(
    restore_agent: &std::path::Path,
    settings: &Settings,
    given: &RepoArgs,
) -> std::io::Result<String> {
    let repo = RepoInvocation::new(settings, given)?;
    if repo.key_command_left_out {
        tracing::warn!(
            "the key command comes from WALVAULT_ENCRYPTION_KEY_COMMAND, which restore_command does not copy: give the restored server the same variable, or put key_command in the [encryption] table of --config"
        );
    }
    Ok(AgentCommand::restore_command(restore_agent, &repo).shell_line())
}

/// A word of a command line: quoted for `sh` when written as a line, or, for the `%f` and `%p`
/// PostgreSQL substitutes, written as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Word {
    Quoted(OsString),
    Placeholder(&'static str),
}

/// An agent's command line: the program, its subcommand, the repository settings and the
/// subcommand's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCommand {
    program: PathBuf,
    subcommand: &'static str,
    repo: RepoInvocation,
    args: Vec<Word>,
}

impl AgentCommand {
    /// `program subcommand` with the settings of `repo`.
    pub fn new(program: impl Into<PathBuf>, subcommand: &'static str, repo: &RepoInvocation) -> AgentCommand {
        AgentCommand {
            program: program.into(),
            subcommand,
            repo: repo.clone(),
            args: vec![],
        }
    }

    /// The `restore_command` a restored server runs: `restore_agent fetch ... %f %p`.
    pub fn restore_command(restore_agent: impl Into<PathBuf>, repo: &RepoInvocation) -> AgentCommand {
        AgentCommand::new(restore_agent, "fetch", repo)
            .placeholder("%f")
            .placeholder("%p")
    }

    /// The same program with the same repository settings, running `subcommand`, without this
    /// command's arguments.
    pub fn sibling(&self, subcommand: &'static str) -> AgentCommand {
        AgentCommand::new(self.program.clone(), subcommand, &self.repo)
    }

    /// With `arg` appended.
    pub fn arg(mut self, arg: impl Into<OsString>) -> AgentCommand {
        self.args.push(Word::Quoted(arg.into()));
        self
    }

    /// With `args` appended.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> AgentCommand {
        self.args.extend(args.into_iter().map(|a| Word::Quoted(a.into())));
        self
    }

    /// With `%f` or `%p` appended, unquoted.
    fn placeholder(mut self, p: &'static str) -> AgentCommand {
        self.args.push(Word::Placeholder(p));
        self
    }

    /// The program run.
    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// The words after the program: the subcommand, the repository's flags, then the
    /// subcommand's arguments.
    fn words(&self) -> impl Iterator<Item = Word> + '_ {
        std::iter::once(Word::Quoted(self.subcommand.into()))
            .chain(self.repo.flags().into_iter().map(Word::Quoted))
            .chain(self.args.iter().cloned())
    }

    /// The arguments after the program, for a child process (see [`AgentCommand::words`]).
    pub fn argv(&self) -> Vec<OsString> {
        self.words()
            .map(|w| match w {
                Word::Quoted(a) => a,
                Word::Placeholder(p) => p.into(),
            })
            .collect()
    }

    /// The environment the command needs besides its flags: the key file's variable.
    pub fn env(&self) -> Vec<(&'static str, OsString)> {
        self.repo
            .key_file
            .iter()
            .map(|p| ("WALVAULT_ENCRYPTION_KEY_FILE", p.clone().into_os_string()))
            .collect()
    }

    /// The command as one `sh` line: the key file's variable first, then every word quoted
    /// (the placeholders excepted).
    pub fn shell_line(&self) -> String {
        let mut words: Vec<String> = self
            .env()
            .iter()
            .map(|(k, v)| format!("{k}={}", sh_quote(&v.to_string_lossy())))
            .collect();
        words.push(sh_quote(&self.program.to_string_lossy()));
        words.extend(self.words().map(|w| match w {
            Word::Quoted(a) => sh_quote(&a.to_string_lossy()),
            Word::Placeholder(p) => p.to_string(),
        }));
        words.join(" ")
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation(key_file: Option<&str>) -> RepoInvocation {
        RepoInvocation {
            repo: "s3://bucket/my repo".into(),
            config: Some("/etc/wal vault/w.toml".into()),
            retry_timeout: Some("5m".into()),
            fallback_repo: None,
            key_file: key_file.map(PathBuf::from),
            key_command_left_out: false,
        }
    }

    /// Run `line` with `sh` as PostgreSQL does, the program being a script that prints each
    /// argument on a line of its own and the key file's variable: what the agent would get.
    fn run(line: &str, dir: &std::path::Path) -> Vec<String> {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(
                line.replace("%f", "000000010000000000000003")
                    .replace("%p", "pg_wal/RECOVERYXLOG"),
            )
            .current_dir(dir)
            .env_remove("WALVAULT_ENCRYPTION_KEY_FILE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn echo_program(dir: &std::path::Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let program = dir.join("restore agent");
        std::fs::write(
            &program,
            "#!/bin/sh\necho \"key=${WALVAULT_ENCRYPTION_KEY_FILE-unset}\"\nfor a in \"$@\"; do echo \"$a\"; done\n",
        )
        .unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        program
    }

    /// Each form printed or written runs with every setting given, each argument intact.
    #[test]
    fn every_printed_form_runs_with_every_setting() {
        let dir = tempfile::tempdir().unwrap();
        let program = echo_program(dir.path());
        let with_key = invocation(Some("/keys/it's.key"));
        let fetch = AgentCommand::restore_command(&program, &with_key);
        let got = run(&fetch.shell_line(), dir.path());
        assert_eq!(
            got,
            [
                "key=/keys/it's.key",
                "fetch",
                "--repo",
                "s3://bucket/my repo",
                "--config",
                "/etc/wal vault/w.toml",
                "--retry-timeout",
                "5m",
                "000000010000000000000003",
                "pg_wal/RECOVERYXLOG"
            ]
        );
        // The child process form gives the same arguments.
        let mut argv: Vec<String> = fetch
            .argv()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        argv[7] = "000000010000000000000003".into();
        argv[8] = "pg_wal/RECOVERYXLOG".into();
        assert_eq!(got[1..], argv[..]);

        let find = AgentCommand::new(&program, "restore", &invocation(None))
            .args(["--pgdata", "/srv/data 2"])
            .args([
                "--target-time",
                "2026-11-25 14:31:59.123456+00",
                "--target-exclusive",
            ]);
        let got = run(&find.shell_line(), dir.path());
        assert_eq!(got[0], "key=unset");
        assert_eq!(
            got[1..],
            [
                "restore",
                "--repo",
                "s3://bucket/my repo",
                "--config",
                "/etc/wal vault/w.toml",
                "--retry-timeout",
                "5m",
                "--pgdata",
                "/srv/data 2",
                "--target-time",
                "2026-11-25 14:31:59.123456+00",
                "--target-exclusive"
            ]
        );
    }

    /// A key command from the environment is not written into a command line.
    #[test]
    fn a_key_command_from_the_environment_is_left_out() {
        let s = Settings::resolve(
            &RepoArgs {
                repo: Some("file:///r".into()),
                ..Default::default()
            },
            None,
            crate::config::KeyEnv {
                file: None,
                command: Some("vault read secret".into()),
            },
            std::path::Path::new("/nonexistent"),
        )
        .unwrap();
        let inv = RepoInvocation::new(&s, &RepoArgs::default()).unwrap();
        assert!(inv.key_command_left_out && inv.key_file.is_none());
        let line = AgentCommand::restore_command("/usr/bin/restore-agent", &inv).shell_line();
        assert_eq!(line, "/usr/bin/restore-agent fetch --repo file:///r %f %p");
        assert!(!line.contains("vault"));
    }

    /// The restored server's restore_command reads from the same fallback repository.
    #[test]
    fn a_fallback_repository_given_is_passed_on() {
        let given = RepoArgs {
            repo: Some("file:///r".into()),
            fallback_repo: Some("s3://dr/walvault".into()),
            ..Default::default()
        };
        let s = Settings::resolve(
            &given,
            None,
            Default::default(),
            std::path::Path::new("/nonexistent"),
        )
        .unwrap();
        let inv = RepoInvocation::new(&s, &given).unwrap();
        let line = AgentCommand::restore_command("/usr/bin/restore-agent", &inv).shell_line();
        assert_eq!(
            line,
            "/usr/bin/restore-agent fetch --repo file:///r --fallback-repo s3://dr/walvault %f %p"
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("plain/path-1.2"), "plain/path-1.2");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
    }
}
