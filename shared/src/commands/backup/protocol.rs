//! A backup over the replication protocol (`archive-agent backup --pg-url` without
//! `--pgdata`): `BASE_BACKUP` on a walsender connection, so the agent needs neither the data
//! directory nor more than the `REPLICATION` attribute. The server does the start and the stop
//! and applies its own exclusions; its tar archives are read as they stream
//! ([`crate::replication::tar`]) and each file goes through the same chunk pipeline as a
//! backup from disk ([`super::upload::Copier`]), so the backup is stored in the same format.
//!
//! Every file's CRC-32C is computed as it streams and checked, with its size, against the
//! `backup_manifest` the server sends last ([`ServerManifest`]), whose own SHA-256 proves it
//! arrived whole; the manifest's `WAL-Ranges` give the stop position. `backup_label` and
//! `tablespace_map` are kept as the manifest's texts (restore writes its own), and
//! `global/pg_control` is stored only once its CRC checks.

use std::collections::BTreeMap;

use super::BackupError;
use super::control::{CONTROL_FILE, control_crc_holds};
use super::inventory::Previous;
use super::rebuild::{Prior, Rebuild};
use super::session::Server;
use super::upload::{Copied, Copier, Streamed};
use crate::basebackup::chunk::read_chunk;
use crate::basebackup::incremental;
use crate::basebackup::manifest::{BackupId, Entry, EntryKind, StoredBlob, Tablespace};
use crate::basebackup::server_manifest::{
    Algorithm, FileSum, MAX_MANIFEST_LEN, ServerManifest, ServerManifestError, WalRange,
};
use crate::local::handoff::SPOOL_DIR;
use crate::replication::backup_stream::{self, BackupStream, CopyMessage};
use crate::replication::source::{self, Source};
use crate::replication::tar::{self, Event, Kind, Member};
use crate::replication::{conninfo, tar::TarError};
use crate::repo::Store;
use crate::repo::object::Sealer;

/// What a backup over the protocol received, once the server's manifest vouched for it.
pub(super) struct Received {
    pub copied: Copied,
    pub backup_label: String,
    pub tablespace_map: Option<String>,
    /// The last WAL range: where the backup ends, on which timeline.
    pub end: WalRange,
    /// The server's `backup_manifest`, stored as chunks (for the next incremental backup).
    pub server_manifest: StoredBlob,
}

/// The path the server's manifest goes through the chunk pipeline under: no member of the
/// server's archives can have it (names are relative), and it is taken out of the entries.
const SERVER_MANIFEST_PATH: &str = "/backup_manifest";

/// Connect to the server `pg_conn` names (its host list and `target_session_attrs` as the
/// streaming daemon reads them), as a walsender, and learn what a backup needs of it.
pub(super) fn connect(pg_conn: &str) -> Result<(Source, Server), BackupError> {
    let target = conninfo::parse(pg_conn).map_err(|e| BackupError::Connect(e.to_string()))?;
    let source = tokio::task::block_in_place(|| source::connect(&target)).map_err(protocol_err)?;
    if source.identity.server_version < backup_stream::MIN_SERVER_VERSION {
        return Err(BackupError::Sql(format!(
            "{} runs PostgreSQL {}: a backup over the replication protocol needs PostgreSQL 15 or newer; pass --pgdata to back up from the data directory",
            source.host,
            source.identity.server_version / 10000
        )));
    }
    let identity = &source.identity;
    let server = Server {
        pg_version: crate::wal::version::major_of_version_num(identity.server_version),
        from_standby: identity.in_recovery,
        sysid: identity.system_id,
        seg_size: identity.segment_size,
        // BASE_BACKUP verifies checksums on the server (see `receive`).
        pages: None,
    };
    if crate::wal::version::for_major(server.pg_version).is_none() {
        return Err(BackupError::Version(server.pg_version));
    }
    Ok((source, server))
}

pub(super) fn protocol_err(e: source::SourceError) -> BackupError {
    BackupError::Sql(e.to_string())
}

/// Receive the backup `stream` carries into `copier`, on top of `previous`; `prior`, for an
/// incremental backup, is the backup the server's increments apply to.
pub(super) async fn receive(
    mut stream: BackupStream,
    copier: Copier,
    pg_version: u32,
    previous: Option<&Previous>,
    prior: Option<Prior>,
    examined_after_ns: i64,
) -> Result<Received, BackupError> {
    let mut r = Receiver {
        copier,
        pg_version,
        prior,
        archive: None,
        current: None,
        sent: BTreeMap::new(),
        tablespaces: Vec::new(),
        manifest: None,
        backup_label: None,
        tablespace_map: None,
        control_seen: false,
    };
    while let Some(msg) = stream.next().await.map_err(protocol_err)? {
        let parsed = backup_stream::parse(&msg).map_err(|e| BackupError::Sql(e.to_string()))?;
        r.message(parsed).await?;
    }
    r.finish_archive()?;
    let Receiver {
        mut copier,
        sent,
        tablespaces,
        manifest,
        backup_label,
        tablespace_map,
        control_seen,
        ..
    } = r;
    let invalid = |s: &str| BackupError::ServerManifest(ServerManifestError::Invalid(s.to_string()));
    let manifest_bytes =
        manifest.ok_or_else(|| invalid("the stream ended before the server's backup manifest"))?;
    let manifest = ServerManifest::parse(&manifest_bytes)?;
    manifest.check(&sent)?;
    let backup_label = backup_label.ok_or_else(|| invalid("the server sent no backup_label"))?;
    if !control_seen {
        return Err(invalid("the server sent no global/pg_control"));
    }
    tracing::info!(
        host = stream.host(),
        files = sent.len(),
        "every file streamed matches the server's backup manifest (size and CRC-32C)"
    );
    let mut blob = copier.begin_streamed(entry(SERVER_MANIFEST_PATH, EntryKind::File, 0o600))?;
    copier.stream(&mut blob, &manifest_bytes).await?;
    copier.end_streamed(blob).await?;
    let mut copied = copier
        .into_copied(tablespaces, previous, examined_after_ns)
        .await?;
    let server_manifest = take_out(&mut copied);
    Ok(Received {
        copied,
        backup_label,
        tablespace_map,
        end: manifest.end(),
        server_manifest,
    })
}

/// The server's manifest taken out of what was copied: kept beside the files, not among them.
fn take_out(copied: &mut Copied) -> StoredBlob {
    let e = copied
        .listing
        .take_out(SERVER_MANIFEST_PATH)
        .expect("the server's manifest went through the pipeline");
    copied.stats.files -= 1;
    copied.stats.logical_bytes -= e.size;
    StoredBlob {
        size: e.size,
        chunks: e.chunks,
    }
}

/// The archive being read: its reader and where its members go in the backup.
struct Archive {
    reader: tar::Reader,
    /// `""` for `base.tar`, `pg_tblspc/<oid>/` for a tablespace's.
    prefix: String,
}

/// The member being read.
enum Current {
    /// A directory or a link: nothing follows.
    Nothing,
    File(Box<FileInProgress>),
}

/// A file member being read.
struct FileInProgress {
    path: String,
    sum: FileSum,
    size: u64,
    sink: Sink,
}

/// Where a file's bytes go.
enum Sink {
    Pipeline(Streamed),
    /// Kept whole: `backup_label`, `tablespace_map`, `pg_control`.
    Kept(Vec<u8>),
    /// An incremental member, put back together over the previous backup's copy.
    Rebuild(Box<Rebuild>),
    /// In the daemon's spool: checked against the server's manifest, never stored.
    Discard,
}

/// The largest file kept whole (`pg_control` is 8 KiB, a label far less).
const MAX_KEPT: usize = 1 << 20;

struct Receiver {
    copier: Copier,
    pg_version: u32,
    /// For an incremental backup: the backup the increments apply to.
    prior: Option<Prior>,
    archive: Option<Archive>,
    current: Option<Current>,
    /// Every file streamed: its size and CRC-32C.
    sent: BTreeMap<String, (u64, String)>,
    tablespaces: Vec<Tablespace>,
    /// The server's manifest once its `m` message came.
    manifest: Option<Vec<u8>>,
    backup_label: Option<String>,
    tablespace_map: Option<String>,
    control_seen: bool,
}

impl Receiver {
    async fn message(&mut self, msg: CopyMessage<'_>) -> Result<(), BackupError> {
        match msg {
            CopyMessage::Archive { name, location } => {
                self.finish_archive()?;
                if self.manifest.is_some() {
                    return Err(BackupError::Sql(
                        "the server sent an archive after its manifest".into(),
                    ));
                }
                self.archive = Some(self.open_archive(&name, location)?);
            }
            CopyMessage::Data(d) => match &mut self.manifest {
                Some(m) if m.len() + d.len() > MAX_MANIFEST_LEN => {
                    return Err(BackupError::ServerManifest(ServerManifestError::Invalid(
                        "longer than walvault reads".into(),
                    )));
                }
                Some(m) => m.extend_from_slice(d),
                None => self.data(d).await?,
            },
            CopyMessage::Progress(_) => {}
            CopyMessage::Manifest => {
                self.finish_archive()?;
                self.manifest = Some(Vec::new());
            }
        }
        Ok(())
    }

    /// Archive `name` begins: `base.tar`, or a tablespace's `<oid>.tar` at `location`.
    fn open_archive(&mut self, name: &str, location: String) -> Result<Archive, BackupError> {
        let prefix = match backup_stream::archive_oid(name) {
            None => String::new(),
            Some(oid) => {
                if !location.starts_with('/') || self.tablespaces.iter().any(|t| t.oid == oid) {
                    return Err(BackupError::Sql(format!(
                        "tablespace {oid} comes with location {location:?}, which walvault cannot take"
                    )));
                }
                self.tablespaces.push(Tablespace { oid, location });
                let root = format!("pg_tblspc/{oid}");
                self.copier.add_dir(entry(&root, EntryKind::Dir, 0o700))?;
                format!("{root}/")
            }
        };
        Ok(Archive {
            reader: tar::Reader::default(),
            prefix,
        })
    }

    /// The archive read so far ends here: it must end between members.
    fn finish_archive(&mut self) -> Result<(), BackupError> {
        if let Some(a) = self.archive.take() {
            a.reader.finish().map_err(tar_err)?;
        }
        Ok(())
    }

    /// Tar bytes of the current archive.
    async fn data(&mut self, d: &[u8]) -> Result<(), BackupError> {
        let Some(archive) = &mut self.archive else {
            return Err(BackupError::Sql("the server sent data before any archive".into()));
        };
        let mut events = Vec::new();
        archive
            .reader
            .feed::<TarError>(d, |e| {
                events.push(e);
                Ok(())
            })
            .map_err(tar_err)?;
        let prefix = archive.prefix.clone();
        for e in events {
            match e {
                Event::Start(m) => self.start(&prefix, m)?,
                Event::Data(bytes) => self.bytes(bytes).await?,
                Event::End => self.end().await?,
            }
        }
        Ok(())
    }

    fn start(&mut self, prefix: &str, m: Member) -> Result<(), BackupError> {
        let path = format!("{prefix}{}", m.name);
        let mode = m.mode & 0o7777;
        // The server sends the daemon's spool like any directory it does not know; a backup never
        // holds it (a manifest naming it is refused as damaged), so it is read and dropped.
        let spool = prefix.is_empty() && in_spool(&path);
        self.current = Some(match m.kind {
            Kind::Dir if spool => Current::Nothing,
            Kind::Dir => {
                self.copier.add_dir(entry(&path, EntryKind::Dir, mode))?;
                Current::Nothing
            }
            // pg_tblspc/<oid>: the tablespace comes as its own archive.
            Kind::Symlink if prefix.is_empty() && path.starts_with("pg_tblspc/") => Current::Nothing,
            Kind::Symlink => {
                tracing::warn!(path, link = m.link, "skipping a symbolic link the server sent");
                Current::Nothing
            }
            Kind::File => {
                let kept = prefix.is_empty()
                    && ["backup_label", "tablespace_map", CONTROL_FILE].contains(&path.as_str());
                let rebuilt = path
                    .rsplit('/')
                    .next()
                    .is_some_and(|n| n.starts_with(incremental::PREFIX));
                let sink = if spool {
                    Sink::Discard
                } else if kept {
                    Sink::Kept(Vec::new())
                } else if rebuilt {
                    let (Some(prior), Some(full)) = (&self.prior, incremental::full_path(&path)) else {
                        return Err(BackupError::Sql(format!(
                            "the server sent the incremental file {path} for a full backup"
                        )));
                    };
                    let file = self.copier.begin_streamed(entry(&full, EntryKind::File, mode))?;
                    Sink::Rebuild(Box::new(Rebuild::new(prior, path.clone(), &full, file)))
                } else {
                    Sink::Pipeline(self.copier.begin_streamed(entry(&path, EntryKind::File, mode))?)
                };
                Current::File(Box::new(FileInProgress {
                    path,
                    sum: FileSum::new(Algorithm::Crc32c),
                    size: 0,
                    sink,
                }))
            }
        });
        Ok(())
    }

    async fn bytes(&mut self, data: &[u8]) -> Result<(), BackupError> {
        let Some(Current::File(file)) = &mut self.current else {
            return Ok(());
        };
        let file = &mut **file;
        let (path, sum, size, sink) = (&file.path, &mut file.sum, &mut file.size, &mut file.sink);
        sum.update(data);
        *size += data.len() as u64;
        match sink {
            Sink::Pipeline(file) => self.copier.stream(file, data).await,
            Sink::Rebuild(r) => {
                let prior = self.prior.as_ref().expect("a rebuild has its prior");
                r.feed(&mut self.copier, prior, data).await
            }
            Sink::Kept(buf) if buf.len() + data.len() > MAX_KEPT => Err(BackupError::Sql(format!(
                "{path} is larger than walvault takes it to be"
            ))),
            Sink::Kept(buf) => {
                buf.extend_from_slice(data);
                Ok(())
            }
            Sink::Discard => Ok(()),
        }
    }

    async fn end(&mut self) -> Result<(), BackupError> {
        let Some(Current::File(file)) = self.current.take() else {
            return Ok(());
        };
        let FileInProgress {
            path,
            sum,
            size,
            sink,
        } = *file;
        if self.sent.insert(path.clone(), (size, sum.finish())).is_some() {
            return Err(BackupError::Sql(format!("the server sent {path} twice")));
        }
        match sink {
            Sink::Pipeline(file) => self.copier.end_streamed(file).await,
            Sink::Rebuild(r) => {
                let prior = self.prior.as_ref().expect("a rebuild has its prior");
                r.finish(&mut self.copier, prior, size).await
            }
            Sink::Kept(bytes) => self.kept(path, bytes).await,
            Sink::Discard => Ok(()),
        }
    }

    /// A file kept whole, now complete.
    async fn kept(&mut self, path: String, bytes: Vec<u8>) -> Result<(), BackupError> {
        let text = |b: Vec<u8>| {
            String::from_utf8(b).map_err(|_| BackupError::Sql(format!("the server's {path} is not UTF-8")))
        };
        match path.as_str() {
            "backup_label" => self.backup_label = Some(complete_label(&text(bytes)?)),
            "tablespace_map" => self.tablespace_map = Some(text(bytes)?),
            _ => {
                // The server read it under ControlFileLock: a CRC that fails is damage.
                if !control_crc_holds(&bytes, self.pg_version)? {
                    return Err(BackupError::ControlFile {
                        path: format!("{CONTROL_FILE} (as streamed)"),
                        attempts: 1,
                        pg_version: self.pg_version,
                    });
                }
                let mut file = self
                    .copier
                    .begin_streamed(entry(CONTROL_FILE, EntryKind::File, 0o600))?;
                self.copier.stream(&mut file, &bytes).await?;
                self.copier.end_streamed(file).await?;
                self.control_seen = true;
            }
        }
        Ok(())
    }
}

/// Whether `path`, relative to the data directory, is the daemon's spool or inside it.
fn in_spool(path: &str) -> bool {
    path.strip_prefix(SPOOL_DIR)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The label of the complete backup walvault stores: an incremental backup's label without its
/// `INCREMENTAL FROM` lines, which make PostgreSQL refuse to start ("this is an incremental
/// backup, not a data directory"), as `pg_combinebackup` writes it.
fn complete_label(label: &str) -> String {
    label
        .split_inclusive('\n')
        .filter(|l| !l.starts_with("INCREMENTAL FROM "))
        .collect()
}

fn entry(path: &str, kind: EntryKind, mode: u32) -> Entry {
    Entry {
        within: None,
        path: path.to_string(),
        kind,
        mode,
        size: 0,
        chunks: vec![],
    }
}

fn tar_err(e: TarError) -> BackupError {
    BackupError::Sql(format!("the backup's tar stream: {e}"))
}

/// The server's clock (Unix microseconds) over an ordinary session to `host`.
pub(super) fn clock_of(host: &conninfo::Host) -> Result<i64, BackupError> {
    backup_stream::clock_of(host).map_err(protocol_err)
}

/// What an incremental backup builds on: the previous backup, and the server's manifest of it
/// to upload.
pub(super) struct Increment {
    pub prior: Prior,
    pub server_manifest: Vec<u8>,
    pub of: BackupId,
}

/// The previous backup as an incremental backup's base, or `None` (with a warning saying why:
/// the backup is then a full one) when there can be no increment on it.
pub(super) async fn increment_of(
    source: &mut Source,
    previous: Option<&Previous>,
    store: &Store,
    sealer: &Sealer,
) -> Result<Option<Increment>, BackupError> {
    let full = |why: String| {
        tracing::warn!("--incremental: taking a full backup: {why}");
        Ok(None)
    };
    if source.identity.server_version < 170000 {
        return full("incremental backups need PostgreSQL 17 or newer".into());
    }
    let Some(previous) = previous else {
        return full("the repository holds no backup of this cluster to build on".into());
    };
    let m = &previous.frame;
    let Some(blob) = &m.server_manifest else {
        return full(format!(
            "the newest backup, {}, was not taken over the replication protocol",
            m.id
        ));
    };
    let summarize = tokio::task::block_in_place(|| source.show("summarize_wal")).map_err(protocol_err)?;
    if summarize != "on" {
        return full("summarize_wal is off on the server (summarize_wal = on in postgresql.conf)".into());
    }
    let block_size = tokio::task::block_in_place(|| source.show("block_size")).map_err(protocol_err)?;
    let block_size: usize = match block_size.parse() {
        Ok(bs) if bs > 0 && m.chunk_size % bs as u64 == 0 => bs,
        _ => {
            return full(format!(
                "block size {block_size:?} does not divide the chunk size"
            ));
        }
    };
    let places = m.places();
    let mut server_manifest = Vec::with_capacity(blob.size as usize);
    for id in &blob.chunks {
        server_manifest.extend(read_chunk(store, sealer, &places, id).await?);
    }
    if server_manifest.len() as u64 != blob.size {
        return Err(BackupError::ServerManifest(ServerManifestError::Invalid(
            format!(
                "backup {}'s stored copy is {} bytes, its manifest says {}",
                m.id,
                server_manifest.len(),
                blob.size
            ),
        )));
    }
    let prior = &previous.files;
    let files = (0..prior.len())
        // A file sharing its chunk with others comes from a backup of the files, which has no
        // server manifest to build on: never here, and never built on.
        .filter(|&at| prior.is_file(at) && !prior.is_within(at))
        .map(|at| (prior.path(at).to_string(), prior.entry(at)))
        .collect();
    tracing::info!(base = %m.id, "incremental backup on top of {}", m.id);
    Ok(Some(Increment {
        prior: Prior {
            store: store.clone(),
            sealer: sealer.clone(),
            places: std::sync::Arc::new(places),
            files,
            chunk_size: m.chunk_size,
            block_size,
        },
        server_manifest,
        of: m.id.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_incremental_label_loses_only_its_incremental_lines() {
        let label = "START WAL LOCATION: 0/5000028 (file 000000010000000000000005)\n\
                     CHECKPOINT LOCATION: 0/5000080\n\
                     START TIMELINE: 1\n\
                     INCREMENTAL FROM LSN: 0/3000028\n\
                     INCREMENTAL FROM TLI: 1\n";
        assert_eq!(
            complete_label(label),
            "START WAL LOCATION: 0/5000028 (file 000000010000000000000005)\n\
             CHECKPOINT LOCATION: 0/5000080\n\
             START TIMELINE: 1\n"
        );
        assert_eq!(complete_label("START TIMELINE: 1\n"), "START TIMELINE: 1\n");
    }

    #[test]
    fn the_spool_and_only_the_spool_is_dropped() {
        for p in [
            "walvault.spool",
            "walvault.spool/archived",
            "walvault.spool/archived/x.done",
        ] {
            assert!(in_spool(p), "{p}");
        }
        for p in [
            "walvault.spool2",
            "walvault.spoolx/a",
            "base/1/walvault.spool",
            "pg_wal",
        ] {
            assert!(!in_spool(p), "{p}");
        }
    }
}
