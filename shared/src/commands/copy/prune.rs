//! `archive-agent copy --prune`: remove from the copy what `expire` removed from the source, and
//! nothing else.
//!
//! An object missing from the source is not proof that expire removed it: a bucket emptied by
//! mistake or by an attacker is missing everything, and a copy that followed it would be no copy.
//! So each kind is pruned only where expire's own rules would have put the hole:
//! - nothing at all while the source holds no backup;
//! - a backup (manifest, relation map, pin) only if older than the source's newest backup,
//!   which expire always keeps;
//! - WAL files and time index summaries only below the oldest segment the source still holds
//!   (expire removes WAL from the old end only; history files are never removed);
//! - a pin whose backup the source still holds but no longer pins (unpinned there);
//! - a stream piece only once the target holds its whole segment;
//! - chunks and packs only when no manifest left on the target needs them.
//!
//! Deleted in expire's order: backups first, then WAL, then data, so a prune cut off anywhere
//! leaves every backup on the target restorable.

use std::collections::{BTreeMap, BTreeSet};

use super::objects::Object;
use super::{CopyError, CopyReport};
use crate::basebackup::BackupId;
use crate::basebackup::manifest::Manifest;
use crate::repo::{Reader, Writer};
use crate::wal::WalFileName;

/// The keys to delete, in three waves, and their bytes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PrunePlan {
    pub backups: Vec<(String, u64)>,
    pub wal: Vec<(String, u64)>,
    /// Chunks and packs absent on the source: kept unless no remaining manifest needs them.
    pub data_candidates: Vec<(Object, u64)>,
}

/// Why a prune deletes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the source holds no backup (emptied? a copy never follows a source that lost everything)")]
pub struct SourceHoldsNoBackup;

/// What the source's listing `src` and the target's `dst` say the prune may delete.
pub fn plan(
    src: &BTreeMap<Object, u64>,
    dst: &BTreeMap<Object, u64>,
) -> Result<PrunePlan, SourceHoldsNoBackup> {
    let src_backups: BTreeSet<&BackupId> = src
        .keys()
        .filter_map(|o| match o {
            Object::Manifest(id) => Some(id),
            _ => None,
        })
        .collect();
    let Some(newest) = src_backups.last().copied() else {
        return Err(SourceHoldsNoBackup);
    };
    let oldest_wal = src
        .keys()
        .filter_map(|o| match o {
            Object::Wal(n) => position(n),
            _ => None,
        })
        .min();
    let whole_segments: BTreeSet<_> = dst
        .keys()
        .filter_map(|o| match o {
            Object::Wal(WalFileName::Segment(s)) => Some(*s),
            _ => None,
        })
        .collect();
    let mut out = PrunePlan::default();
    for (o, &size) in dst {
        if src.contains_key(o) {
            continue;
        }
        let entry = (o.key(), size);
        match o {
            Object::Manifest(id) | Object::RelationMap(id) if id < newest => out.backups.push(entry),
            Object::Pin(id) if id < newest || src_backups.contains(id) => out.backups.push(entry),
            Object::Wal(n) => {
                let below = position(n)
                    .zip(oldest_wal)
                    .is_some_and(|(at, oldest)| at < oldest);
                if below {
                    out.wal.push(entry);
                }
            }
            Object::Summary(s) if oldest_wal.is_some_and(|oldest| (s.log, s.seg) < oldest) => {
                out.wal.push(entry)
            }
            Object::StreamPiece(seg, ..) if whole_segments.contains(seg) => out.wal.push(entry),
            Object::Chunk(_) | Object::Pack(_) => out.data_candidates.push((o.clone(), size)),
            _ => {}
        }
    }
    Ok(out)
}

/// Where in the WAL a file belongs (any timeline): a segment's, a partial segment's or a backup
/// history file's segment number; `None` for a timeline history file.
fn position(n: &WalFileName) -> Option<(u32, u32)> {
    match n {
        WalFileName::Segment(s) | WalFileName::Partial(s) | WalFileName::Backup { segment: s, .. } => {
            Some((s.log, s.seg))
        }
        WalFileName::History(_) => None,
    }
}

/// Prune the target after a copy: `src` is the source's listing the copy worked from, `dst` the
/// target's listing after it.
pub async fn prune(
    _source: &Reader,
    target: &Writer,
    src: &BTreeMap<Object, u64>,
    dst: &BTreeMap<Object, u64>,
    report: &mut CopyReport,
) -> Result<(), CopyError> {
    let plan = match plan(src, dst) {
        Ok(p) => p,
        Err(why) => {
            tracing::warn!("nothing pruned: {why}");
            report.prune_refused = Some(why.to_string());
            return Ok(());
        }
    };
    let store = target.writable();
    delete(store, &plan.backups, report).await?;
    delete(store, &plan.wal, report).await?;
    if plan.data_candidates.is_empty() {
        return Ok(());
    }
    // What the manifests left on the target need: every one must be read, or no data is pruned.
    let pruned: BTreeSet<&str> = plan.backups.iter().map(|(k, _)| k.as_str()).collect();
    let mut kept = Vec::new();
    for o in dst.keys() {
        let Object::Manifest(id) = o else { continue };
        if pruned.contains(o.key().as_str()) {
            continue;
        }
        match target.read::<Manifest>(id).await {
            Ok(m) => kept.push(m),
            Err(e) => {
                let why =
                    format!("chunks and packs kept: the target's manifest of {id} cannot be read ({e})");
                tracing::warn!("{why}");
                report.prune_refused = Some(why);
                return Ok(());
            }
        }
    }
    let chunks = crate::retention::referenced_chunks(&kept);
    let packs = crate::retention::referenced_packs(&kept);
    let garbage: Vec<(String, u64)> = plan
        .data_candidates
        .into_iter()
        .filter(|(o, _)| match o {
            Object::Chunk(id) => !chunks.contains(id),
            Object::Pack(id) => !packs.contains(id),
            _ => false,
        })
        .map(|(o, size)| (o.key(), size))
        .collect();
    delete(store, &garbage, report).await
}

async fn delete(
    store: &crate::repo::WritableStore,
    keys: &[(String, u64)],
    report: &mut CopyReport,
) -> Result<(), CopyError> {
    if keys.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = keys.iter().map(|(k, _)| k.clone()).collect();
    store.delete_many(&names).await?;
    for (key, size) in keys {
        tracing::info!(%key, "pruned: expire removed it from the source");
        report.pruned.add(*size);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::basebackup::chunk_id::PackId;

    fn listing(objects: &[Object]) -> BTreeMap<Object, u64> {
        objects.iter().map(|o| (o.clone(), 100)).collect()
    }

    fn wal(name: &str) -> Object {
        Object::Wal(name.parse().unwrap())
    }

    fn backup(id: &str) -> BackupId {
        id.parse().unwrap()
    }

    #[test]
    fn an_emptied_source_prunes_nothing() {
        let dst = listing(&[
            Object::Manifest(backup("20261101T000000Z")),
            wal("000000010000000000000001"),
        ]);
        assert!(plan(&BTreeMap::new(), &dst).is_err());
        // WAL alone, no backup: still refused.
        assert!(plan(&listing(&[wal("000000010000000000000009")]), &dst).is_err());
    }

    #[test]
    fn only_what_expire_would_have_removed_is_pruned() {
        let (old, kept, newest) = (
            backup("20261101T000000Z"),
            backup("20261102T000000Z"),
            backup("20261103T000000Z"),
        );
        let src = listing(&[
            Object::Manifest(kept.clone()),
            Object::Manifest(newest.clone()),
            wal("000000010000000000000005"),
            wal("000000010000000000000006"),
        ]);
        let seg = |s: &str| match s.parse() {
            Ok(WalFileName::Segment(s)) => s,
            other => panic!("{other:?}"),
        };
        let dst = listing(&[
            Object::Manifest(old.clone()),
            Object::RelationMap(old.clone()),
            Object::Pin(kept.clone()),
            Object::Manifest(kept.clone()),
            Object::Manifest(newest.clone()),
            // A backup newer than the source's newest: the source lost it, expire did not.
            Object::Manifest(backup("20261104T000000Z")),
            wal("000000010000000000000003"),
            wal("000000010000000000000003.00000028.backup"),
            Object::Summary(seg("000000010000000000000003")),
            wal("000000010000000000000005"),
            // Above the oldest the source holds: a hole expire never makes.
            wal("000000010000000000000007"),
            wal("00000002.history"),
            Object::StreamPiece(seg("000000010000000000000005"), 0, 8192),
            Object::StreamPiece(seg("000000010000000000000008"), 0, 8192),
            Object::Pack(PackId::of(b"p")),
        ]);
        let p = plan(&src, &dst).unwrap();
        let keys = |v: &[(String, u64)]| v.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        let mut got = keys(&p.backups);
        got.sort();
        let mut want = vec![
            crate::repo::layout::relation_map_key(&old),
            crate::repo::layout::manifest_key(&old),
            crate::repo::layout::pin_key(&kept),
        ];
        want.sort();
        assert_eq!(got, want);
        let mut wal_keys = keys(&p.wal);
        wal_keys.sort();
        let mut want = vec![
            wal("000000010000000000000003").key(),
            wal("000000010000000000000003.00000028.backup").key(),
            Object::Summary(seg("000000010000000000000003")).key(),
            Object::StreamPiece(seg("000000010000000000000005"), 0, 8192).key(),
        ];
        want.sort();
        assert_eq!(wal_keys, want);
        assert_eq!(p.data_candidates.len(), 1);
    }
}
