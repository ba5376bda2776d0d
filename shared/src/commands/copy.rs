//! `archive-agent copy --to URL`: keep a second repository, made by `init --copy-of`, holding
//! everything the first holds (the 3-2-1 rule: a second copy, on another store).
//!
//! The copy is made of the first repository's own objects, byte for byte: the second repository
//! has the same id and the same master key, so sealed objects open there unchanged, and a chunk
//! already there is never sent again (a second copy right after the first writes nothing).
//!
//! 1. Both repositories are opened; they must be the same repository (id, cluster, encryption).
//! 2. The source is listed, backups first, so every manifest seen has its chunks and packs in
//!    the listings that follow (a backup writes them before its manifest). The target is listed.
//! 3. The manifests the target lacks are read: they name the packs whose chunks are opened on
//!    arrival, and what each manifest needs before it may be written.
//! 4. Phase by phase ([`objects::Phase`]): chunks and packs, then WAL and the time index, then
//!    relation maps and manifests, then pins, drill evidence and the retention record. Within a
//!    phase, at most `parallel` objects are in flight. Each object is read, opened as the target
//!    opens it (hashes, AEAD, content), and only then written; a manifest is written only when
//!    every pack and chunk it needs is on the target, so a backup appears there whole or not at
//!    all.
//! 5. With `--prune`, what `expire` removed from the source is removed from the target
//!    ([`prune`]).
//!
//! A copy cut off anywhere is resumed by running it again: the listings say what is left.

pub mod objects;
pub mod prune;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

use crate::basebackup::chunk_id::{ChunkId, PackId};
use crate::basebackup::manifest::Manifest;
use crate::basebackup::pack::PackRecord;
use crate::config::Settings;
use crate::repo::store::PutNew;
use crate::repo::{ReadError, Reader, RepoError, RepoId, StoreError, Writer};
use crate::report::{Report, human_bytes};
use objects::{Object, Phase};

/// Objects in flight at once unless `--parallel` says otherwise.
pub const DEFAULT_PARALLEL: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{target} is not a copy of {from}: {why} (create the copy with `archive-agent init --copy-of {from} --repo {target}`)"
    )]
    NotACopy {
        from: String,
        target: String,
        why: String,
    },
    #[error("the source and the target are the same location ({0}): nothing to copy")]
    SameLocation(String),
    #[error("copy task failed: {0}")]
    Task(String),
}

/// How to copy.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Objects read, checked and written at once.
    pub parallel: usize,
    /// Remove from the target what `expire` removed from the source ([`prune`]).
    pub prune: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            parallel: DEFAULT_PARALLEL,
            prune: false,
        }
    }
}

/// Objects and their stored bytes.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Tally {
    pub objects: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.objects += 1;
        self.bytes += bytes;
    }
}

/// An object the copy could not bring across, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub key: String,
    pub why: String,
}

/// What a copy did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    pub source: String,
    pub target: String,
    pub id: Option<RepoId>,
    /// Written to the target.
    pub copied: Tally,
    /// On the target already (content-addressed or written once, and the same size).
    pub present: Tally,
    /// On the target but damaged there, replaced by the source's (checked) copy.
    pub repaired: Tally,
    /// Removed by `--prune`.
    pub pruned: Tally,
    /// Source objects that fail their checks: not copied (the source needs `restore-agent verify`).
    pub damaged: Vec<Skipped>,
    /// Target objects that differ from the source's and are intact: left as they are.
    pub conflicts: Vec<Skipped>,
    /// Manifests not written yet because something they need is not on the target.
    pub waiting: Vec<Skipped>,
    /// Listed on the source, gone when read (an expire ran meanwhile).
    pub vanished: u64,
    /// What `--prune` left alone, and why (for example a source with no backup).
    pub prune_refused: Option<String>,
    pub seconds: f64,
    /// Bytes written to the target per second of the whole copy.
    pub bytes_per_second: f64,
    /// With `--max-rate`: what was sent and at what rate.
    pub sent: Option<crate::repo::rate::Sent>,
}

impl CopyReport {
    /// Whether the target now holds everything the source held when listed.
    pub fn complete(&self) -> bool {
        self.damaged.is_empty() && self.conflicts.is_empty() && self.waiting.is_empty()
    }

    /// `archive-agent copy`'s exit status: [`crate::exit::COPY_INCOMPLETE`] when objects were
    /// left behind.
    pub fn exit_code(&self) -> u8 {
        match self.complete() {
            true => crate::exit::SUCCESS,
            false => crate::exit::COPY_INCOMPLETE,
        }
    }
}

impl Report for CopyReport {
    fn render(&self) -> String {
        let mut out = format!(
            "copied {} objects ({}) from {} to {} in {:.1} s ({}/s); {} objects ({}) were there already",
            self.copied.objects,
            human_bytes(self.copied.bytes),
            self.source,
            self.target,
            self.seconds,
            human_bytes(self.bytes_per_second as u64),
            self.present.objects,
            human_bytes(self.present.bytes),
        );
        if self.repaired.objects > 0 {
            out.push_str(&format!(
                "\nrepaired {} damaged objects on the target ({})",
                self.repaired.objects,
                human_bytes(self.repaired.bytes)
            ));
        }
        if self.pruned.objects > 0 {
            out.push_str(&format!(
                "\npruned {} objects ({}) that expire removed from the source",
                self.pruned.objects,
                human_bytes(self.pruned.bytes)
            ));
        }
        if let Some(why) = &self.prune_refused {
            out.push_str(&format!("\nnothing pruned: {why}"));
        }
        for (what, list) in [
            ("damaged in the source, not copied", &self.damaged),
            ("differs on the target, left as it is", &self.conflicts),
            ("not copied yet, needs objects the target lacks", &self.waiting),
        ] {
            for s in list {
                out.push_str(&format!("\n{what}: {}: {}", s.key, s.why));
            }
        }
        if !self.complete() {
            out.push_str("\nthe copy is incomplete: run restore-agent verify on the source");
        }
        out
    }
}

/// `archive-agent copy --to`: open both repositories and copy.
pub async fn copy_repository(
    from: &Settings,
    to: &Settings,
    opts: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    if crate::repo::store::store_identity(&from.repo, &from.store_options())
        == crate::repo::store::store_identity(&to.repo, &to.store_options())
    {
        return Err(CopyError::SameLocation(to.repo.to_string()));
    }
    let source = Reader::open(&from.repo, &from.store_options()).await?;
    crate::repo::repository::follow_rekey(&to.repo, &to.store_options(), &source).await?;
    let target = Writer::open_writable(&to.repo, &to.store_options()).await?;
    let mut report = copy(&source, &target, opts).await?;
    report.sent = to.rate_limit.as_ref().map(|r| r.sent());
    Ok(report)
}

/// Refuse a target that is not the same repository as the source.
fn same_repository(source: &Reader, target: &Writer) -> Result<(), CopyError> {
    let not = |why: String| CopyError::NotACopy {
        from: source.url().to_string(),
        target: target.url().to_string(),
        why,
    };
    if source.id() != target.id() {
        return Err(not(format!(
            "its id is {}, the source's {}",
            target.id(),
            source.id()
        )));
    }
    if source.sealer().is_encrypted() != target.sealer().is_encrypted() {
        return Err(not("one is encrypted and the other is not".into()));
    }
    if let (Some(a), Some(b)) = (source.cluster(), target.cluster())
        && a != b
    {
        return Err(not(format!("it holds {b}, the source {a}")));
    }
    Ok(())
}

/// Every object copy knows in a repository, with its stored size: backups first.
async fn listing(store: &crate::repo::Store) -> Result<BTreeMap<Object, u64>, StoreError> {
    let mut out = listed(store, &[objects::BACKUPS]).await?;
    out.extend(listed(store, &objects::LISTED_AFTER_BACKUPS).await?);
    for o in [Object::Cluster, Object::Retention] {
        if let Some(size) = store.size(&o.key()).await? {
            out.insert(o, size);
        }
    }
    Ok(out)
}

/// The objects copy knows under `dirs`, with their stored sizes.
async fn listed(store: &crate::repo::Store, dirs: &[&str]) -> Result<BTreeMap<Object, u64>, StoreError> {
    let mut out = BTreeMap::new();
    for dir in dirs {
        for (key, size) in store.list(dir).await? {
            if let Some(o) = Object::of_key(&key) {
                out.insert(o, size);
            }
        }
    }
    Ok(out)
}

/// Copy everything `source` holds that `target` (the same repository, elsewhere) lacks.
pub async fn copy(source: &Reader, target: &Writer, opts: &CopyOptions) -> Result<CopyReport, CopyError> {
    same_repository(source, target)?;
    let started = Instant::now();
    let mut report = CopyReport {
        source: source.url().to_string(),
        target: target.url().to_string(),
        id: Some(source.id().clone()),
        ..CopyReport::default()
    };
    // Backups first: each manifest listed has its data in the listings that follow. One that
    // appears after them waits for the next copy.
    let src = listing(source.store()).await?;
    let dst = listing(target.store()).await?;
    let records = new_manifests_records(source, &src, &dst).await?;
    let ctx = Arc::new(Context {
        source: source.clone(),
        target: target.clone(),
        checker: target.reader(),
        records,
        on_target: std::sync::Mutex::new(OnTarget::of(&dst)),
    });
    for phase in [Phase::Data, Phase::Wal, Phase::Backups, Phase::Records] {
        let todo: Vec<(Object, u64, Option<u64>)> = src
            .iter()
            .filter(|(o, _)| o.phase() == phase)
            .filter_map(|(o, &size)| {
                let there = dst.get(o).copied();
                let skip = there == Some(size) && o.write_once();
                match skip {
                    true => {
                        report.present.add(size);
                        None
                    }
                    false => Some((o.clone(), size, there)),
                }
            })
            .collect();
        tracing::info!(?phase, objects = todo.len(), "copying");
        run_phase(&ctx, todo, opts.parallel.max(1), &mut report).await?;
    }
    if opts.prune {
        let after = listing(target.store()).await?;
        prune::prune(source, target, &src, &after, &mut report).await?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.bytes_per_second = match report.seconds > 0.0 {
        true => report.copied.bytes as f64 / report.seconds,
        false => 0.0,
    };
    Ok(report)
}

/// The pack records of the source manifests the target lacks (to open each copied pack's
/// chunks). A manifest that cannot be read is reported when its turn comes.
async fn new_manifests_records(
    source: &Reader,
    src: &BTreeMap<Object, u64>,
    dst: &BTreeMap<Object, u64>,
) -> Result<HashMap<PackId, PackRecord>, CopyError> {
    let mut records = HashMap::new();
    for o in src.keys() {
        let Object::Manifest(id) = o else { continue };
        // The same size: the same manifest (a repacked one is read again).
        if dst.get(o) == src.get(o) {
            continue;
        }
        match source.read::<Manifest>(id).await {
            Ok(m) => records.extend(m.packs.into_iter().map(|p| (p.id, p))),
            Err(ReadError::Store(e)) => return Err(e.into()),
            // Reported when its turn comes: vanished, or damaged.
            Err(_) => {}
        }
    }
    Ok(records)
}

/// What every transfer of a copy shares.
struct Context {
    source: Reader,
    target: Writer,
    /// The target, read-only: opens each object as the target will.
    checker: Reader,
    records: HashMap<PackId, PackRecord>,
    /// Packs and chunks on the target: listed, then each one copied.
    on_target: std::sync::Mutex<OnTarget>,
}

#[derive(Default)]
struct OnTarget {
    packs: BTreeSet<PackId>,
    chunks: BTreeSet<ChunkId>,
}

impl OnTarget {
    fn of(listing: &BTreeMap<Object, u64>) -> OnTarget {
        let mut out = OnTarget::default();
        listing.keys().for_each(|o| out.add(o));
        out
    }

    fn add(&mut self, o: &Object) {
        match o {
            Object::Pack(id) => {
                self.packs.insert(*id);
            }
            Object::Chunk(id) => {
                self.chunks.insert(*id);
            }
            _ => {}
        }
    }

    /// What of `needs` is not on the target, in words; `None` when all of it is.
    fn lacking(&self, needs: &objects::Needs) -> Option<String> {
        let packs = needs.packs.iter().filter(|p| !self.packs.contains(p)).count();
        let chunks = needs.chunks.iter().filter(|c| !self.chunks.contains(c)).count();
        (packs + chunks > 0).then(|| format!("{packs} packs and {chunks} chunks are not on the target"))
    }
}

/// What became of one object.
enum Outcome {
    Copied(u64),
    Present(u64),
    Repaired(u64),
    Vanished,
    Damaged(String),
    Conflict(String),
    Waiting(String),
}

async fn run_phase(
    ctx: &Arc<Context>,
    todo: Vec<(Object, u64, Option<u64>)>,
    parallel: usize,
    report: &mut CopyReport,
) -> Result<(), CopyError> {
    let results = futures::stream::iter(todo)
        .map(|(o, size, there)| {
            let ctx = ctx.clone();
            async move {
                let outcome = transfer(&ctx, &o, size, there).await;
                (o, outcome)
            }
        })
        .buffer_unordered(parallel);
    futures::pin_mut!(results);
    while let Some((o, outcome)) = results.next().await {
        let key = o.key();
        match outcome? {
            Outcome::Copied(n) => {
                ctx.on_target.lock().unwrap_or_else(|e| e.into_inner()).add(&o);
                report.copied.add(n);
            }
            Outcome::Present(n) => report.present.add(n),
            Outcome::Repaired(n) => {
                tracing::warn!(%key, "the target's copy was damaged: replaced by the source's");
                report.repaired.add(n);
            }
            Outcome::Vanished => report.vanished += 1,
            Outcome::Damaged(why) => {
                tracing::error!(%key, "damaged in the source, not copied: {why}");
                report.damaged.push(Skipped { key, why });
            }
            Outcome::Conflict(why) => {
                tracing::error!(%key, "{why}");
                report.conflicts.push(Skipped { key, why });
            }
            Outcome::Waiting(why) => {
                tracing::warn!(%key, "not copied yet: {why}");
                report.waiting.push(Skipped { key, why });
            }
        }
    }
    Ok(())
}

/// Read one object from the source, check it as the target opens it, write it.
async fn transfer(
    ctx: &Arc<Context>,
    o: &Object,
    size: u64,
    there: Option<u64>,
) -> Result<Outcome, CopyError> {
    let key = o.key();
    let Some(bytes) = ctx.source.store().get(&key).await? else {
        return Ok(Outcome::Vanished);
    };
    let target = ctx.target.writable();
    if there.is_some() && !o.write_once() && target.get(&key).await?.as_ref() == Some(&bytes) {
        return Ok(Outcome::Present(size));
    }
    let needs = match check(ctx, o, bytes.clone()).await? {
        Ok(needs) => needs,
        Err(why) => return Ok(Outcome::Damaged(why.to_string())),
    };
    if let Some(why) = ctx
        .on_target
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .lacking(&needs)
    {
        return Ok(Outcome::Waiting(why));
    }
    let len = bytes.len() as u64;
    if there.is_some() && o.write_once() {
        // Written once, yet not the size the source has: damaged on the target, or different.
        let (theirs, their_bytes) = match target.get(&key).await? {
            Some(b) => (check(ctx, o, b.clone()).await?.ok(), b),
            None => (None, Bytes::new()),
        };
        match (theirs, o) {
            // A manifest the source's expire wrote again over new packs (now on the target):
            // the same backup, only its packs and generation differ.
            (Some(theirs), Object::Manifest(id))
                if needs.generation > theirs.generation
                    && objects::same_backup(ctx.checker.sealer(), id, &bytes, &their_bytes) =>
            {
                target.put(&key, bytes).await?;
                return Ok(Outcome::Copied(len));
            }
            (Some(_), _) => {
                return Ok(Outcome::Conflict(
                    "the target holds an intact object of this name with other bytes".into(),
                ));
            }
            (None, _) => {}
        }
        target.put(&key, bytes).await?;
        return Ok(Outcome::Repaired(len));
    }
    if !o.create_only() {
        target.put(&key, bytes).await?;
        return Ok(Outcome::Copied(len));
    }
    match target.put_new(&key, bytes.clone()).await? {
        PutNew::Created => Ok(Outcome::Copied(len)),
        PutNew::AlreadyExists => match target.get(&key).await? {
            Some(t) if t == bytes => Ok(Outcome::Present(len)),
            _ => Ok(Outcome::Conflict(
                "written to the target meanwhile, with other bytes".into(),
            )),
        },
    }
}

/// Open `bytes` of `o` as the target would, off the async threads: what it needs, or why it is
/// damaged.
async fn check(
    ctx: &Arc<Context>,
    o: &Object,
    bytes: Bytes,
) -> Result<Result<objects::Needs, objects::CheckError>, CopyError> {
    let (ctx, o) = (ctx.clone(), o.clone());
    tokio::task::spawn_blocking(move || o.check(&ctx.checker, &bytes, &ctx.records))
        .await
        .map_err(|e| CopyError::Task(e.to_string()))
}
