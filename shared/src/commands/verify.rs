//! `restore-agent verify`: is every backup restorable, and to which instants? Read-only.
//!
//! From listings (one LIST per object kind, paged by the store: a few requests however large the
//! repository) and the manifests, history files and summaries the catalog reads anyway: every
//! chunk a manifest names is present; the WAL from each backup's start to its consistency point,
//! and on to the end of each timeline descending from it, has no gap; every timeline with WAL
//! has its history file; history files, manifests and summaries parse. `--deep` also reads every
//! WAL file, summary and chunk, decompresses it and checks its hashes (and a segment's page
//! header against its name and the repository's cluster).

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use serde::Serialize;

use crate::basebackup::chunk::{Chunk, ChunkId, MisnamedChunk, PackDamage, check_pack};
use crate::basebackup::pack::{PackId, PackRecord};
use crate::catalog::{Catalog, CatalogError};
use crate::config::Settings;
use crate::repo::layout::{self, Kind};
use crate::repo::stored::{self, Damage, StoredKind, WalObject};
use crate::repo::{Reader, RepoError, StoreError, WalCheckError};
use crate::report::Report;
use crate::retention::RetentionRecord;
use crate::timeindex::{StoredSummary, SummaryError};
use crate::wal::{SegmentName, SegmentNo, TimelineId, WalFileName};

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Something restorable is at risk: verify exits non-zero.
    Error,
    /// Worth knowing, restores unaffected (a time index summary, an unreferenced chunk).
    Warning,
}

/// One problem: the object, what is wrong with it, and what depends on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub key: String,
    pub problem: String,
    pub affects: String,
}

impl std::fmt::Display for Problem {
    /// `ERROR <key>: <problem>; <what depends on it>`: the line verify prints.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.severity {
            Severity::Error => "ERROR",
            Severity::Warning => "WARNING",
        };
        write!(f, "{tag} {}: {}; {}", self.key, self.problem, self.affects)
    }
}

/// The span one timeline can be restored to.
#[derive(Debug, Clone, Serialize)]
pub struct RestorableWindow {
    pub timeline: TimelineId,
    pub earliest: String,
    pub latest_before: Option<String>,
    pub end_lsn: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub deep: bool,
    /// The retention policy the last expire applied, if any.
    pub policy: Option<String>,
    pub backups: u64,
    pub wal_files: u64,
    pub summaries: u64,
    pub chunks: u64,
    /// Chunks no manifest references (garbage an expire collects).
    pub unreferenced_chunks: u64,
    /// Packs, and packs no manifest lists (garbage an expire collects).
    pub packs: u64,
    pub unreferenced_packs: u64,
    /// Every WAL file, summary, manifest, chunk and pack listed, and their stored bytes.
    pub repository_objects: u64,
    pub repository_bytes: u64,
    /// Objects read whole and hash-checked (`--deep`).
    pub objects_read: u64,
    pub bytes_read: u64,
    pub windows: Vec<RestorableWindow>,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// Whether anything restorable is at risk.
    pub fn at_risk(&self) -> bool {
        self.problems.iter().any(|p| p.severity == Severity::Error)
    }

    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for p in &self.problems {
            let _ = writeln!(out, "{p}");
        }
        if let Some(p) = &self.policy {
            let _ = writeln!(out, "retention (from the last expire): {p}");
        }
        for w in &self.windows {
            let _ = writeln!(
                out,
                "timeline {}: restorable from {} to just before {} (WAL through {})",
                w.timeline,
                w.earliest,
                w.latest_before.as_deref().unwrap_or("the end of its WAL"),
                w.end_lsn
            );
        }
        let errors = self
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count();
        let _ = write!(
            out,
            "verified {} backups, {} WAL files, {} summaries, {} chunks ({} unreferenced), {} packs ({} unreferenced){}: {} problems, {} putting restores at risk",
            self.backups,
            self.wal_files,
            self.summaries,
            self.chunks,
            self.unreferenced_chunks,
            self.packs,
            self.unreferenced_packs,
            if self.deep {
                format!(", read {} objects ({} bytes)", self.objects_read, self.bytes_read)
            } else {
                String::new()
            },
            self.problems.len(),
            errors
        );
        out
    }
}

/// What `restore-agent verify` prints: the report, and whether anything restorable is at risk
/// (the exit status, and `at_risk` in the JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    #[serde(flatten)]
    pub report: VerifyReport,
    pub at_risk: bool,
}

impl From<VerifyReport> for Verified {
    fn from(report: VerifyReport) -> Self {
        Verified {
            at_risk: report.at_risk(),
            report,
        }
    }
}

impl Report for Verified {
    fn render(&self) -> String {
        self.report.render()
    }
}

/// Open the repository read-only and verify it: `restore-agent verify`.
pub async fn verify_repository(
    settings: &Settings,
    deep: bool,
    parallel: usize,
) -> Result<Verified, VerifyError> {
    if let Some(fallback) = &settings.fallback_repo {
        tracing::info!(
            "verify judges {} alone: fallback repository {fallback} is not read",
            settings.repo
        );
    }
    let repo = Reader::open(&settings.repo, &settings.store_options()).await?;
    Ok(verify(&repo, deep, parallel).await?.into())
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How long verify waits for an expire that is deleting objects to finish.
const EXPIRE_WAIT: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Verify the repository; `parallel` bounds the objects read at once with `deep`. Waits for an
/// expire in progress (objects it deletes while verify lists would look missing), and looks
/// again when one ran meanwhile and something seemed missing.
pub async fn verify(repo: &Reader, deep: bool, parallel: usize) -> Result<VerifyReport, VerifyError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        wait_for_expire(repo).await?;
        // Every expire rewrites retention.json before it deletes anything: a change means one
        // ran while this verify listed.
        let before = repo.store().get(layout::RETENTION_KEY).await?;
        let report = verify_once(repo, before.as_deref(), deep, parallel).await?;
        let after = repo.store().get(layout::RETENTION_KEY).await?;
        let expiring =
            crate::repo::locks::live(repo.store(), repo.sealer(), crate::repo::locks::LockKind::Expire)
                .await?
                .is_some();
        if !(report.at_risk() && (expiring || before != after) && attempt < 3) {
            return Ok(report);
        }
    }
}

async fn wait_for_expire(repo: &Reader) -> Result<(), VerifyError> {
    let started = tokio::time::Instant::now();
    while let Some((_, r)) =
        crate::repo::locks::live(repo.store(), repo.sealer(), crate::repo::locks::LockKind::Expire).await?
    {
        if started.elapsed() >= EXPIRE_WAIT {
            tracing::warn!("{} is still running; verifying anyway", r.describe());
            return Ok(());
        }
        tracing::info!("waiting for {} to finish", r.describe());
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
    Ok(())
}

/// One pass; `retention` is `retention.json` as read just before.
async fn verify_once(
    repo: &Reader,
    retention: Option<&[u8]>,
    deep: bool,
    parallel: usize,
) -> Result<VerifyReport, VerifyError> {
    // Summaries are listed, not read (one GET each would make verify cost a request per
    // segment); the windows read the few they need, and --deep reads them all.
    let mut cat = Catalog::load_listing(repo).await?;
    cat.read_window_summaries(repo).await;
    let chunk_listing = repo.store().list(Kind::Chunk.dirname()).await?;
    let pack_listing = repo.store().list(Kind::Pack.dirname()).await?;
    let mut report = VerifyReport::counting(&cat, (&chunk_listing, &pack_listing), deep);
    let mut problems = damaged_problems(&cat);
    let (needed_by, packs) =
        backup_data_problems(&cat, (&chunk_listing, &pack_listing), &mut report, &mut problems);
    let consistency_only = consistency_only(repo, retention, &mut report, &mut problems);
    wal_problems(&cat, &consistency_only, &mut problems);
    missing_summaries(&cat, &mut problems);
    damaged_pages(&cat, &mut problems);
    if deep {
        deep_read(
            repo,
            &cat,
            (&chunk_listing, &pack_listing),
            (&needed_by, &packs),
            parallel,
            &mut report,
            &mut problems,
        )
        .await?;
    }
    for t in cat.timeline_ids() {
        if let Some(w) = cat.window(t) {
            report.windows.push(RestorableWindow {
                timeline: t,
                earliest: crate::time::format_micros(w.earliest),
                latest_before: w.latest.map(crate::time::format_micros),
                end_lsn: w.end_lsn.to_string(),
            });
        }
    }
    problems.sort_by(|a, b| (a.severity, &a.key).cmp(&(b.severity, &b.key)));
    problems.dedup_by(|a, b| a.key == b.key && a.problem == b.problem);
    report.problems = problems;
    Ok(report)
}

impl VerifyReport {
    /// A report counting what the repository holds (objects and bytes), no problem found yet.
    fn counting(
        cat: &Catalog,
        (chunk_listing, pack_listing): (&Listing, &Listing),
        deep: bool,
    ) -> VerifyReport {
        let mut report = VerifyReport {
            deep,
            backups: cat.backups().len() as u64,
            wal_files: cat.wal_files().len() as u64,
            summaries: cat.summary_files().len() as u64,
            chunks: chunk_listing.len() as u64,
            packs: pack_listing.len() as u64,
            ..VerifyReport::default()
        };
        report.repository_objects = (cat.wal_files().len()
            + cat.summary_files().len()
            + cat.manifest_files().count()
            + chunk_listing.len()
            + pack_listing.len()) as u64;
        report.repository_bytes = cat.wal_files().iter().map(|(_, n)| n).sum::<u64>()
            + cat.summary_files().iter().map(|(_, n)| n).sum::<u64>()
            + cat.manifest_files().map(|(_, n)| n).sum::<u64>()
            + chunk_listing.iter().map(|(_, n)| n).sum::<u64>()
            + pack_listing.iter().map(|(_, n)| n).sum::<u64>();
        report
    }
}

/// The objects the catalog could not read, and what each costs.
fn damaged_problems(cat: &Catalog) -> Vec<Problem> {
    let mut problems = Vec::new();
    for d in cat.damaged() {
        let affects = match &d.backup {
            Some(id) => format!("backup {id} cannot be restored"),
            None => format!("recovery onto {} fails", d.what.trim_end_matches(" history")),
        };
        problems.push(error(
            d.key.clone(),
            format!("{} cannot be read: {}", d.what, d.reason),
            affects,
        ));
    }
    problems
}

/// Backups the last expire's policy keeps to their consistency point only (from `retention`,
/// `retention.json`; its policy goes in the report): the WAL after it was deleted on purpose,
/// and is no gap.
fn consistency_only(
    repo: &Reader,
    retention: Option<&[u8]>,
    report: &mut VerifyReport,
    problems: &mut Vec<Problem>,
) -> BTreeSet<crate::basebackup::BackupId> {
    let mut consistency_only = BTreeSet::new();
    if let Some(stored) = retention {
        match stored::open::<RetentionRecord>(repo.sealer(), &(), stored) {
            Ok(record) => {
                consistency_only.extend(record.consistency_only.iter().cloned());
                report.policy = record.policy().ok().map(|p| {
                    format!(
                        "{}, applied {}",
                        p.describe(),
                        crate::time::format_micros(record.applied_at_us)
                    )
                });
            }
            Err(e) => problems.push(Problem {
                severity: Severity::Warning,
                key: layout::RETENTION_KEY.into(),
                problem: format!("cannot be read: {e}"),
                affects: "every backup is held to a window reaching the end of its timelines".into(),
            }),
        }
    }
    consistency_only
}

/// The damaged pages each backup found in the cluster and recorded (see
/// `crate::basebackup::page_checksum`). Warnings: the backup restores what the cluster held, no
/// worse, so verify's exit status (is the repository restorable) stays 0; the lines say which
/// relations to look at, and which backups hold the damage.
fn damaged_pages(cat: &Catalog, problems: &mut Vec<Problem>) {
    for m in cat.backups() {
        let Some(checks) = m.page_checks.as_ref().filter(|c| c.bad_total > 0) else {
            continue;
        };
        let affects = format!(
            "backup {} restores these pages as they were read (damaged in the cluster when it was taken)",
            m.id
        );
        for page in &checks.bad {
            problems.push(Problem {
                severity: Severity::Warning,
                key: layout::manifest_key(&m.id),
                problem: format!("damaged page: {page}"),
                affects: affects.clone(),
            });
        }
        let unlisted = checks.bad_total - checks.bad.len() as u64;
        if unlisted > 0 {
            problems.push(Problem {
                severity: Severity::Warning,
                key: layout::manifest_key(&m.id),
                problem: format!("{unlisted} more damaged pages, not listed"),
                affects,
            });
        }
    }
}

/// Every archived segment should have its summary (push writes it right after the segment).
fn missing_summaries(cat: &Catalog, problems: &mut Vec<Problem>) {
    let seg_size = cat.wal_segment_size();
    let summarized: BTreeSet<&SegmentName> = cat.summary_files().iter().map(|(s, _)| s).collect();
    for (name, _) in cat.wal_files() {
        if let WalFileName::Segment(seg) = name
            && !summarized.contains(seg)
            && seg.segment_no(seg_size).is_some()
        {
            problems.push(Problem {
                severity: Severity::Warning,
                key: layout::summary_key(seg),
                problem: "time index summary missing".into(),
                affects: format!("target times in {seg} are checked less precisely (restores still work)"),
            });
        }
    }
}

/// Chunks and packs: every chunk a manifest names must be listed (with some bytes), in its pack
/// when the manifest places it in one, and every pack as long as its chunks. Returns who needs
/// each chunk stored on its own and each pack.
fn backup_data_problems<'a>(
    cat: &'a Catalog,
    (chunk_listing, pack_listing): (&Listing, &Listing),
    report: &mut VerifyReport,
    problems: &mut Vec<Problem>,
) -> (Users<'a>, Packs<'a>) {
    let stored: BTreeMap<ChunkId, u64> = chunk_listing
        .iter()
        .filter_map(|(k, size)| Some((layout::parse_chunk_key(k)?, *size)))
        .collect();
    let mut needed_by: BTreeMap<ChunkId, Vec<(String, &str)>> = BTreeMap::new();
    let mut packs = Packs::default();
    for m in cat.backups() {
        let places = m.places();
        for p in &m.packs {
            packs.records.entry(p.id).or_insert(p);
        }
        // The server's backup_manifest of a backup over the protocol: what the next incremental
        // backup uploads.
        let server_manifest = m
            .server_manifest
            .iter()
            .flat_map(|b| b.chunks.iter().map(|c| (c, "backup_manifest (the server's)")));
        let files = m
            .entries
            .iter()
            .flat_map(|e| e.chunks.iter().map(|c| (c, e.path.as_str())));
        // A chunk stored as a difference is read with its base (the difference itself is
        // where `places` puts the chunk).
        let bases = m
            .deltas
            .iter()
            .map(|d| (&d.base, "a base of chunks stored as differences"));
        for (c, path) in files.chain(server_manifest).chain(bases) {
            let users = match places.get(c) {
                Some(place) => packs.needed_by.entry(place.pack).or_default(),
                None => needed_by.entry(*c).or_default(),
            };
            users.push((m.id.to_string(), path));
        }
    }
    let stored_packs: BTreeMap<PackId, u64> = pack_listing
        .iter()
        .filter_map(|(k, size)| Some((layout::parse_pack_key(k)?, *size)))
        .collect();
    for (id, users) in &packs.needed_by {
        let listed = packs.records.get(id).map_or(0, |r| r.len());
        let what = match stored_packs.get(id) {
            None => "pack missing".to_string(),
            Some(&n) if n < listed => format!("pack shorter than its manifest says ({n} of {listed} bytes)"),
            Some(_) => continue,
        };
        problems.push(error(layout::pack_key(id), what, describe_users(users)));
    }
    report.unreferenced_packs = stored_packs
        .keys()
        .filter(|id| !packs.records.contains_key(*id))
        .count() as u64;
    for (id, users) in &needed_by {
        let key = layout::chunk_key(id);
        let what = match stored.get(id) {
            None => "missing",
            Some(0) => "empty",
            Some(_) => continue,
        };
        problems.push(error(key, format!("chunk {what}"), describe_users(users)));
    }
    report.unreferenced_chunks = stored.keys().filter(|id| !needed_by.contains_key(*id)).count() as u64;
    (needed_by, packs)
}

fn describe_users(users: &[(String, &str)]) -> String {
    let backups: BTreeSet<&str> = users.iter().map(|(b, _)| b.as_str()).collect();
    let (first_backup, first_path) = &users[0];
    let list: Vec<&str> = backups.into_iter().collect();
    format!(
        "needed by backup{} {} (file {first_path} of {first_backup})",
        if list.len() > 1 { "s" } else { "" },
        list.join(", ")
    )
}

/// Gaps in the WAL each backup needs: to its consistency point, then on to the end of the WAL
/// archived on each timeline descending from it; timelines without their history file.
fn wal_problems(
    cat: &Catalog,
    consistency_only: &BTreeSet<crate::basebackup::BackupId>,
    problems: &mut Vec<Problem>,
) {
    let seg_size = cat.wal_segment_size();
    let seg_name = |tli: TimelineId, no: SegmentNo| SegmentName::from_no(tli, no, seg_size);
    let key_of = |tli: TimelineId, no: SegmentNo| layout::wal_key(&WalFileName::Segment(seg_name(tli, no)));
    // (key) -> (problem, affected backups)
    let mut gaps: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for m in cat.backups() {
        let (start, stop) = m.wal_needed(seg_size);
        let own = cat.chain(m, m.timeline);
        let reached = own.last().map(|&(_, no)| no);
        if reached.is_none_or(|r| r < stop) {
            let missing = reached.map_or(start, |r| r.plus(1));
            let tli = cat.timeline_of_segment(m.timeline, missing);
            let e = gaps
                .entry(key_of(tli, missing))
                .or_insert_with(|| ("WAL segment missing".into(), BTreeSet::new()));
            e.1.insert(format!("backup {} cannot become consistent", m.id));
            continue;
        }
        if consistency_only.contains(&m.id) {
            continue;
        }
        for t in cat.timeline_ids() {
            if !cat.on_history(m, t) {
                continue;
            }
            let Some(&last) = cat.segments_of(t).last() else {
                continue;
            };
            let chain = cat.chain(m, t);
            let end = chain.last().map_or(start, |&(_, no)| no);
            if end < last {
                let tli = cat.timeline_of_segment(t, end.plus(1));
                let e = gaps.entry(key_of(tli, end.plus(1))).or_insert_with(|| {
                    (
                        "WAL segment missing (a gap in the archive)".into(),
                        BTreeSet::new(),
                    )
                });
                e.1.insert(format!(
                    "recovery on timeline {t} from backup {} stops before it (WAL is archived up to {})",
                    m.id,
                    seg_name(t, last)
                ));
            }
        }
    }
    for (key, (problem, affects)) in gaps {
        problems.push(Problem {
            severity: Severity::Error,
            key,
            problem,
            affects: affects.into_iter().collect::<Vec<_>>().join("; "),
        });
    }
    for t in cat.timeline_ids() {
        if t > TimelineId::FIRST
            && !cat.has_history(t)
            && !cat
                .damaged()
                .iter()
                .any(|d| d.what == format!("timeline {t} history"))
        {
            let key = layout::wal_key(&WalFileName::History(t));
            problems.push(Problem {
                severity: Severity::Error,
                key,
                problem: format!("timeline {t} has WAL but no history file"),
                affects: format!("recovery onto timeline {t} fails"),
            });
        }
    }
}

/// A problem that puts a restore at risk.
fn error(key: String, problem: String, affects: String) -> Problem {
    Problem {
        severity: Severity::Error,
        key,
        problem,
        affects,
    }
}

/// Keys and sizes, as listed.
type Listing = [(String, u64)];
/// The backups and files that need each chunk stored on its own.
type Users<'a> = BTreeMap<ChunkId, Vec<(String, &'a str)>>;

/// The packs the manifests list: the first record of each, and who needs each.
#[derive(Default)]
struct Packs<'a> {
    records: BTreeMap<PackId, &'a PackRecord>,
    needed_by: BTreeMap<PackId, Vec<(String, &'a str)>>,
}

/// Read every WAL file, summary, chunk and pack whole and check it.
async fn deep_read(
    repo: &Reader,
    cat: &Catalog,
    (chunk_listing, pack_listing): (&Listing, &Listing),
    (needed_by, packs): (&Users<'_>, &Packs<'_>),
    parallel: usize,
    report: &mut VerifyReport,
    problems: &mut Vec<Problem>,
) -> Result<(), StoreError> {
    use DeepItem as Item;
    let mut items: Vec<Item> = cat.wal_files().iter().map(|(n, _)| Item::Wal(*n)).collect();
    items.extend(cat.summary_files().iter().map(|(s, _)| Item::Summary(*s)));
    items.extend(
        chunk_listing
            .iter()
            .filter_map(|(k, _)| layout::parse_chunk_key(k))
            .map(Item::Chunk),
    );
    items.extend(
        pack_listing
            .iter()
            .filter_map(|(k, _)| layout::parse_pack_key(k))
            .map(|id| Item::Pack(id, packs.records.get(&id).map(|r| (*r).clone()))),
    );
    let store = repo.store();
    let results = futures::stream::iter(items)
        .map(|item| async move {
            let (key, name) = match &item {
                Item::Wal(n) => (layout::wal_key(n), n.to_string()),
                Item::Summary(s) => (layout::summary_key(s), s.to_string()),
                Item::Chunk(id) => (Chunk::key(id), id.to_string()),
                Item::Pack(id, _) => (layout::pack_key(id), id.to_string()),
            };
            let Some(bytes) = store.get(&key).await? else {
                return Ok((key, name, 0, Some("disappeared during verify".to_string())));
            };
            let len = bytes.len() as u64;
            let reader = repo.clone();
            let checked = tokio::task::spawn_blocking(move || deep_check(&reader, item, &bytes))
                .await
                .unwrap_or_else(|e| Err(DeepCheckError::Task(e.to_string())));
            Ok::<_, StoreError>((key, name, len, checked.err().map(|e| e.to_string())))
        })
        .buffer_unordered(parallel.max(1));
    futures::pin_mut!(results);
    while let Some(r) = results.next().await {
        let (key, name, len, bad) = r?;
        report.objects_read += 1;
        report.bytes_read += len;
        let Some(why) = bad else { continue };
        let (severity, affects) = if key.starts_with(Kind::Pack.dirname()) {
            match name
                .parse::<PackId>()
                .ok()
                .and_then(|id| packs.needed_by.get(&id))
            {
                Some(users) => (Severity::Error, describe_users(users)),
                None => (Severity::Warning, "no backup references it".to_string()),
            }
        } else if key.starts_with(Kind::Chunk.dirname()) {
            match name.parse::<ChunkId>().ok().and_then(|id| needed_by.get(&id)) {
                Some(users) => (Severity::Error, describe_users(users)),
                None => (Severity::Warning, "no backup references it".to_string()),
            }
        } else if key.starts_with(Kind::Index.dirname()) {
            (
                Severity::Warning,
                format!("target times in {name} are checked less precisely"),
            )
        } else {
            let users = wal_users(cat, &name);
            match users == NO_USERS {
                true => (Severity::Warning, users),
                false => (Severity::Error, users),
            }
        };
        problems.push(Problem {
            severity,
            key,
            problem: format!("corrupt: {why}"),
            affects,
        });
    }
    Ok(())
}

/// Why an object read whole by `--deep` is unusable.
#[derive(Debug, thiserror::Error)]
enum DeepCheckError {
    #[error(transparent)]
    Wal(#[from] Damage<std::convert::Infallible>),
    #[error(transparent)]
    Foreign(#[from] WalCheckError),
    #[error(transparent)]
    Summary(#[from] Damage<SummaryError>),
    #[error(transparent)]
    Chunk(#[from] Damage<MisnamedChunk>),
    #[error("check failed: {0}")]
    Task(String),
    #[error(transparent)]
    Pack(#[from] PackDamage),
}

/// Open `item`, read whole as `bytes`, and check it as its kind requires.
fn deep_check(repo: &Reader, item: DeepItem, bytes: &[u8]) -> Result<(), DeepCheckError> {
    let sealer = repo.sealer();
    match item {
        DeepItem::Wal(n) => {
            let file = stored::open::<WalObject>(sealer, &n, bytes)?;
            repo.check_wal(&n, &file.content)?;
        }
        DeepItem::Summary(s) => {
            stored::open::<StoredSummary>(sealer, &s, bytes)?;
        }
        DeepItem::Chunk(id) => {
            stored::open::<Chunk>(sealer, &id, bytes)?;
        }
        DeepItem::Pack(id, record) => check_pack(sealer, id, bytes, record.as_ref())?,
    }
    Ok(())
}

/// An object `--deep` reads.
enum DeepItem {
    Wal(WalFileName),
    Summary(SegmentName),
    Chunk(ChunkId),
    /// A pack, with the chunks a manifest lists in it.
    Pack(PackId, Option<PackRecord>),
}

const NO_USERS: &str = "no backup replays it";

/// Which backups replay a WAL file, in words.
fn wal_users(cat: &Catalog, name: &str) -> String {
    let Ok(parsed) = name.parse::<WalFileName>() else {
        return "recovery through it fails".into();
    };
    let Some(seg) = parsed.wal_segment() else {
        return match parsed {
            WalFileName::History(t) => format!("recovery onto timeline {} fails", t.get()),
            _ => "recovery through it fails".into(),
        };
    };
    let Some(no) = seg.segment_no(cat.wal_segment_size()) else {
        return "recovery through it fails".into();
    };
    let users: Vec<String> = cat
        .backups()
        .iter()
        .filter(|m| {
            cat.timeline_ids()
                .into_iter()
                .any(|t| cat.on_history(m, t) && cat.chain(m, t).contains(&(seg.timeline, no)))
        })
        .map(|m| m.id.to_string())
        .collect();
    match users.is_empty() {
        true => NO_USERS.into(),
        false => format!("recovery from backups {} stops there", users.join(", ")),
    }
}
