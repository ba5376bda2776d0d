//! The client programs extract runs: `pg_dump` (and for `--into`, `pg_restore` and `psql`) of
//! the backup's major version or newer (pg_dump reads older servers, never newer ones), found
//! before anything is fetched; and running them with their output kept for the error message.

use std::path::{Path, PathBuf};

/// The newest major version looked for.
const NEWEST_MAJOR: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// `seen` says what each candidate directory held.
    #[error(
        "no {programs} of PostgreSQL {major} or newer found ({seen}); install that version's client programs or pass --pg-bin DIR"
    )]
    Missing {
        programs: String,
        major: u32,
        seen: String,
    },
    #[error("{program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    /// `stderr` is the program's own message, trimmed to its last lines.
    #[error("{program} failed: {stderr}")]
    Failed { program: String, stderr: String },
}

/// One directory holding every client program extract needs, of major version `major`.
#[derive(Debug, Clone)]
pub struct ClientTools {
    pub dir: PathBuf,
    pub major: u32,
}

impl ClientTools {
    /// The first directory holding all of `programs` at a major version from `at_least` on:
    /// `given` (`--pg-bin`), then `/usr/lib/postgresql/<v>/bin` and `/usr/pgsql-<v>/bin` from
    /// `at_least` up, then `pg_config --bindir`, then each directory of `PATH`.
    pub async fn find(
        given: Option<&Path>,
        at_least: u32,
        programs: &[&str],
    ) -> Result<ClientTools, ToolError> {
        let mut seen = Vec::new();
        for dir in candidates(given, at_least).await {
            if seen.iter().any(|(d, _): &(PathBuf, String)| *d == dir) {
                continue;
            }
            match version_of(&dir, programs).await {
                Ok(major) if major >= at_least => return Ok(ClientTools { dir, major }),
                Ok(major) => seen.push((dir, format!("PostgreSQL {major}"))),
                Err(missing) => seen.push((dir, format!("no {missing}"))),
            }
        }
        let seen: Vec<String> = seen
            .iter()
            .filter(|(d, _)| d.exists())
            .map(|(d, what)| format!("{}: {what}", d.display()))
            .collect();
        Err(ToolError::Missing {
            programs: programs.join(", "),
            major: at_least,
            seen: match seen.is_empty() {
                true => format!(
                    "looked in --pg-bin, /usr/lib/postgresql/{at_least}..{NEWEST_MAJOR}/bin, /usr/pgsql-<version>/bin, pg_config --bindir and PATH"
                ),
                false => format!(
                    "looked in --pg-bin, /usr/lib/postgresql/<version>/bin, /usr/pgsql-<version>/bin, pg_config --bindir and PATH; {}",
                    seen.join("; ")
                ),
            },
        })
    }

    /// `program` of these tools, its output captured, killed if extract is dropped (Ctrl-C).
    pub fn command(&self, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(self.dir.join(program));
        c.stdin(std::process::Stdio::null()).kill_on_drop(true);
        c
    }
}

/// Where the programs are looked for, in order: the closest version first (it reads the
/// backup's server best).
async fn candidates(given: Option<&Path>, at_least: u32) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = given.map(Path::to_path_buf).into_iter().collect();
    for v in at_least..=NEWEST_MAJOR {
        dirs.push(PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")));
        dirs.push(PathBuf::from(format!("/usr/pgsql-{v}/bin")));
    }
    dirs.extend(crate::commands::private_server::pg_config_bindir().await);
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs
}

/// What a directory lacks: the program missing there, or of another version than the others.
struct Lacking(String);

impl std::fmt::Display for Lacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The major version of `programs` in `dir` (all must be there and agree), or what is lacking.
async fn version_of(dir: &Path, programs: &[&str]) -> Result<u32, Lacking> {
    let mut major = None;
    for p in programs {
        let v = program_major(&dir.join(p))
            .await
            .ok_or_else(|| Lacking(p.to_string()))?;
        if *major.get_or_insert(v) != v {
            return Err(Lacking(format!("{p} of the same version")));
        }
    }
    major.ok_or_else(|| Lacking("programs".into()))
}

/// The major version `program --version` reports (`pg_dump (PostgreSQL) 15.14 (Debian ...)`).
async fn program_major(program: &Path) -> Option<u32> {
    if !program.is_file() {
        return None;
    }
    let out = tokio::process::Command::new(program)
        .arg("--version")
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split_whitespace().nth(2)?;
    v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Run `c` (named `program` in messages) to success; its stdout.
pub async fn run(program: &str, mut c: tokio::process::Command) -> Result<String, ToolError> {
    let out = c.output().await.map_err(|source| ToolError::Spawn {
        program: program.to_string(),
        source,
    })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines[lines.len().saturating_sub(3)..].join(" / ");
    Err(ToolError::Failed {
        program: program.to_string(),
        stderr: match last.is_empty() {
            true => format!("exit status {}", out.status),
            false => last,
        },
    })
}
