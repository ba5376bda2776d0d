//! Expire's last step: reclaim the dead bytes of packs ([`crate::basebackup::pack_space`]).
//!
//! It runs under the expire lock, only once the lock protocol has shown that no backup is in
//! progress (a backup names the packs of its base in its own manifest: it yields to this lock,
//! and reads its base after). In order, so that a repack cut off anywhere leaves every kept
//! backup restorable:
//!
//! 1. each chosen pack is read whole and checked (it hashes to its name, every chunk its record
//!    lists opens); a pack that is missing or damaged is left as it is, and said;
//! 2. its live chunks, as sealed bytes, go into new packs, each written (create-only, named by
//!    its hash) before any manifest names it;
//! 3. every kept manifest that lists a rewritten pack is written again, listing the new packs
//!    instead, one generation on: it references the same chunks with the same bytes;
//! 4. the old packs, listed by no manifest any more, are deleted by the *next* expire, as any
//!    unlisted pack is: a restore or copy that read a manifest before step 3 still finds its packs
//!    until then.

use std::collections::HashSet;

use futures::StreamExt;
use serde::Serialize;

use crate::basebackup::Manifest;
use crate::basebackup::chunk::check_pack;
use crate::basebackup::pack::{PackId, PackRecord};
use crate::basebackup::pack_space::{self, PackUse, Repacker, Space};
use crate::repo::Writer;
use crate::repo::layout;
use crate::repo::locks::Lock;
use crate::repo::object::ObjectKind;
use crate::repo::store::PutNew;

use super::ExpireError;

/// Packs read at once (4 MiB each).
const READ_AHEAD: usize = 2;

/// Pack bytes one expire rewrites at most; the rest waits for the next one. An expire holds the
/// lock backups wait for (30 minutes at most): the first expire of a large repository with much
/// dead must not keep them waiting past that.
const REPACK_BUDGET: u64 = 4 << 30;

/// What the repack did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RepackReport {
    /// The share of pack bytes allowed to stay dead, in percent.
    pub max_dead_percent: u8,
    /// The packs the kept backups list, before the repack.
    pub before: Space,
    /// ... and after it (the rewritten packs no longer counted).
    pub after: Space,
    /// Packs rewritten, and their bytes.
    pub packs: u64,
    pub bytes: u64,
    /// Bytes of live chunks copied into new packs, and those packs.
    pub live_bytes: u64,
    pub new_packs: u64,
    /// Kept manifests written again, listing the new packs.
    pub manifests: u64,
    /// Packs chosen but left as they are: missing or damaged (`restore-agent verify --deep`).
    pub skipped: Vec<String>,
}

/// Rewrite the packs the `kept` manifests list until at most `max_dead` percent of their bytes
/// is dead. With `lock` `None` (a dry run), only say what would be done.
pub(super) async fn repack(
    repo: &Writer,
    kept: &[&Manifest],
    max_dead: u8,
    lock: Option<&Lock>,
) -> Result<RepackReport, ExpireError> {
    let usage = pack_space::usage(kept.iter().copied());
    let chosen = pack_space::within(&usage, pack_space::choose(&usage, max_dead), REPACK_BUDGET);
    let before = Space::of(&usage);
    let mut report = RepackReport {
        max_dead_percent: max_dead,
        before,
        after: before,
        ..RepackReport::default()
    };
    let Some(lock) = lock else {
        for id in &chosen {
            report.count_rewritten(&usage[id].record, usage[id].live_bytes);
        }
        report.after.packs = before.packs + report.new_packs - report.packs;
        report.after.bytes = before.bytes - report.bytes + report.live_bytes;
        report.after.dead_bytes = before.dead_bytes - (report.bytes - report.live_bytes);
        return Ok(report);
    };
    if chosen.is_empty() {
        return Ok(report);
    }
    let live = pack_space::live_chunks(kept.iter().copied());
    let packs: Vec<PackUse> = chosen.iter().map(|id| usage[id].clone()).collect();
    let mut repacker = Repacker::default();
    let repacked = copy_live(repo, packs, &live, &mut repacker, &mut report).await?;
    if repacked.is_empty() {
        return Ok(report);
    }
    // The new packs are all written: each kept manifest may now name them, as long as this
    // expire's lock holds (checked before each write, as a backup checks before its manifest:
    // another expire that found it stale would delete the new packs as unlisted).
    let mut after: Vec<Manifest> = Vec::with_capacity(kept.len());
    for m in kept {
        if !m.packs.iter().any(|p| repacked.contains(&p.id)) {
            after.push((*m).clone());
            continue;
        }
        // Rewritten from the manifest as stored, whole: the catalog's copy lacks each file's
        // stat and stored lengths, which the next backup's reuse reads.
        let whole = crate::catalog::load_manifest(repo.store(), repo.sealer(), &m.id).await?;
        if whole.packs != m.packs {
            return Err(ExpireError::Rewrite {
                id: m.id.clone(),
                why: "it changed while the expire ran".into(),
            });
        }
        let new = repacker
            .rewrite(&whole, &repacked)
            .expect("lists a repacked pack");
        if !lock.still_held().await? {
            return Err(ExpireError::LockLost);
        }
        write_manifest(repo, &new).await?;
        report.manifests += 1;
        after.push(new);
    }
    report.after = Space::of(&pack_space::usage(after.iter()));
    tracing::info!(
        packs = report.packs,
        new_packs = report.new_packs,
        live_bytes = report.live_bytes,
        manifests = report.manifests,
        "repacked: dead bytes {} -> {}",
        report.before.dead_bytes,
        report.after.dead_bytes
    );
    Ok(report)
}

impl RepackReport {
    fn count_rewritten(&mut self, record: &PackRecord, live_bytes: u64) {
        self.packs += 1;
        self.bytes += record.len();
        self.live_bytes += live_bytes;
        // As the packs would be filled: live bytes in packs of about PACK_TARGET.
        self.new_packs = self
            .live_bytes
            .div_ceil(crate::basebackup::pack::PACK_TARGET as u64);
    }
}

/// Read and check each old pack, READ_AHEAD at a time, and copy its live chunks into new packs,
/// written as they fill; the packs whose live chunks are all in new packs.
async fn copy_live(
    repo: &Writer,
    packs: Vec<PackUse>,
    live: &HashSet<crate::basebackup::chunk_id::ChunkId>,
    repacker: &mut Repacker,
    report: &mut RepackReport,
) -> Result<HashSet<PackId>, ExpireError> {
    let store = repo.store().clone();
    let sealer = repo.sealer().clone();
    let mut reads = futures::stream::iter(packs)
        .map(|pack| {
            let (store, sealer) = (store.clone(), sealer.clone());
            async move {
                let record = &pack.record;
                let bytes = store.get(&layout::pack_key(&record.id)).await?;
                let checked = match bytes {
                    None => Err("missing".to_string()),
                    Some(bytes) => {
                        let r = record.clone();
                        tokio::task::spawn_blocking(move || {
                            check_pack(&sealer, r.id, &bytes, Some(&r))
                                .map(|()| bytes)
                                .map_err(|e| e.to_string())
                        })
                        .await
                        .map_err(|e| ExpireError::Task(e.to_string()))?
                    }
                };
                Ok::<_, ExpireError>((pack, checked))
            }
        })
        .buffered(READ_AHEAD);
    let mut repacked = HashSet::new();
    while let Some(read) = reads.next().await {
        let (PackUse { record, live_bytes }, checked) = read?;
        let bytes = match checked {
            Ok(bytes) => bytes,
            Err(why) => {
                tracing::error!(pack = %record.id, "not repacked: {why}");
                report
                    .skipped
                    .push(format!("{}: {why}", layout::pack_key(&record.id)));
                continue;
            }
        };
        for (bytes, new) in repacker.add_pack(&record, &bytes, live) {
            write_pack(repo, bytes, &new).await?;
        }
        report.count_rewritten(&record, live_bytes);
        repacked.insert(record.id);
    }
    if let Some((bytes, new)) = repacker.finish() {
        write_pack(repo, bytes, &new).await?;
    }
    report.new_packs = repacker.records().len() as u64;
    Ok(repacked)
}

/// Write a new pack; one already there under its name holds the same bytes (named by their
/// hash).
async fn write_pack(repo: &Writer, bytes: bytes::Bytes, record: &PackRecord) -> Result<(), ExpireError> {
    match repo
        .writable()
        .put_new(&layout::pack_key(&record.id), bytes)
        .await?
    {
        PutNew::Created | PutNew::AlreadyExists => Ok(()),
    }
}

/// Write `m` again over its earlier generation.
async fn write_manifest(repo: &Writer, m: &Manifest) -> Result<(), ExpireError> {
    m.validate().map_err(|e| ExpireError::Rewrite {
        id: m.id.clone(),
        why: e.to_string(),
    })?;
    let sealed = repo
        .sealer()
        .seal_writer(ObjectKind::Manifest, m.id.as_str(), 3, |w| {
            serde_json::to_writer(w, m).map_err(std::io::Error::other)
        })
        .map_err(|e| ExpireError::Rewrite {
            id: m.id.clone(),
            why: e.to_string(),
        })?;
    repo.writable()
        .put(&layout::manifest_key(&m.id), sealed.bytes)
        .await?;
    Ok(())
}

impl RepackReport {
    /// One or two lines of expire's report.
    pub(super) fn render(&self, out: &mut String, dry_run: bool) {
        use crate::report::human_bytes;
        use std::fmt::Write;
        let share = |s: &Space| {
            format!(
                "{} of {} ({:.1}%)",
                human_bytes(s.dead_bytes),
                human_bytes(s.bytes),
                s.dead_percent()
            )
        };
        if self.packs == 0 {
            let _ = writeln!(
                out,
                "dead chunks in packs: {}, within the {}% allowed: nothing to repack",
                share(&self.before),
                self.max_dead_percent
            );
        } else {
            let verb = if dry_run { "would repack" } else { "repacked" };
            let _ = writeln!(
                out,
                "{verb} {} packs ({}) into {} new ones ({} of live chunks), {} manifests written again; dead chunks in packs: {} -> {}",
                self.packs,
                human_bytes(self.bytes),
                self.new_packs,
                human_bytes(self.live_bytes),
                self.manifests,
                share(&self.before),
                share(&self.after)
            );
            if !dry_run {
                let _ = writeln!(
                    out,
                    "the {} packs repacked are deleted by the next expire",
                    self.packs
                );
            }
        }
        for s in &self.skipped {
            let _ = writeln!(out, "not repacked: {s}");
        }
    }
}
