//! The control file (`global/pg_control`) as a backup reads it: whole, and only once its CRC
//! checks, for the copy and for the system identifier of the data directory.

use std::path::Path;
use std::time::Duration;

use super::BackupError;

/// `XLOG_CONTROL_FILE`, relative to the data directory.
pub(super) const CONTROL_FILE: &str = "global/pg_control";

/// Reads of `pg_control` before giving up on a torn one.
const CONTROL_READ_ATTEMPTS: u32 = 20;

/// `global/pg_control` of a PostgreSQL `pg_version` cluster, read until its CRC checks. A
/// running server (a standby above all) rewrites it in place, and a read racing that write can
/// see half of each; a restored cluster would then refuse to start.
pub(super) async fn read_control_file(path: &Path, pg_version: u32) -> Result<Vec<u8>, BackupError> {
    for _ in 0..CONTROL_READ_ATTEMPTS {
        let bytes = tokio::fs::read(path).await.map_err(|source| BackupError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if control_crc_holds(&bytes, pg_version)? {
            return Ok(bytes);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(BackupError::ControlFile {
        path: path.display().to_string(),
        attempts: CONTROL_READ_ATTEMPTS,
        pg_version,
    })
}

/// Whether `bytes` are a PostgreSQL `pg_version` control file whose CRC checks.
pub(super) fn control_crc_holds(bytes: &[u8], pg_version: u32) -> Result<bool, BackupError> {
    let offset = crate::wal::version::for_major(pg_version)
        .ok_or(BackupError::Version(pg_version))?
        .control_crc_offset;
    let stored = bytes
        .get(offset..offset + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    Ok(stored.is_some_and(|crc| crc == crc32c::crc32c(&bytes[..offset])))
}

/// The system identifier in `global/pg_control` (its first 8 bytes in every version).
pub(super) async fn read_control_sysid(pgdata: &Path, pg_version: u32) -> Result<u64, BackupError> {
    let bytes = read_control_file(&pgdata.join(CONTROL_FILE), pg_version).await?;
    let first: [u8; 8] = bytes[..8]
        .try_into()
        .expect("a control file is longer than 8 bytes");
    Ok(u64::from_le_bytes(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A control file of `pg_version`'s layout: system identifier, then the CRC where it sits.
    fn control_file(pg_version: u32, sysid: u64) -> Vec<u8> {
        let offset = crate::wal::version::for_major(pg_version)
            .unwrap()
            .control_crc_offset;
        let mut bytes = vec![0u8; 8192];
        bytes[..8].copy_from_slice(&sysid.to_le_bytes());
        bytes[8..12].copy_from_slice(&1800u32.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..offset]);
        bytes[offset..offset + 4].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[tokio::test]
    async fn control_files_are_read_only_with_a_valid_crc() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("global")).unwrap();
        let path = dir.path().join(CONTROL_FILE);
        for v in [13, 17, 18, 19] {
            std::fs::write(&path, control_file(v, 7_000_000_000_000_000_000 + u64::from(v))).unwrap();
            assert_eq!(
                read_control_sysid(dir.path(), v).await.unwrap(),
                7_000_000_000_000_000_000 + u64::from(v)
            );
        }
        // An 18 file is not a valid 17 one (its CRC sits 4 bytes further), nor is a torn one.
        std::fs::write(&path, control_file(18, 42)).unwrap();
        let err = read_control_sysid(dir.path(), 17).await.unwrap_err();
        assert!(
            matches!(err, BackupError::ControlFile { pg_version: 17, .. }),
            "{err}"
        );
        let mut torn = control_file(15, 42);
        torn[100] ^= 1;
        std::fs::write(&path, torn).unwrap();
        assert!(matches!(
            read_control_sysid(dir.path(), 15).await,
            Err(BackupError::ControlFile { .. })
        ));
    }
}
