//! A restore decided before anything is written ([`RestorePlan`]): which backup, to which target
//! on which timeline, which files go where, the recovery configuration that will be written and
//! the replay expected. [`build`] computes it with reads only (the catalog, the target
//! directories and, with `--delta`, the content of the files already there);
//! `restore-agent restore --dry-run` prints it, and the executor ([`super::execute`]) carries out
//! exactly this value.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::delta::{self, DeltaComparison, DeltaReport};
use super::error::{damaged, entries_error};
use super::partial::{self, PlannedDatabases};
use super::placement::{check_before_writing, is_empty_dir, place_tablespaces};
use super::select::{ReplaySpan, choose_backup, replay_span};
use super::{RestoreError, RestoreOptions, TimelineTarget};
use crate::basebackup::BackupId;
use crate::basebackup::manifest::Manifest;
use crate::basebackup::manifest::paged::PagedManifest;
use crate::catalog::Catalog;
use crate::recovery_conf::{RecoverySettings, RecoveryTarget, quote};
use crate::repo::Store;
use crate::repo::object::Sealer;
use crate::report::{Report, table};
use crate::wal::{Lsn, TimelineId};

/// Everything a restore will do, decided and checked before the first write. Where recovery
/// stops is [`PlannedRecovery::target`].
#[derive(Debug, Clone)]
pub struct RestorePlan {
    /// The data directory restored into, as given.
    pub pgdata: PathBuf,
    /// The repository, as walvault prints it (credentials redacted).
    pub repository: String,
    pub backup: PlannedBackup,
    pub timeline: PlannedTimeline,
    pub files: PlannedFiles,
    /// Where each tablespace goes: oid -> directory (never the manifest's own location unless
    /// `--tablespace-original` says so).
    pub tablespaces: BTreeMap<u32, PathBuf>,
    /// With `--database`: the databases restored and those left zeroed.
    pub databases: Option<PlannedDatabases>,
    pub recovery: PlannedRecovery,
    /// The segments replay goes through, as far as the repository tells.
    pub replay: Option<ReplaySpan>,
    /// What was checked of the directories and the manifest, in order.
    pub checks: Vec<String>,
    /// The cluster's WAL segment size, for the replay plan file.
    pub(crate) wal_segment_size: u32,
    /// Chunks fetched and written at once (`--parallel`): how, not what.
    pub(crate) parallel: usize,
    /// How the files written are made durable (`--sync-method`): how, not what.
    pub(crate) sync: super::SyncMethod,
    /// With `--delta`: the comparison of every existing file, consumed by the executor.
    pub(crate) delta_work: Option<DeltaComparison>,
}

/// The backup restored.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedBackup {
    pub id: BackupId,
    /// PostgreSQL major version of the backup: the server that must recover it.
    pub pg_version: u32,
    pub timeline: TimelineId,
    pub start_lsn: Lsn,
    /// Where the backup became consistent: no target before it can be reached.
    pub consistent_lsn: Lsn,
    pub consistent_at: String,
}

/// The timeline recovery follows, and how it was chosen.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedTimeline {
    /// `latest`, `current` or `id` (`--target-timeline`).
    pub chosen_by: &'static str,
    pub id: TimelineId,
    /// As restore reports it: `latest (currently 2)`, `current (1)`, `3`.
    pub description: String,
}

/// How the data directory is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectoryUse {
    /// It does not exist: created.
    Create,
    /// It exists and is empty.
    UseEmpty,
    /// Its contents are removed first (`--force`).
    Replace,
    /// Rewritten where it differs from the backup (`--delta`).
    Rewrite,
}

/// The files the backup brings, and what writing them takes.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedFiles {
    pub directory: DirectoryUse,
    pub files: u64,
    pub directories: u64,
    /// Bytes the backup's files add up to.
    pub bytes: u64,
    /// Bytes written into files: all of them, or with `--delta` the chunks that differ.
    pub bytes_to_write: u64,
    /// With `--delta`: what the comparison found and what will be rewritten and removed.
    pub delta: Option<DeltaReport>,
}

/// What the writer of the recovery configuration ([`super::recovery_files`]) puts into the data
/// directory: the recovery settings, rendered by [`PlannedRecovery::render`], and the files.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedRecovery {
    #[serde(flatten)]
    pub settings: RecoverySettings,
    /// The signal file that starts archive recovery.
    pub signal_file: &'static str,
    /// Files written into the data directory after the backup's, in order.
    pub writes: Vec<&'static str>,
}

impl PlannedRecovery {
    /// Where recovery stops.
    pub fn target(&self) -> &RecoveryTarget {
        &self.settings.target
    }

    /// The new `postgresql.auto.conf`, from the backup's own (`existing`): see
    /// [`RecoverySettings::render`].
    pub(crate) fn render(&self, existing: Option<&str>, header: &str) -> String {
        self.settings.render(existing, header)
    }
}

/// Decide the restore `opts` asks for, from catalog `cat` of the repository named `repository`
/// (sealed by `sealer`). Refuses, in this order: no backup reaching the target, a server running
/// on the directory, a non-empty directory (without `--force` or `--delta`), tablespaces not
/// placed or placed badly, a manifest that fails its checks, with `--delta` a directory that
/// is not a data directory. Writes nothing. Returns the plan and the chosen backup's manifest,
/// held as stored, its entries checked (and, with `--delta`, compared) in a pass of their own:
/// the executor reads them again as it writes.
pub(crate) async fn build(
    store: &Store,
    sealer: &Sealer,
    repository: String,
    cat: &Catalog,
    opts: &RestoreOptions,
) -> Result<(RestorePlan, PagedManifest), RestoreError> {
    let (chosen, timeline) = choose_backup(cat, opts.backup.as_ref(), &opts.target, opts.timeline)?;
    let mut paged = paged_manifest(store, sealer, chosen).await?;
    let pgdata = &opts.pgdata;
    let mut checks = Vec::new();
    let directory = check_directory(opts, &mut checks)?;
    let spaces = place_tablespaces(paged.frame(), opts)?;
    for (oid, path) in &spaces {
        let state = if opts.delta {
            "rewritten (--delta)"
        } else {
            "empty or absent"
        };
        checks.push(format!(
            "tablespace {oid} goes to {}: absolute, outside the data directory and every other tablespace, {state}",
            path.display()
        ));
    }
    let counts = check_before_writing(cat, &mut paged, opts, &spaces)?;
    let bytes = counts.bytes;
    // The directories alone, from here on.
    let m = paged.frame();
    if opts.delta && !opts.databases.is_empty() {
        return Err(RestoreError::DeltaWithDatabases);
    }
    let databases = partial::plan(store, sealer, m, &opts.databases).await?;
    if let Some(d) = &databases {
        checks.push(format!("--database: {}", d.describe()));
    }
    checks.push(format!(
        "manifest of backup {} validated: {} entries of system {}, the repository's; every destination within PATH_MAX",
        m.id,
        counts.files + counts.directories,
        m.system_identifier
    ));
    // Delta: every comparison before the first write, with every entry held.
    let delta_work = match opts.delta {
        true => {
            let whole = paged.whole().map_err(|d| damaged(paged.id().clone(), d))?;
            let work = delta::plan(sealer, &whole, pgdata, &spaces).await?;
            let to_write = work.bytes_to_write(&whole);
            Some((work, to_write))
        }
        false => None,
    };
    if delta_work.is_some() {
        checks.push(format!(
            "{} and every tablespace location look like PostgreSQL's (--delta)",
            pgdata.display()
        ));
    }
    let replay = replay_span(cat, m, timeline, &opts.target, opts.exclusive);
    let files = PlannedFiles {
        directory,
        files: counts.files,
        directories: counts.directories,
        bytes,
        bytes_to_write: match (&delta_work, &databases) {
            (Some((_, to_write)), _) => *to_write,
            (None, Some(d)) => bytes - zeroed_bytes(&paged, d)?,
            (None, None) => bytes,
        },
        delta: delta_work.as_ref().map(|(d, _)| d.report()),
    };
    let plan = RestorePlan {
        pgdata: pgdata.clone(),
        repository,
        backup: planned_backup(m),
        timeline: planned_timeline(opts.timeline, timeline),
        recovery: planned_recovery(opts, timeline, !spaces.is_empty(), replay.is_some()),
        files,
        tablespaces: spaces,
        databases,
        replay,
        checks,
        wal_segment_size: cat.wal_segment_size(),
        parallel: opts.parallel,
        sync: opts.sync,
        delta_work: delta_work.map(|(d, _)| d),
    };
    Ok((plan, paged))
}

/// The manifest of backup `chosen` held as stored ([`PagedManifest`]): read again, once, for the
/// one backup the restore writes (a catalog of outlines holds no entries). Its file records are
/// not read: they are the next backup's, never a restore's.
async fn paged_manifest(
    store: &Store,
    sealer: &Sealer,
    chosen: &Manifest,
) -> Result<PagedManifest, RestoreError> {
    if chosen.is_whole() {
        // A catalog read whole (a test's): the manifest it holds, as its document.
        return PagedManifest::of(chosen).map_err(|source| RestoreError::Manifest {
            backup: chosen.id.clone(),
            source: Box::new(source),
        });
    }
    Ok(crate::catalog::load_paged_manifest(store, sealer, &chosen.id).await?)
}

/// The data directory: refused when a server runs on it, else how it is used
/// ([`directory_use`]); what was checked is added to `checks`.
fn check_directory(opts: &RestoreOptions, checks: &mut Vec<String>) -> Result<DirectoryUse, RestoreError> {
    let pgdata = &opts.pgdata;
    if let Some(pid) = crate::local::pgdata::running_postmaster(pgdata) {
        return Err(RestoreError::ServerRunning {
            dir: pgdata.display().to_string(),
            pid,
        });
    }
    checks.push(format!(
        "no server runs on {} (no live postmaster.pid)",
        pgdata.display()
    ));
    let directory = directory_use(opts)?;
    checks.push(match directory {
        DirectoryUse::Create => format!("{} does not exist: it is created", pgdata.display()),
        DirectoryUse::UseEmpty => format!("{} is empty", pgdata.display()),
        DirectoryUse::Replace => format!(
            "{} is not empty: its contents are removed first (--force)",
            pgdata.display()
        ),
        DirectoryUse::Rewrite => format!(
            "{} is rewritten where it differs from the backup (--delta)",
            pgdata.display()
        ),
    });
    Ok(directory)
}

/// The bytes of the files a partial restore leaves zeroed (written as holes, never fetched): a
/// read of the entries of its own.
fn zeroed_bytes(paged: &PagedManifest, d: &PlannedDatabases) -> Result<u64, RestoreError> {
    let mut zeroed = 0u64;
    paged
        .files(|e| {
            if d.zeroes(&e.path) {
                zeroed += e.size;
            }
            Ok(())
        })
        .map_err(|e| entries_error(paged, e))?;
    Ok(zeroed)
}

/// How `opts.pgdata` is used; a non-empty one is refused without `--force` or `--delta`.
fn directory_use(opts: &RestoreOptions) -> Result<DirectoryUse, RestoreError> {
    if opts.delta {
        return Ok(DirectoryUse::Rewrite);
    }
    let empty = match is_empty_dir(&opts.pgdata) {
        Ok(empty) => empty,
        // With --force, a directory that cannot be read is reported when it is emptied.
        Err(_) if opts.force => false,
        Err(e) => return Err(e),
    };
    match (empty, opts.force) {
        (true, _) if !opts.pgdata.exists() => Ok(DirectoryUse::Create),
        (true, _) => Ok(DirectoryUse::UseEmpty),
        (false, true) => Ok(DirectoryUse::Replace),
        (false, false) => Err(RestoreError::NotEmpty(opts.pgdata.display().to_string())),
    }
}

pub(super) fn planned_backup(m: &Manifest) -> PlannedBackup {
    PlannedBackup {
        id: m.id.clone(),
        pg_version: m.pg_version,
        timeline: m.timeline,
        start_lsn: m.start_lsn,
        consistent_lsn: m.stop_lsn,
        consistent_at: crate::time::format_micros(m.stop_time_us),
    }
}

pub(super) fn planned_timeline(wanted: TimelineTarget, timeline: TimelineId) -> PlannedTimeline {
    let (chosen_by, description) = match wanted {
        TimelineTarget::Latest => ("latest", format!("latest (currently {timeline})")),
        TimelineTarget::Current => ("current", format!("current ({timeline})")),
        TimelineTarget::Id(n) => ("id", n.to_string()),
    };
    PlannedTimeline {
        chosen_by,
        id: timeline,
        description,
    }
}

pub(super) fn planned_recovery(
    opts: &RestoreOptions,
    timeline: TimelineId,
    tablespaces: bool,
    replay: bool,
) -> PlannedRecovery {
    let mut writes = vec!["backup_label"];
    if tablespaces {
        writes.push("tablespace_map");
    }
    writes.extend(["postgresql.auto.conf", "recovery.signal"]);
    if replay {
        writes.push(crate::replay::PLAN_FILE);
    }
    PlannedRecovery {
        settings: RecoverySettings {
            restore_command: opts.restore_command.clone(),
            target: opts.target.clone(),
            inclusive: !opts.exclusive,
            action: opts.action,
            // The timeline asked for by id is the one resolved (resolve_timeline checked it).
            timeline: match opts.timeline {
                TimelineTarget::Id(_) => TimelineTarget::Id(timeline),
                other => other,
            },
        },
        signal_file: "recovery.signal",
        writes,
    }
}

impl RestorePlan {
    /// The directories the restore writes into: the data directory and every tablespace's.
    pub(crate) fn roots(&self) -> Vec<PathBuf> {
        std::iter::once(self.pgdata.clone())
            .chain(self.tablespaces.values().cloned())
            .collect()
    }

    /// The rows of the text report: one fact a line.
    fn rows(&self) -> Vec<Vec<String>> {
        let row = |k: &str, v: String| vec![k.to_string(), v];
        let b = &self.backup;
        let f = &self.files;
        let mut rows = vec![
            row(
                "backup",
                format!(
                    "{}: PostgreSQL {}, timeline {}, consistent at {} ({})",
                    b.id, b.pg_version, b.timeline, b.consistent_lsn, b.consistent_at
                ),
            ),
            row("repository", self.repository.clone()),
            row(
                "data directory",
                format!("{} ({})", self.pgdata.display(), directory_text(f.directory)),
            ),
            row(
                "files",
                format!(
                    "{} files in {} directories, {} bytes; {} bytes to write",
                    f.files, f.directories, f.bytes, f.bytes_to_write
                ),
            ),
        ];
        if let Some(d) = &f.delta {
            rows.push(row(
                "delta",
                format!(
                    "checked {} existing files ({} bytes hashed), {} unchanged; compares {} small files with their shared chunks as they are fetched; rewrites {} chunks ({} from bases on disk), creates {} files, removes {} files and directories",
                    d.files_checked, d.bytes_hashed, d.files_unchanged, d.files_compared_as_fetched, d.chunks_rewritten, d.bases_on_disk, d.files_created, d.removed
                ),
            ));
        }
        for (oid, path) in &self.tablespaces {
            rows.push(row(&format!("tablespace {oid}"), path.display().to_string()));
        }
        if let Some(d) = &self.databases {
            rows.push(row("databases", d.describe()));
        }
        rows.extend(self.recovery_rows());
        if let Some(span) = &self.replay {
            let to = if span.last_is_upper_bound {
                "the newest archived segment"
            } else {
                "the target's segment"
            };
            rows.push(row(
                "replay",
                format!(
                    "{} segments, {} to {} ({to})",
                    span.segments, span.first, span.last
                ),
            ));
        }
        for (i, c) in self.checks.iter().enumerate() {
            rows.push(row(if i == 0 { "checked" } else { "" }, c.clone()));
        }
        rows
    }

    fn recovery_rows(&self) -> Vec<Vec<String>> {
        let r = &self.recovery.settings;
        let action = r.action.as_str();
        let target = match r.target.setting() {
            Some((name, value)) => format!(
                "{name} = {} ({}), then {action}",
                quote(&value),
                if r.inclusive { "inclusive" } else { "exclusive" },
            ),
            None => format!("{}, then {action}", r.target.describe()),
        };
        vec![
            vec!["target".into(), target],
            vec!["timeline".into(), self.timeline.description.clone()],
            vec!["restore_command".into(), quote(&r.restore_command)],
            vec!["writes".into(), self.recovery.writes.join(", ")],
        ]
    }
}

/// As JSON: what the text report shows, under the same names, with where recovery stops as
/// `target` (`recovery_target_time = '...'`, or the end of the archive); how the restore runs
/// (`--parallel`, `--sync-method`) and the delta's work list are not part of it.
impl Serialize for RestorePlan {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("RestorePlan", 11)?;
        st.serialize_field("pgdata", &self.pgdata)?;
        st.serialize_field("repository", &self.repository)?;
        st.serialize_field("backup", &self.backup)?;
        st.serialize_field("target", &self.recovery.target().describe())?;
        st.serialize_field("timeline", &self.timeline)?;
        st.serialize_field("files", &self.files)?;
        st.serialize_field("tablespaces", &self.tablespaces)?;
        st.serialize_field("databases", &self.databases)?;
        st.serialize_field("recovery", &self.recovery)?;
        st.serialize_field("replay", &self.replay)?;
        st.serialize_field("checks", &self.checks)?;
        st.end()
    }
}

fn directory_text(d: DirectoryUse) -> &'static str {
    match d {
        DirectoryUse::Create => "created",
        DirectoryUse::UseEmpty => "empty",
        DirectoryUse::Replace => "its contents replaced, --force",
        DirectoryUse::Rewrite => "rewritten where it differs, --delta",
    }
}

impl Report for RestorePlan {
    fn render(&self) -> String {
        format!(
            "restore plan (nothing written: run without --dry-run to restore)\n{}",
            table(&self.rows())
        )
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::testing::{SYSID, empty_store, fixture, options, with_tablespace};
    use super::*;
    use crate::catalog::testing::{at, nos, summary};
    use crate::commands::restore::{TablespacePlacement, TargetAction};
    use crate::wal::lsn::tl;

    /// The fixture's backup (consistent in segment 2 of timeline 1 at 1795271530.12 s) and the
    /// WAL after it: segments 2 to 4, one transaction end in each, 10, 20 and 30 s after.
    fn catalog_with(m: Manifest) -> Catalog {
        crate::catalog::testing::empty_catalog(SYSID)
            .with_backups([m])
            .with_segments(BTreeMap::from([(tl(1), nos(&[2, 3, 4]))]))
            .with_summaries((2..=4).map(|no| (at(1, no), summary(no, 1_795_271_520 + 10 * no as i64))))
    }

    async fn plan_for(cat: &Catalog, opts: &RestoreOptions) -> Result<RestorePlan, RestoreError> {
        build(&empty_store(), &Sealer::plain(), "file:///repo".into(), cat, opts)
            .await
            .map(|(plan, _)| plan)
    }

    #[tokio::test]
    async fn the_plan_names_the_backup_the_timeline_the_files_and_the_settings_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cat = catalog_with(fixture());
        let mut opts = options(&dir.path().join("data"));
        opts.target = RecoveryTarget::Time(1_795_271_545_000_000);
        let plan = plan_for(&cat, &opts).await.unwrap();
        assert!(!dir.path().join("data").exists(), "planning writes nothing");

        assert_eq!(plan.backup.id.to_string(), "20261121T143200Z");
        assert_eq!((plan.backup.pg_version, plan.backup.timeline.get()), (15, 1));
        assert_eq!(plan.backup.consistent_lsn.to_string(), "0/2000100");
        assert_eq!(
            plan.recovery.target().describe(),
            "recovery_target_time = '2026-11-21 14:32:25+00'"
        );
        assert_eq!(
            (
                plan.timeline.chosen_by,
                plan.timeline.id.get(),
                plan.timeline.description.as_str()
            ),
            ("latest", 1, "latest (currently 1)")
        );
        let f = &plan.files;
        assert_eq!(f.directory, DirectoryUse::Create);
        assert_eq!(
            (f.files, f.directories, f.bytes, f.bytes_to_write),
            (1, 1, 8192, 8192)
        );
        assert!(f.delta.is_none() && plan.delta_work.is_none());
        assert!(plan.tablespaces.is_empty());
        let r = &plan.recovery.settings;
        assert_eq!(r.target, RecoveryTarget::Time(1_795_271_545_000_000));
        assert_eq!(
            (r.inclusive, r.action, r.timeline),
            (true, TargetAction::Promote, TimelineTarget::Latest)
        );
        assert_eq!(r.restore_command, "true");
        assert_eq!(
            plan.recovery.writes,
            [
                "backup_label",
                "postgresql.auto.conf",
                "recovery.signal",
                "walvault-recovery.json"
            ]
        );
        // Replay: from the backup's segment to the first one with a transaction end past the
        // target.
        let span = plan.replay.as_ref().unwrap();
        assert_eq!(span.first.to_string(), "000000010000000000000002");
        assert_eq!(span.last.to_string(), "000000010000000000000003");
        assert_eq!((span.segments, span.last_is_upper_bound), (2, false));
        assert_eq!(plan.checks.len(), 3, "{:?}", plan.checks);
        assert!(
            plan.checks[1].ends_with("does not exist: it is created"),
            "{:?}",
            plan.checks
        );

        // As JSON: the same facts under the same names.
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["backup"]["id"], "20261121T143200Z");
        assert_eq!(json["files"]["directory"], "create");
        assert_eq!(json["recovery"]["target"]["name"], "recovery_target_time");
        assert_eq!(json["recovery"]["target"]["value"], "2026-11-21 14:32:25+00");
        assert_eq!(
            (&json["recovery"]["action"], &json["recovery"]["timeline"]),
            (&serde_json::json!("promote"), &serde_json::json!("latest"))
        );
        assert_eq!(json["target"], "recovery_target_time = '2026-11-21 14:32:25+00'");
        assert_eq!(json["replay"]["last"], "000000010000000000000003");
        assert!(json.get("delta_work").is_none() && json.get("parallel").is_none());
        let text = crate::report::to_string(&plan, crate::report::Format::Text);
        assert!(
            text.contains("recovery_target_time = '2026-11-21 14:32:25+00'"),
            "{text}"
        );
        assert!(
            text.contains("2 segments, 000000010000000000000002 to 000000010000000000000003"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_plan_places_tablespaces_and_writes_their_map() {
        let dir = tempfile::tempdir().unwrap();
        let cat = catalog_with(with_tablespace("/srv/ts1"));
        let mut opts = options(&dir.path().join("data"));
        let err = plan_for(&cat, &opts).await.unwrap_err();
        assert!(matches!(err, RestoreError::TablespacesUnplaced { .. }), "{err}");
        opts.tablespaces = TablespacePlacement {
            all_under: Some(dir.path().join("spaces")),
            ..Default::default()
        };
        let plan = plan_for(&cat, &opts).await.unwrap();
        assert_eq!(
            plan.tablespaces,
            BTreeMap::from([(16400, dir.path().join("spaces/16400"))])
        );
        assert_eq!(plan.recovery.writes[1], "tablespace_map");
        assert!(
            plan.checks
                .iter()
                .any(|c| c.starts_with("tablespace 16400 goes to"))
        );
        assert_eq!(
            serde_json::to_value(&plan).unwrap()["tablespaces"]["16400"],
            dir.path().join("spaces/16400").display().to_string()
        );
        assert!(!dir.path().join("spaces").exists() && !dir.path().join("data").exists());
    }

    #[tokio::test]
    async fn the_directory_is_used_as_the_options_allow() {
        let dir = tempfile::tempdir().unwrap();
        let cat = catalog_with(fixture());
        let data = dir.path().join("data");
        let mut opts = options(&data);
        std::fs::create_dir(&data).unwrap();
        assert_eq!(
            plan_for(&cat, &opts).await.unwrap().files.directory,
            DirectoryUse::UseEmpty
        );
        std::fs::write(data.join("old"), b"x").unwrap();
        let err = plan_for(&cat, &opts).await.unwrap_err();
        assert!(matches!(err, RestoreError::NotEmpty(_)), "{err}");
        opts.force = true;
        assert_eq!(
            plan_for(&cat, &opts).await.unwrap().files.directory,
            DirectoryUse::Replace
        );
        assert_eq!(
            std::fs::read(data.join("old")).unwrap(),
            b"x",
            "planning removes nothing"
        );
        // --delta compares before deciding: this is no data directory.
        opts.force = false;
        opts.delta = true;
        let err = plan_for(&cat, &opts).await.unwrap_err();
        assert!(matches!(err, RestoreError::NotRestorable { .. }), "{err}");
    }

    #[tokio::test]
    async fn the_timeline_is_chosen_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let cat = catalog_with(fixture());
        let mut opts = options(Path::new(&dir.path().join("data")));
        opts.timeline = TimelineTarget::Current;
        let plan = plan_for(&cat, &opts).await.unwrap();
        assert_eq!(
            (plan.timeline.chosen_by, plan.timeline.description.as_str()),
            ("current", "current (1)")
        );
        assert_eq!(plan.recovery.settings.timeline.value(), "current");
        opts.timeline = TimelineTarget::Id(tl(1));
        let plan = plan_for(&cat, &opts).await.unwrap();
        assert_eq!(
            (
                plan.timeline.chosen_by,
                plan.recovery.settings.timeline.value().as_str()
            ),
            ("id", "1")
        );
        // Replay to the end of the archive: up to the newest segment, an upper bound.
        assert!(plan.replay.unwrap().last_is_upper_bound);
        opts.timeline = TimelineTarget::Id(tl(7));
        let err = plan_for(&cat, &opts).await.unwrap_err();
        assert!(
            matches!(err, RestoreError::UnknownTimeline(t, _) if t == 7),
            "{err}"
        );
    }
}
