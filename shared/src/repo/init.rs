//! What `archive-agent init --pgdata` records: the identity of the cluster in a data directory.
//!
//! Read from the WAL itself (the first page of a segment in `pg_wal`, whose long header names
//! the system identifier, segment size and block size, and whose magic names the version), with
//! the same checks push applies to every segment: the identity recorded is exactly the one push
//! will compare against, for every supported version, with no version-specific `pg_control`
//! layout to read.

use std::path::Path;

use super::identity::ClusterIdentity;
use crate::wal::WalFileName;

/// Segments tried, newest first: recycled segments ahead of the current one hold an older
/// segment's pages and fail the check against their own name.
const SEGMENTS_TRIED: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error(
        "{pg_wal} holds no WAL segment whose first page is valid (is {pgdata} a PostgreSQL data directory of a supported version, {supported}?)"
    )]
    NoSegment {
        pg_wal: String,
        pgdata: String,
        supported: String,
    },
}

/// The cluster a data directory belongs to, from the newest valid segment in its `pg_wal`.
pub fn cluster_of_data_dir(pgdata: &Path) -> Result<ClusterIdentity, InitError> {
    let pg_wal = pgdata.join("pg_wal");
    let read_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| InitError::Read { path, source }
    };
    let mut segments: Vec<_> = std::fs::read_dir(&pg_wal)
        .map_err(read_err(&pg_wal))?
        .flatten()
        .filter_map(|e| match e.file_name().to_str()?.parse::<WalFileName>() {
            Ok(WalFileName::Segment(seg)) => Some(seg),
            _ => None,
        })
        .collect();
    segments.sort_unstable_by_key(|s| std::cmp::Reverse(s.to_string()));
    for seg in segments.into_iter().take(SEGMENTS_TRIED) {
        let path = pg_wal.join(seg.to_string());
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // a checkpoint removed it
            Err(e) => return Err(read_err(&path)(e)),
        };
        if let Ok(info) = crate::wal::page::validate_segment(&bytes, &seg) {
            return Ok(ClusterIdentity::from(&info));
        }
    }
    Err(InitError::NoSegment {
        pg_wal: pg_wal.display().to_string(),
        pgdata: pgdata.display().to_string(),
        supported: crate::wal::version::supported_range(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::testwal;

    #[test]
    fn the_newest_valid_segment_names_the_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let pg_wal = dir.path().join("pg_wal");
        std::fs::create_dir(&pg_wal).unwrap();
        assert!(matches!(
            cluster_of_data_dir(dir.path()),
            Err(InitError::NoSegment { .. })
        ));
        let Ok(WalFileName::Segment(seg)) = "000000010000000000000003".parse() else {
            unreachable!()
        };
        let seg_size: u32 = 16 << 20;
        let mut w = testwal::WalWriter::new(3 * u64::from(seg_size), seg_size, 8192);
        w.sysid = 42;
        w.magic = crate::wal::version::for_major(16).unwrap().magic;
        w.record(testwal::RM_HEAP_ID, 0, 1, &testwal::main_data(b"x"));
        let mut bytes = w.bytes;
        bytes.resize(seg_size as usize, 0);
        std::fs::write(pg_wal.join(seg.to_string()), &bytes).unwrap();
        // A recycled segment ahead of it: the old pages fail the check against the new name.
        std::fs::write(pg_wal.join("000000010000000000000004"), &bytes).unwrap();
        std::fs::write(pg_wal.join("00000001.history"), b"x").unwrap();
        let c = cluster_of_data_dir(dir.path()).unwrap();
        assert_eq!(c.system_identifier, 42);
        assert_eq!(c.wal_segment_size, 16 << 20);
        assert_eq!(c.pg_version, 16);
    }
}
