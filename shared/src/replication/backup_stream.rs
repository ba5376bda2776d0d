//! `BASE_BACKUP` over a replication connection (PostgreSQL 15 and newer): the command, and the
//! messages of the one CopyOut that carries the backup (`bbsink_copystream` in
//! `src/backend/backup/basebackup_copy.c`): `n` starts an archive (its name and tablespace
//! location), `d` carries its tar bytes, `p` reports progress, `m` says the server's
//! `backup_manifest` follows (as `d` messages). The server's `CopyDone` ends it.
//!
//! PostgreSQL 14 and older send one CopyOut per tablespace, which `pg_walstream` cannot read
//! past the first: a backup over the protocol needs 15 or newer, and says so.

use pg_walstream::BaseBackupOptions;

use super::conninfo::Host;
use super::source::{Source, SourceError, server_error};
use crate::wal::{Lsn, TimelineId};

/// The oldest release whose `BASE_BACKUP` stream this reads.
pub const MIN_SERVER_VERSION: i32 = 150000;

/// One message of the backup's CopyOut.
#[derive(Debug, PartialEq, Eq)]
pub enum CopyMessage<'a> {
    /// A new archive: `base.tar`, or `<oid>.tar` for the tablespace at `location`.
    Archive {
        name: String,
        location: String,
    },
    Data(&'a [u8]),
    /// Bytes sent so far (with `PROGRESS`).
    Progress(i64),
    /// The server's `backup_manifest` follows.
    Manifest,
}

/// Why a message cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyMessageError {
    #[error("BASE_BACKUP message {0:?} is shorter than its fields")]
    Short(char),
    #[error("BASE_BACKUP message type {0:?} is not one walvault knows")]
    Unknown(char),
    #[error("BASE_BACKUP archive name {0:?} is neither base.tar nor <oid>.tar")]
    ArchiveName(String),
}

/// Parse one CopyData payload of the backup.
pub fn parse(msg: &[u8]) -> Result<CopyMessage<'_>, CopyMessageError> {
    let Some((&kind, rest)) = msg.split_first() else {
        return Err(CopyMessageError::Short('?'));
    };
    let kind = kind as char;
    match kind {
        'n' => {
            let mut fields = rest.splitn(3, |&b| b == 0);
            let (Some(name), Some(location), Some(_)) = (fields.next(), fields.next(), fields.next()) else {
                return Err(CopyMessageError::Short(kind));
            };
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            let (name, location) = (text(name), text(location));
            if name != "base.tar" && archive_oid(&name).is_none() {
                return Err(CopyMessageError::ArchiveName(name));
            }
            Ok(CopyMessage::Archive { name, location })
        }
        'd' => Ok(CopyMessage::Data(rest)),
        'p' => {
            let b: [u8; 8] = rest
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or(CopyMessageError::Short(kind))?;
            Ok(CopyMessage::Progress(i64::from_be_bytes(b)))
        }
        'm' => Ok(CopyMessage::Manifest),
        other => Err(CopyMessageError::Unknown(other)),
    }
}

/// The tablespace oid of an archive named `<oid>.tar`.
pub fn archive_oid(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".tar")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&oid| oid != 0)
}

/// Where the server says the backup starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupStart {
    pub lsn: Lsn,
    pub timeline: TimelineId,
}

/// A backup being received.
pub struct BackupStream {
    source: Source,
    cancel: pg_walstream::CancellationToken,
}

impl std::fmt::Debug for BackupStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupStream")
            .field("host", &self.source.host)
            .finish_non_exhaustive()
    }
}

const CLOCK_SQL: &str = "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint";

fn clock_on(
    conn: &mut pg_walstream::connection::PgReplicationConnection,
    host: &str,
) -> Result<i64, SourceError> {
    let got = super::source::query_one(conn, host, CLOCK_SQL)?;
    got.parse().map_err(|_| SourceError::Unreadable {
        host: host.to_string(),
        what: "clock_timestamp()",
        got,
    })
}

/// The server's clock (Unix microseconds), over an ordinary session to `host` opened for it.
pub fn clock_of(host: &Host) -> Result<i64, SourceError> {
    let mut conn = pg_walstream::connection::PgReplicationConnection::connect(&host.plain_conninfo)
        .map_err(|e| server_error(&host.label, &e))?;
    clock_on(&mut conn, &host.label)
}

impl Source {
    /// The server's clock, Unix microseconds.
    pub fn clock_us(&mut self) -> Result<i64, SourceError> {
        clock_on(&mut self.conn, &self.host)
    }

    /// A setting as `SHOW` prints it.
    pub fn show(&mut self, name: &str) -> Result<String, SourceError> {
        super::source::query_one(&mut self.conn, &self.host, &format!("SHOW {name}"))
    }

    /// Start `BASE_BACKUP (LABEL label, CHECKPOINT fast|spread, WAIT false, MANIFEST yes,
    /// MANIFEST_CHECKSUMS CRC32C)`. `WAIT false`: the WAL is walvault's to store, and the backup
    /// waits for it in the repository. Data page checksums are verified by the server where the
    /// cluster has them. With `incremental_of`, the `backup_manifest` of the backup to build on
    /// is uploaded first (`UPLOAD_MANIFEST`) and the backup is `INCREMENTAL` (PostgreSQL 17+).
    pub fn base_backup(
        mut self,
        label: &str,
        fast: bool,
        incremental_of: Option<&[u8]>,
    ) -> Result<(BackupStart, BackupStream), SourceError> {
        if let Some(manifest) = incremental_of {
            self.conn
                .upload_manifest(manifest)
                .map_err(|e| server_error(&self.host, &e))?;
        }
        let options = BaseBackupOptions {
            incremental: incremental_of.is_some(),
            label: Some(label.to_string()),
            checkpoint: Some(if fast { "fast" } else { "spread" }.to_string()),
            wait: false,
            manifest: Some("yes".into()),
            manifest_checksums: Some("CRC32C".into()),
            ..Default::default()
        };
        let r = self
            .conn
            .base_backup(&options)
            .map_err(|e| server_error(&self.host, &e))?;
        let unreadable = |got: String| SourceError::Unreadable {
            host: self.host.clone(),
            what: "BASE_BACKUP's start position",
            got,
        };
        let (lsn, tli) = (r.get_value(0, 0), r.get_value(0, 1));
        let lsn: Lsn = lsn
            .as_deref()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| unreadable(format!("{lsn:?}")))?;
        let timeline = tli
            .as_deref()
            .and_then(|s| s.parse().ok())
            .and_then(TimelineId::new)
            .ok_or_else(|| unreadable(format!("{tli:?}")))?;
        let stream = BackupStream {
            source: self,
            cancel: pg_walstream::CancellationToken::new(),
        };
        Ok((BackupStart { lsn, timeline }, stream))
    }
}

impl BackupStream {
    /// The next CopyData payload, or `None` once the server ended the stream (`CopyDone`).
    /// Whether it ended complete is for the caller to tell: the server's manifest comes last
    /// and carries its own checksum.
    pub async fn next(&mut self) -> Result<Option<bytes::Bytes>, SourceError> {
        match self.source.conn.get_copy_data_async(&self.cancel).await {
            Ok(b) => Ok(Some(b)),
            // pg_walstream reports the server's CopyDone as an error that ends a replication
            // stream; for a backup it is the end.
            Err(e) if e.to_string().contains("(CopyDone)") => Ok(None),
            Err(e) => Err(server_error(&self.source.host, &e)),
        }
    }

    /// The server this streams from, for messages.
    pub fn host(&self) -> &str {
        &self.source.host
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_four_messages_parse() {
        assert_eq!(
            parse(b"nbase.tar\0\0").unwrap(),
            CopyMessage::Archive {
                name: "base.tar".into(),
                location: String::new()
            }
        );
        assert_eq!(
            parse(b"n16400.tar\0/srv/ts1\0").unwrap(),
            CopyMessage::Archive {
                name: "16400.tar".into(),
                location: "/srv/ts1".into()
            }
        );
        assert_eq!(parse(b"dabc").unwrap(), CopyMessage::Data(b"abc"));
        let mut p = vec![b'p'];
        p.extend_from_slice(&123_456i64.to_be_bytes());
        assert_eq!(parse(&p).unwrap(), CopyMessage::Progress(123_456));
        assert_eq!(parse(b"m").unwrap(), CopyMessage::Manifest);
    }

    #[test]
    fn odd_messages_and_archive_names_are_refused() {
        assert_eq!(parse(b""), Err(CopyMessageError::Short('?')));
        assert_eq!(parse(b"nbase.tar"), Err(CopyMessageError::Short('n')));
        assert_eq!(parse(b"p\0\0"), Err(CopyMessageError::Short('p')));
        assert_eq!(parse(b"x"), Err(CopyMessageError::Unknown('x')));
        for bad in ["../x.tar", "0.tar", ".tar", "base", "12a.tar", "99999999999.tar"] {
            let mut m = b"n".to_vec();
            m.extend_from_slice(bad.as_bytes());
            m.extend_from_slice(b"\0/x\0");
            assert!(
                matches!(parse(&m), Err(CopyMessageError::ArchiveName(_))),
                "{bad}"
            );
        }
        assert_eq!(archive_oid("16400.tar"), Some(16400));
    }
}
