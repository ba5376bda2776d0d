//! `restore-agent extract`: one table (or several, or whole schemas) of one database back from
//! any instant, as a dump or into the live database, without restoring the whole cluster.
//!
//! The steps, each refused before the next begins:
//! 1. the options ([`options`], pure): what is selected, where it goes, the names it gets;
//! 2. the plan of a partial restore (`restore --database`, [`crate::commands::restore`]) of
//!    that database to the target into a private scratch directory: an unknown database or a
//!    target outside the restorable window is refused here;
//! 3. the programs ([`tools`]): PostgreSQL's server of the backup's version, `pg_dump` (and
//!    `pg_restore`, `psql` for `--into`) of that version or newer;
//! 4. with `--into`, the live database ([`live`]): the names the copy gets must be free;
//! 5. room in the scratch directory for what the restore writes;
//! 6. the restore, then a private server on it ([`crate::commands::private_server`], as
//!    `drill` runs one: socket only, archiving off), waited on until recovery ends;
//! 7. the copy made ready ([`copy`]): the selection checked against what existed at the target,
//!    `--where` applied, names moved out of the live database's way;
//! 8. `pg_dump` of the selection, then `--to` renames it into place, or `--into` loads it with
//!    `pg_restore` in one transaction and counts the rows that arrived.
//!
//! The private server is stopped and the scratch directory removed on every path: success,
//! failure, and a caller dropping the future (Ctrl-C; the binary does that).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::catalog::Catalog;
use crate::commands::private_server::{self as server, ScratchGuard, Server, ServerError};
use crate::commands::restore::{self, RestoreError, RestoreOptions, RestorePlan, TablespacePlacement};
use crate::config::Settings;
use crate::report::Report;

pub mod live;
pub mod options;
pub mod prepare;
pub mod tools;

pub use options::{Destination, ExtractOptions, QualifiedName, Selection, SelectionError};
pub use prepare::{CopyError, ExtractedTable, Prepared};
pub use tools::{ClientTools, ToolError};

/// Room kept free in the scratch directory beyond the restored files: WAL segments replayed
/// (restore_command brings them one at a time, recovery recycles them), pages the replay writes
/// into the databases left as holes, the server's log, the dump.
const SCRATCH_MARGIN: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error(transparent)]
    Selection(#[from] SelectionError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Repo(#[from] crate::repo::RepoError),
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Copy(#[from] CopyError),
    #[error("scratch directory {}: {source}", dir.display())]
    Scratch { dir: PathBuf, source: std::io::Error },
    #[error(
        "scratch directory {}: {available} bytes free, the restore needs {needed}; choose another with --scratch DIR",
        dir.display()
    )]
    NoRoom {
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("--into: {} already in the live database; choose a name with --rename-to", names.join(", "))]
    Taken { names: Vec<String> },
    #[error("--to {}: {source}", path.display())]
    Output { path: PathBuf, source: std::io::Error },
    #[error("database {0}: the backup's relation map does not name it; give its name")]
    Unnamed(String),
    #[error("no free port for the private server: {0}")]
    Port(std::io::Error),
}

/// What extract did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExtractReport {
    pub database: String,
    pub backup: String,
    pub pg_version: u32,
    /// The target, as restore names it.
    pub target: String,
    #[serde(flatten)]
    pub prepared: Prepared,
    /// `--to`: the dump written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dump: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dump_bytes: Option<u64>,
    /// `--into`: the live database (password redacted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub into: Option<String>,
    /// `pg_dump`'s directory and major version.
    pub pg_dump: String,
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    pub restore_seconds: f64,
    pub recovery_seconds: f64,
    pub seconds: f64,
}

/// Extract `opts.selection` from the repository of `settings`.
pub async fn extract(settings: &Settings, opts: &ExtractOptions) -> Result<ExtractReport, ExtractError> {
    let started = Instant::now();
    opts.check()?;
    let reader = settings.open_reader().await?;
    let cat = Catalog::load_outlines(&reader).await?;
    let id = crate::time::format_compact(crate::time::now_micros().div_euclid(1_000_000));
    let scratch = server::make_scratch(opts.scratch.as_deref(), "extract", &id).map_err(|source| {
        ExtractError::Scratch {
            dir: opts.scratch.clone().unwrap_or_else(std::env::temp_dir),
            source,
        }
    })?;
    let _guard = ScratchGuard {
        dir: scratch.clone(),
        keep: opts.keep,
        purpose: "extract",
    };
    let pgdata = scratch.join("data");
    let (plan, manifest) =
        restore::prepare(settings, &reader, &cat, &restore_options(opts, &scratch, &pgdata)).await?;
    drop(cat);
    let major = plan.backup.pg_version;
    let bin = server::find_pg_bin(opts.pg_bin.as_deref(), major).await?;
    let into = match &opts.destination {
        Destination::Into { conninfo, .. } => Some(conninfo.as_str()),
        Destination::File(_) => None,
    };
    let programs: &[&str] = match into {
        Some(_) => &["pg_dump", "pg_restore", "psql"],
        None => &["pg_dump"],
    };
    let tools = ClientTools::find(opts.pg_bin.as_deref(), major, programs).await?;
    if let Some(conninfo) = into {
        check_free(&tools, conninfo, &first_names(opts)).await?;
    }
    check_room(&scratch, &plan)?;
    let target = plan.recovery.target().describe();
    let database = database_name(opts, &plan)?;

    let restored = restore::restore_planned(&reader, plan, manifest, Arc::new(restore::NoProgress)).await?;
    let s = start_server(opts, &scratch, pgdata, bin).await?;
    let t = Instant::now();
    s.wait_recovered(opts.timeout).await?;
    let recovery_seconds = t.elapsed().as_secs_f64();

    let postgres = s.connect("postgres").await.map_err(ServerError::from)?;
    prepare::check_database(&postgres, &database, &target).await?;
    drop(postgres);
    let client = s.connect(&database).await.map_err(ServerError::from)?;
    let prepared = prepare::prepare(&client, opts, &target, into.is_some()).await?;
    drop(client);
    let mut report = ExtractReport {
        database: database.clone(),
        backup: restored.backup.to_string(),
        pg_version: major,
        target,
        prepared,
        dump: None,
        dump_bytes: None,
        into: into.map(live::redact),
        pg_dump: format!("{} (PostgreSQL {})", tools.dir.display(), tools.major),
        chunks_fetched: restored.chunks_fetched,
        bytes_fetched: restored.bytes_fetched,
        restore_seconds: restored.seconds,
        recovery_seconds,
        seconds: 0.0,
    };
    deliver(opts, &tools, &s, &scratch, &mut report, &database).await?;
    s.stop().await;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The partial restore extract runs: the one database, to the target, promoted there, into the
/// scratch directory (tablespaces under it too).
fn restore_options(opts: &ExtractOptions, scratch: &Path, pgdata: &Path) -> RestoreOptions {
    RestoreOptions {
        target: opts.target.clone(),
        timeline: opts.timeline,
        exclusive: opts.exclusive,
        parallel: opts.parallel,
        databases: vec![opts.database.clone()],
        tablespaces: TablespacePlacement {
            all_under: Some(scratch.join("tablespaces")),
            ..Default::default()
        },
        ..RestoreOptions::new(pgdata, opts.restore_command.clone())
    }
}

/// The name of the database `--database` names (perhaps by oid), as the plan found it.
fn database_name(opts: &ExtractOptions, plan: &RestorePlan) -> Result<String, ExtractError> {
    plan.databases
        .iter()
        .flat_map(|d| &d.restored)
        .find(|d| d.name.as_deref() == Some(opts.database.as_str()) || d.oid.to_string() == opts.database)
        .and_then(|d| d.name.clone())
        .ok_or_else(|| ExtractError::Unnamed(opts.database.clone()))
}

/// The names the selection gets in the live database, known before the restore: the tables'
/// (or schemas') own; their indexes and sequences are checked once the copy names them.
fn first_names(opts: &ExtractOptions) -> (Vec<QualifiedName>, Vec<String>) {
    match &opts.selection {
        Selection::Tables(tables) => (
            tables
                .iter()
                .map(|t| QualifiedName {
                    schema: t.schema.clone(),
                    name: opts.new_name(&t.name),
                })
                .collect(),
            vec![],
        ),
        Selection::Schemas(schemas) => (vec![], schemas.iter().map(|s| opts.new_name(s)).collect()),
    }
}

/// Refuse when any of `names` exists in the live database.
async fn check_free(
    tools: &ClientTools,
    conninfo: &str,
    (relations, schemas): &(Vec<QualifiedName>, Vec<String>),
) -> Result<(), ExtractError> {
    let names = live::taken(tools, conninfo, relations, schemas).await?;
    match names.is_empty() {
        true => Ok(()),
        false => Err(ExtractError::Taken { names }),
    }
}

/// Refuse, before fetching anything, a scratch directory without room for what the restore
/// writes (the databases left out are holes, which take none) and [`SCRATCH_MARGIN`].
fn check_room(scratch: &Path, plan: &RestorePlan) -> Result<(), ExtractError> {
    let fs = rustix::fs::statvfs(scratch).map_err(|e| ExtractError::Scratch {
        dir: scratch.to_path_buf(),
        source: e.into(),
    })?;
    let available = fs.f_bavail.saturating_mul(fs.f_frsize);
    let needed = plan.files.bytes_to_write + SCRATCH_MARGIN;
    match available >= needed {
        true => Ok(()),
        false => Err(ExtractError::NoRoom {
            dir: scratch.to_path_buf(),
            needed,
            available,
        }),
    }
}

/// The private server on the restored `pgdata`, started.
async fn start_server(
    opts: &ExtractOptions,
    scratch: &Path,
    pgdata: PathBuf,
    bin: PathBuf,
) -> Result<Server, ExtractError> {
    let user = server::os_user(opts.run_as.as_deref());
    let port = server::free_port().map_err(ExtractError::Port)?;
    server::write_private_conf(&pgdata, scratch, port, "extract")?;
    if let Some(u) = &user {
        server::chown_tree(scratch, u).await?;
    }
    let db_user = user.clone().unwrap_or_else(server::current_user);
    let s = Server::new(bin, pgdata, scratch, port, user, db_user);
    s.start().await?;
    Ok(s)
}

/// Dump the prepared copy; write it to `--to`, or load it `--into` the live database.
async fn deliver(
    opts: &ExtractOptions,
    tools: &ClientTools,
    s: &Server,
    scratch: &Path,
    report: &mut ExtractReport,
    database: &str,
) -> Result<(), ExtractError> {
    match &opts.destination {
        Destination::File(path) => {
            // Written beside the destination, renamed into place once whole.
            let partial = partial_path(path);
            let dumped = dump(tools, s, database, &report.prepared, &partial).await;
            if let Err(e) = dumped {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
            let output = |source| ExtractError::Output {
                path: path.clone(),
                source,
            };
            std::fs::File::open(&partial)
                .and_then(|f| f.sync_all())
                .map_err(output)?;
            std::fs::rename(&partial, path).map_err(output)?;
            report.dump_bytes = Some(std::fs::metadata(path).map_err(output)?.len());
            report.dump = Some(path.clone());
        }
        Destination::Into { conninfo, .. } => {
            // Every name the dump creates, now that the copy has named them all.
            let schemas = report.prepared.schemas.iter().map(|(_, to)| to.clone()).collect();
            check_free(tools, conninfo, &(report.prepared.relations.clone(), schemas)).await?;
            let file = scratch.join("extract.dump");
            dump(tools, s, database, &report.prepared, &file).await?;
            live::load(tools, conninfo, &file).await?;
            let delivered: Vec<QualifiedName> = report
                .prepared
                .tables
                .iter()
                .map(|t| t.delivered.clone())
                .collect();
            let rows = live::rows(tools, conninfo, &delivered).await?;
            for (t, n) in report.prepared.tables.iter_mut().zip(rows) {
                t.rows = n;
            }
        }
    }
    Ok(())
}

/// `pg_dump` of the prepared selection, custom format, into `file`.
async fn dump(
    tools: &ClientTools,
    s: &Server,
    database: &str,
    prepared: &Prepared,
    file: &Path,
) -> Result<(), ExtractError> {
    let mut c = tools.command("pg_dump");
    c.args(s.client_args())
        .args(["--format=custom", "--no-sync", "--dbname"])
        .arg(database)
        .args(&prepared.dump_args)
        .arg("--file")
        .arg(file);
    tools::run("pg_dump", c).await?;
    Ok(())
}

/// `<path>.partial-<random>`, in the same directory.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".partial-{:08x}", rand::random::<u32>()));
    path.with_file_name(name)
}

impl Report for ExtractReport {
    fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "extracted from database {} at {} (backup {}, PostgreSQL {}):",
            self.database, self.target, self.backup, self.pg_version
        );
        for (from, to) in &self.prepared.schemas {
            let _ = writeln!(out, "  schema {from} -> {to}");
        }
        for t in &self.prepared.tables {
            let _ = match t.recorded == t.delivered {
                true => writeln!(out, "  table {}: {} rows", t.recorded, t.rows),
                false => writeln!(out, "  table {} -> {}: {} rows", t.recorded, t.delivered, t.rows),
            };
        }
        for r in &self.prepared.renamed {
            let _ = writeln!(out, "  {r}");
        }
        for l in &self.prepared.left_out {
            let _ = writeln!(out, "  left out: {l}");
        }
        match (&self.dump, &self.into) {
            (Some(path), _) => {
                let _ = writeln!(
                    out,
                    "wrote {} ({} bytes, custom format: pg_restore -d DB {} restores it)",
                    path.display(),
                    self.dump_bytes.unwrap_or(0),
                    path.display()
                );
            }
            (None, Some(db)) => {
                let _ = writeln!(
                    out,
                    "created in {db}, in one transaction (owned by the role connecting, no grants)"
                );
            }
            (None, None) => {}
        }
        let _ = writeln!(
            out,
            "fetched {} distinct chunks ({} bytes); restore {:.1}s, recovery {:.1}s, total {:.1}s; pg_dump from {}",
            self.chunks_fetched,
            self.bytes_fetched,
            self.restore_seconds,
            self.recovery_seconds,
            self.seconds,
            self.pg_dump
        );
        out
    }
}

/// How long extract waits for the private server's recovery when not told.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
