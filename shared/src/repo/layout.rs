//! Where each object lives in the repository (relative to the repository prefix): every key is
//! built, and every listed key parsed back, here and nowhere else.
//!
//! ```text
//! walvault.json                                    repository descriptor (format, id, cluster)
//! cluster.json                                     cluster identity, when init was not given it
//! retention.json                                   the policy the last expire applied
//! wal/<timeline><log>/<segment>.wvo                segments, .partial and .backup files
//! wal/history/<timeline>.history.wvo               timeline history files
//! index/<timeline><log>/<segment>.wvo              time index: one summary per segment
//! backups/<backup id>/manifest.wvo                 base backup manifests
//! backups/<backup id>/pinned.json                  a pin: expire never deletes the backup
//! locks/<kind>-<32 hex>.json                       a backup, expire or pin in progress
//! chunks/<first 2 hex>/<blake3 hex>.wvo            content-addressed base backup chunks
//! packs/<first 2 hex>/<blake3 hex>.wvp             packs of sealed chunks (manifest v2)
//! probe/create-only-<repository id>                init's probe of create-only writes (deleted)
//! stream/<timeline><log>/<segment>/<from>-<to>.wvo  pieces of the segment being streamed
//! ```
//! Keys are built only from validated names and ids, so no key can leave the prefix; a listed key
//! is recognised only if building it back from what it names gives the same key, so a foreign or
//! misplaced object is ignored, never misread.

use crate::basebackup::BackupId;
use crate::basebackup::chunk_id::{ChunkId, PackId};
use crate::wal::{SegmentName, WalFileName};

/// Prefix of the object `archive-agent init` writes twice to learn whether the store refuses
/// a second create-only write (deleted right after).
pub const PROBE_PREFIX: &str = "probe/create-only-";
/// The repository descriptor.
pub const DESCRIPTOR_KEY: &str = "walvault.json";
/// The cluster identity bound by the first archived segment when `init` had no data directory.
pub const CLUSTER_KEY: &str = "cluster.json";
/// The retention policy the last expire applied (what `verify` holds the WAL to).
pub const RETENTION_KEY: &str = "retention.json";
/// Suffix of a sealed walvault object.
pub const OBJECT_SUFFIX: &str = ".wvo";

/// The kinds of object that live under a directory of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Wal,
    Index,
    Backup,
    Chunk,
    Pack,
    Lock,
    Drill,
}

impl Kind {
    /// The directory (a listing prefix) holding every object of this kind.
    pub fn dirname(self) -> &'static str {
        match self {
            Kind::Wal => "wal/",
            Kind::Index => "index/",
            Kind::Backup => "backups/",
            Kind::Chunk => "chunks/",
            Kind::Pack => "packs/",
            Kind::Lock => "locks/",
            Kind::Drill => "drills/",
        }
    }
}

/// The key of the object that stores `name`. Segments are grouped per timeline and 4 GiB log id
/// (256 segments of 16 MiB), so no directory or listing grows without bound.
pub fn wal_key(name: &WalFileName) -> String {
    match name {
        WalFileName::History(_) => format!("wal/history/{name}{OBJECT_SUFFIX}"),
        WalFileName::Segment(s) | WalFileName::Partial(s) | WalFileName::Backup { segment: s, .. } => {
            format!("wal/{:08X}{:08X}/{name}{OBJECT_SUFFIX}", s.timeline.get(), s.log)
        }
    }
}

/// The listing prefix of the stream pieces of segment `seg`.
pub fn stream_segment_prefix(seg: &SegmentName) -> String {
    format!("stream/{:08X}{:08X}/{seg}/", seg.timeline.get(), seg.log)
}

/// The name a stream piece's header carries: `<segment>/<from>-<to>`, byte offsets in hex.
pub fn stream_piece_name(seg: &SegmentName, from: u32, to: u32) -> String {
    format!("{seg}/{from:08X}-{to:08X}")
}

/// The key of the piece of segment `seg` holding its bytes `from..to`.
pub fn stream_piece_key(seg: &SegmentName, from: u32, to: u32) -> String {
    format!(
        "stream/{:08X}{:08X}/{}{OBJECT_SUFFIX}",
        seg.timeline.get(),
        seg.log,
        stream_piece_name(seg, from, to)
    )
}

/// The segment and byte range a listed stream piece key names.
pub fn parse_stream_piece_key(key: &str) -> Option<(SegmentName, u32, u32)> {
    let rest = key.strip_prefix("stream/")?.strip_suffix(OBJECT_SUFFIX)?;
    let (_, name) = rest.split_once('/')?;
    let (seg, range) = name.split_once('/')?;
    let Ok(WalFileName::Segment(seg)) = seg.parse::<WalFileName>() else {
        return None;
    };
    let (from, to) = range.split_once('-')?;
    let (from, to) = (
        u32::from_str_radix(from, 16).ok()?,
        u32::from_str_radix(to, 16).ok()?,
    );
    (from < to && stream_piece_key(&seg, from, to) == key).then_some((seg, from, to))
}

/// The key of the time index summary of segment `seg`.
pub fn summary_key(seg: &SegmentName) -> String {
    format!(
        "index/{:08X}{:08X}/{seg}{OBJECT_SUFFIX}",
        seg.timeline.get(),
        seg.log
    )
}

/// The key of backup `id`'s manifest.
pub fn manifest_key(id: &BackupId) -> String {
    format!("backups/{id}/manifest{OBJECT_SUFFIX}")
}

/// The key of backup `id`'s relation map (`crate::basebackup::relmap`).
pub fn relation_map_key(id: &BackupId) -> String {
    format!("backups/{id}/relations{OBJECT_SUFFIX}")
}

/// The backup a listed key under [`Kind::Backup`] is the relation map of.
pub fn parse_relation_map_key(key: &str) -> Option<BackupId> {
    let id: BackupId = key
        .strip_prefix("backups/")?
        .strip_suffix(&format!("/relations{OBJECT_SUFFIX}"))?
        .parse()
        .ok()?;
    (relation_map_key(&id) == key).then_some(id)
}

/// The key of a drill's evidence; `id` is its start, `YYYYMMDDTHHMMSSZ`.
pub fn drill_key(id: &BackupId) -> String {
    format!("drills/{id}.json")
}

/// The drill a listed key under [`Kind::Drill`] is the evidence of.
pub fn parse_drill_key(key: &str) -> Option<BackupId> {
    let id: BackupId = key.strip_prefix("drills/")?.strip_suffix(".json")?.parse().ok()?;
    (drill_key(&id) == key).then_some(id)
}

/// The key of backup `id`'s pin.
pub fn pin_key(id: &BackupId) -> String {
    format!("backups/{id}/pinned.json")
}

/// The backup a listed key under [`Kind::Backup`] is the pin of.
pub fn parse_pin_key(key: &str) -> Option<BackupId> {
    let id: BackupId = key
        .strip_prefix("backups/")?
        .strip_suffix("/pinned.json")?
        .parse()
        .ok()?;
    (pin_key(&id) == key).then_some(id)
}

/// The key of a lock: `kind` is a lower-case word, `token` 32 lower-case hex digits.
pub fn lock_key(kind: &str, token: &str) -> Option<String> {
    let ok = !kind.is_empty()
        && kind.bytes().all(|b| b.is_ascii_lowercase())
        && token.len() == 32
        && token.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then(|| format!("locks/{kind}-{token}.json"))
}

/// The (kind, token) of a listed key under [`Kind::Lock`].
pub fn parse_lock_key(key: &str) -> Option<(&str, &str)> {
    let (kind, token) = key
        .strip_prefix("locks/")?
        .strip_suffix(".json")?
        .split_once('-')?;
    (lock_key(kind, token).as_deref() == Some(key)).then_some((kind, token))
}

/// The key of chunk `id`: `chunks/<first two hex digits>/<id>.wvo`.
pub fn chunk_key(id: &ChunkId) -> String {
    let hex = id.to_string();
    format!("chunks/{}/{hex}{OBJECT_SUFFIX}", &hex[..2])
}

/// Suffix of a pack: sealed chunks one after the other, not itself a sealed object.
pub const PACK_SUFFIX: &str = ".wvp";

/// The key of pack `id`: `packs/<first two hex digits>/<id>.wvp`.
pub fn pack_key(id: &PackId) -> String {
    let hex = id.to_string();
    format!("packs/{}/{hex}{PACK_SUFFIX}", &hex[..2])
}

/// The pack a listed key under [`Kind::Pack`] stores.
pub fn parse_pack_key(key: &str) -> Option<PackId> {
    let id: PackId = key.rsplit('/').next()?.strip_suffix(PACK_SUFFIX)?.parse().ok()?;
    (pack_key(&id) == key).then_some(id)
}

/// The WAL file a listed key under [`Kind::Wal`] stores.
pub fn parse_wal_key(key: &str) -> Option<WalFileName> {
    let name: WalFileName = last_name(key)?.parse().ok()?;
    (wal_key(&name) == key).then_some(name)
}

/// The segment a listed key under [`Kind::Index`] summarises.
pub fn parse_summary_key(key: &str) -> Option<SegmentName> {
    let WalFileName::Segment(seg) = last_name(key)?.parse().ok()? else {
        return None;
    };
    (summary_key(&seg) == key).then_some(seg)
}

/// The backup a listed key under [`Kind::Backup`] is the manifest of.
pub fn parse_manifest_key(key: &str) -> Option<BackupId> {
    let id: BackupId = key
        .strip_prefix("backups/")?
        .strip_suffix("/manifest.wvo")?
        .parse()
        .ok()?;
    (manifest_key(&id) == key).then_some(id)
}

/// The chunk a listed key under [`Kind::Chunk`] stores.
pub fn parse_chunk_key(key: &str) -> Option<ChunkId> {
    let id: ChunkId = last_name(key)?.parse().ok()?;
    (chunk_key(&id) == key).then_some(id)
}

fn last_name(key: &str) -> Option<&str> {
    key.rsplit('/').next()?.strip_suffix(OBJECT_SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> String {
        wal_key(&s.parse().unwrap())
    }

    fn seg(s: &str) -> SegmentName {
        match s.parse() {
            Ok(WalFileName::Segment(seg)) => seg,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn keys_are_stable() {
        // These paths are part of the repository format: changing them orphans existing archives.
        assert_eq!(
            key("000000010000000A000000FF"),
            "wal/000000010000000A/000000010000000A000000FF.wvo"
        );
        assert_eq!(
            key("000000020000000000000003.partial"),
            "wal/0000000200000000/000000020000000000000003.partial.wvo"
        );
        assert_eq!(
            key("000000010000000000000002.00000028.backup"),
            "wal/0000000100000000/000000010000000000000002.00000028.backup.wvo"
        );
        assert_eq!(key("00000002.history"), "wal/history/00000002.history.wvo");
        let seg = seg("000000030000000100000002");
        assert_eq!(
            summary_key(&seg),
            "index/0000000300000001/000000030000000100000002.wvo"
        );
        let id: BackupId = "20261121T143200Z".parse().unwrap();
        assert_eq!(manifest_key(&id), "backups/20261121T143200Z/manifest.wvo");
        let chunk: ChunkId = "ab".repeat(32).parse().unwrap();
        assert_eq!(chunk_key(&chunk), format!("chunks/ab/{chunk}.wvo"));
    }

    #[test]
    fn listed_keys_parse_back_only_where_they_belong() {
        for name in [
            "000000010000000A000000FF",
            "000000020000000000000003.partial",
            "00000002.history",
        ] {
            assert_eq!(
                parse_wal_key(&key(name)).map(|n| n.to_string()).as_deref(),
                Some(name)
            );
        }
        // The right name in the wrong directory, or no suffix: not ours.
        assert_eq!(
            parse_wal_key("wal/0000000100000000/000000010000000A000000FF.wvo"),
            None
        );
        assert_eq!(
            parse_wal_key("wal/000000010000000A/000000010000000A000000FF"),
            None
        );
        assert_eq!(parse_wal_key("wal/x/00000002.history.wvo"), None);
        let seg = seg("000000030000000100000002");
        assert_eq!(parse_summary_key(&summary_key(&seg)), Some(seg));
        assert_eq!(parse_summary_key(&key("000000030000000100000002")), None);
        let id: BackupId = "20261121T143200Z".parse().unwrap();
        assert_eq!(parse_manifest_key(&manifest_key(&id)), Some(id.clone()));
        assert_eq!(parse_manifest_key("backups/../manifest.wvo"), None);
        let chunk: ChunkId = "0f".repeat(32).parse().unwrap();
        assert_eq!(parse_chunk_key(&chunk_key(&chunk)), Some(chunk));
        assert_eq!(parse_chunk_key(&format!("chunks/00/{chunk}.wvo")), None);
        let pack: PackId = "1e".repeat(32).parse().unwrap();
        assert_eq!(pack_key(&pack), format!("packs/1e/{pack}.wvp"));
        assert_eq!(parse_pack_key(&pack_key(&pack)), Some(pack));
        assert_eq!(parse_pack_key(&format!("packs/00/{pack}.wvp")), None);
        assert_eq!(parse_pack_key(&format!("packs/1e/{pack}.wvo")), None);
        // Only a chunk id becomes a key: a hostile name never parses as one.
        assert!("../../walvault.json".parse::<ChunkId>().is_err());
        assert!("AB".repeat(32).parse::<ChunkId>().is_err());
        assert_eq!(
            parse_chunk_key(&format!("chunks/ab/{}.wvo", "AB".repeat(32))),
            None
        );
        assert_eq!(parse_pin_key(&pin_key(&id)), Some(id.clone()));
        assert_eq!(parse_pin_key("backups/x/pinned.json"), None);
        let lock = lock_key("backup", &"0a".repeat(16)).unwrap();
        assert_eq!(lock, format!("locks/backup-{}.json", "0a".repeat(16)));
        assert_eq!(parse_lock_key(&lock), Some(("backup", "0a".repeat(16).as_str())));
        assert_eq!(lock_key("../x", &"0a".repeat(16)), None);
        assert_eq!(parse_lock_key("locks/backup-zz.json"), None);
    }
}
