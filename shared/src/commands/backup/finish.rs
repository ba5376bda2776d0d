//! The end of a backup, once PostgreSQL stopped it and its files are copied: where its WAL
//! ends, the wait until that WAL is in the repository, and the manifest, built from every phase
//! and written last: a backup exists once its manifest does, so an interrupted backup is never
//! offered for restore.

use std::time::Duration;

use super::BackupError;
use super::listing::Listing;
use super::session::{Server, Started, Stopped};
use super::upload::Copied;
use crate::basebackup::label::{self, BackupLabel};
use crate::basebackup::manifest::outline::Held;
use crate::basebackup::manifest::written::Lists;
use crate::basebackup::manifest::{self, Manifest};
use crate::repo::layout::{manifest_key, wal_key};
use crate::repo::locks::Lock;
use crate::repo::object::{ObjectKind, SealedBody, StreamSink};
use crate::repo::store::{CreateSemantics, PutNew};
use crate::repo::{Store, WritableStore};
use crate::wal::{Lsn, SegmentName, WalFileName};

/// The last segment a backup that started as `label` says and stopped as `stopped` says needs:
/// the one holding the byte before its stop LSN, on its timeline. From a standby, the backup
/// fails when the standby changed timelines meanwhile.
pub(super) fn stop_segment(
    label: &BackupLabel,
    stopped: &Stopped,
    seg_size: u32,
) -> Result<SegmentName, BackupError> {
    let tli = label.timeline;
    if let Some(stop) = stopped.stop_tli
        && i64::from(stop) != i64::from(tli.get())
    {
        return Err(BackupError::TimelineChanged {
            start: label.timeline,
            stop,
        });
    }
    Ok(SegmentName::containing(
        tli,
        Lsn(stopped.stop_lsn.0.saturating_sub(1)),
        seg_size,
    ))
}

/// Wait until every segment from `start` to `stop` (same timeline) is archived.
pub(super) async fn wait_for_wal(
    store: &Store,
    start: &str,
    stop: &SegmentName,
    seg_size: u32,
    timeout: Duration,
) -> Result<(), BackupError> {
    let Ok(WalFileName::Segment(start)) = start.parse::<WalFileName>() else {
        return Err(BackupError::Label(label::LabelError("a valid start WAL file")));
    };
    let (Some(first), Some(last)) = (start.segment_no(seg_size), stop.segment_no(seg_size)) else {
        return Err(BackupError::Label(label::LabelError("a segment number in range")));
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut looks = Looks::default();
    for no in first.through(last) {
        let seg = SegmentName::from_no(stop.timeline, no, seg_size);
        let key = wal_key(&WalFileName::Segment(seg));
        while store.size(&key).await?.is_none() {
            if tokio::time::Instant::now() >= deadline {
                return Err(BackupError::WalMissing {
                    missing: seg.to_string(),
                    waited: timeout,
                });
            }
            tokio::time::sleep(looks.next_pause()).await;
        }
    }
    Ok(())
}

/// How long [`wait_for_wal`] pauses before each look at the repository. The stop segment was
/// just completed, and archiving it takes tens of milliseconds when all is well (a push: its
/// process, compression and `fsync`, or its PUT): the first [`Looks::SOON`] looks are
/// [`Looks::FIRST`] apart, so that a backup with little to copy, which is mostly this wait,
/// does not sleep long past the push (doubling from the first look, a push done at 75 ms was
/// seen at 150). Then the pause doubles up to [`Looks::MOST`]: an archiver that is behind costs
/// a look or five a second, on a remote store requests.
#[derive(Debug, Default)]
struct Looks {
    made: u32,
    pause: Duration,
}

impl Looks {
    const FIRST: Duration = Duration::from_millis(10);
    const SOON: u32 = 20;
    const MOST: Duration = Duration::from_millis(200);

    fn next_pause(&mut self) -> Duration {
        self.made += 1;
        self.pause = if self.made <= Self::SOON {
            Self::FIRST
        } else {
            (self.pause * 2).min(Self::MOST)
        };
        self.pause
    }
}

/// What a backup learnt in each phase, for its manifest.
pub(super) struct Outcome {
    pub server: Server,
    pub started: Started,
    pub label: BackupLabel,
    pub stopped: Stopped,
    pub chunk_size: u64,
    /// Over the protocol: the server's `backup_manifest`, and the backup an incremental one
    /// builds on.
    pub server_manifest: Option<crate::basebackup::manifest::StoredBlob>,
    pub incremental_from: Option<crate::basebackup::manifest::BackupId>,
    pub copied: Copied,
    /// What the page check found, when pages were checked.
    pub page_checks: Option<crate::basebackup::page_checksum::PageChecks>,
}

/// The manifest of a backup that ended as `outcome` says, its WAL ending in `stop_seg`: its
/// frame, with no entries nor file records, and the list they are written from.
pub(super) fn manifest(outcome: Outcome, stop_seg: SegmentName) -> (Manifest, Listing) {
    let Outcome {
        server,
        started,
        label,
        stopped,
        chunk_size,
        copied,
        server_manifest,
        incremental_from,
        page_checks,
    } = outcome;
    // Version 3 or 4 only when it must be: a reader of version 2 restores every other backup.
    let version = if !copied.deltas.is_empty() {
        manifest::FORMAT_VERSION_DELTA
    } else if copied.listing.any_within() {
        manifest::FORMAT_VERSION_WITHIN
    } else {
        manifest::FORMAT_VERSION
    };
    let frame = Manifest {
        format: manifest::FORMAT_NAME.into(),
        version,
        id: started.id,
        system_identifier: server.sysid,
        pg_version: server.pg_version,
        timeline: label.timeline,
        start_lsn: label.start_lsn,
        stop_lsn: stopped.stop_lsn,
        start_time_us: started.start_time_us,
        stop_time_us: stopped.stop_time_us,
        start_wal: label.start_wal,
        stop_wal: stop_seg.to_string(),
        chunk_size,
        backup_label: stopped.backup_label,
        tablespace_map: stopped.spcmap.filter(|s| !s.is_empty()),
        tablespaces: copied.tablespaces,
        entries: vec![],
        stats: copied.stats,
        files_examined_after_us: Some(copied.examined_after_us),
        files: vec![],
        packs: copied.packs,
        server_manifest,
        incremental_from,
        page_checks,
        generation: 0,
        deltas: copied.deltas,
        held: Default::default(),
    };
    (frame, copied.listing)
}

/// Write `manifest` with `lists` as its entries and file records, the backup's last object,
/// while `lock` still holds: a lock gone stale means an expire may have collected chunks the
/// backup relies on. Gives back its outline ([`Held::Outline`]).
pub(super) async fn record(
    store: &WritableStore,
    sealer: &crate::repo::object::Sealer,
    lock: &Lock,
    manifest: Manifest,
    lists: &dyn Lists,
) -> Result<Manifest, BackupError> {
    // Checked as a restore will check it, before it exists.
    manifest
        .validate_lists(lists)
        .map_err(|e| BackupError::Unsound(e.to_string()))?;
    let id = &manifest.id;
    let key = manifest_key(id);
    // On a local plain repository the sealed manifest goes straight into a staging file, then
    // is published under its name (as push publishes a segment): never held in memory (6.4
    // MiB at 300,963 files, at a backup's end, where its peak is).
    let mut staged = match sealer.is_encrypted() {
        true => None,
        false => store.stage(&key)?,
    };
    let sink = match staged.as_mut().and_then(|s| s.file.take()) {
        Some(f) => StreamSink::File(f),
        None => StreamSink::Memory,
    };
    let sealed = sealer
        .seal_writer_into(ObjectKind::Manifest, id.as_str(), 3, sink, |w| {
            manifest.write_json(w, lists).map_err(std::io::Error::other)
        })
        .map_err(|e| BackupError::Read {
            path: "manifest".into(),
            source: e,
        })?;
    if !lock.still_held().await? {
        return Err(BackupError::LockLost {
            minutes: crate::repo::locks::STALE_AFTER.as_secs() / 60,
        });
    }
    let parts = match (sealed.body, staged) {
        (SealedBody::File(f), Some(mut staged)) => {
            staged.file = Some(f);
            // link(2): exclusive, and durable when it returns.
            if store.publish_new(staged).await? == PutNew::AlreadyExists {
                return Err(BackupError::Exists(manifest.id));
            }
            return Ok(outline(manifest));
        }
        (SealedBody::Parts(parts), _) => parts,
        (SealedBody::File(_), None) => unreachable!("a file sink comes from a staged object"),
    };
    // A store that ignores create-only writes (Garage, and several S3 stores) would let a backup
    // started in the same second (a scheduled one and a manual one) replace the other's
    // manifest without a word: look first.
    if store.create_semantics_for(sealed.stored_len as usize) == CreateSemantics::CheckThenWrite
        && store.reader().size(&key).await?.is_some()
    {
        return Err(BackupError::Exists(manifest.id));
    }
    if store.put_new_parts(&key, parts).await?.0 == PutNew::AlreadyExists {
        return Err(BackupError::Exists(manifest.id));
    }
    Ok(outline(manifest))
}

/// `manifest` once written: its outline ([`Held::Outline`]).
fn outline(mut manifest: Manifest) -> Manifest {
    manifest.entries = vec![];
    manifest.files = vec![];
    manifest.packs = vec![];
    manifest.deltas = vec![];
    manifest.held = Held::Outline;
    manifest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(timeline: u32) -> BackupLabel {
        BackupLabel {
            start_lsn: Lsn(0x2000028),
            start_wal: "000000010000000000000002".into(),
            timeline: crate::wal::lsn::tl(timeline),
        }
    }

    fn stopped(stop_lsn: u64, stop_tli: Option<i32>) -> Stopped {
        Stopped {
            stop_lsn: Lsn(stop_lsn),
            backup_label: String::new(),
            spcmap: None,
            stop_time_us: 0,
            stop_tli,
        }
    }

    const SEG: u32 = 16 << 20;

    #[test]
    fn the_stop_segment_holds_the_byte_before_the_stop_lsn() {
        let seg = |lsn, tli| {
            stop_segment(&label(1), &stopped(lsn, tli), SEG)
                .unwrap()
                .to_string()
        };
        assert_eq!(seg(0x3000100, None), "000000010000000000000003");
        // A stop LSN on a segment boundary: that segment is not needed.
        assert_eq!(seg(0x4000000, None), "000000010000000000000003");
        // A standby that stayed on the label's timeline.
        assert_eq!(seg(0x3000100, Some(1)), "000000010000000000000003");
    }

    #[test]
    fn the_wal_wait_looks_often_at_first_then_less_and_less_often() {
        let mut looks = Looks::default();
        let pauses: Vec<u64> = (0..30).map(|_| looks.next_pause().as_millis() as u64).collect();
        // A push done at 75 ms is seen by 80 ms, not at 150 as when the pause doubled from the
        // first look.
        assert!(pauses[..20].iter().all(|&p| p == 10), "{pauses:?}");
        assert_eq!(&pauses[20..25], &[20, 40, 80, 160, 200]);
        assert!(pauses[25..].iter().all(|&p| p == 200), "{pauses:?}");
        // An archiver that is behind costs at most 5 looks a second once past the first ones.
        let first_second: u64 = pauses[..25].iter().sum();
        assert!(first_second < 1000, "{first_second}");
    }

    #[test]
    fn a_standby_changing_timelines_fails_the_backup() {
        let err = stop_segment(&label(1), &stopped(0x3000100, Some(2)), SEG).unwrap_err();
        assert!(
            matches!(err, BackupError::TimelineChanged { start, stop: 2 } if start == 1),
            "{err}"
        );
        // A label naming timeline 0 never gets this far: it does not parse.
        assert!(
            label::parse(
                "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nSTART TIMELINE: 0\n"
            )
            .is_err()
        );
    }
}

#[cfg(test)]
mod record_tests {
    use std::sync::Arc;

    use super::*;
    use crate::basebackup::manifest::written;
    use crate::repo::fault::{Fault, FaultStore};
    use crate::repo::locks::LockKind;
    use crate::repo::object::Sealer;

    /// A store that ignores create-only writes (as Garage does): a second backup of the same id
    /// (started in the same second) is refused, and the first one's manifest stays.
    #[tokio::test]
    async fn a_second_backup_of_the_same_id_never_replaces_the_first() {
        let faults = Arc::new(FaultStore::new(Fault::IgnoreCreateOnly));
        let store = FaultStore::s3_like(&faults, std::time::Duration::from_secs(5));
        let plain = Sealer::plain();
        let lock = Lock::take(&store, &plain, LockKind::Backup, "backup")
            .await
            .unwrap();
        let first = Manifest::parse(include_bytes!("../../../tests/fixtures/manifest-v1.json")).unwrap();
        let mut second = first.clone();
        second.stop_lsn = Lsn(second.stop_lsn.0 + 8);
        let lists = |m: &Manifest| {
            let mut frame = m.clone();
            frame.entries = vec![];
            frame.files = vec![];
            (frame, m.clone())
        };
        let (frame, whole) = lists(&first);
        record(&store, &plain, &lock, frame, &written::Held::of(&whole))
            .await
            .unwrap();
        let (frame, whole) = lists(&second);
        let err = record(&store, &plain, &lock, frame, &written::Held::of(&whole))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BackupError::Exists(id) if *id == first.id),
            "{err}"
        );
        let stored = store
            .reader()
            .get(&manifest_key(&first.id))
            .await
            .unwrap()
            .unwrap();
        let opened = crate::repo::stored::open::<Manifest>(&plain, &first.id, &stored).unwrap();
        assert_eq!(
            opened.stop_lsn, first.stop_lsn,
            "the first backup's manifest is kept"
        );
    }
}
