//! The PostgreSQL side of a backup: the one held connection that runs the non-exclusive
//! `pg_backup_start` / `pg_backup_stop` and reads the server's clock, and, for a backup from a
//! standby, the connection to its primary that completes the backup's stop segment.

use super::BackupError;
use crate::basebackup::manifest::BackupId;
use crate::repo::WritableStore;
use crate::repo::object::Sealer;
use crate::wal::{Lsn, SegmentName, SegmentNo};

/// The server's clock, Unix microseconds.
const SERVER_CLOCK: &str = "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint";

type ConnTask = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

fn sql_err(e: tokio_postgres::Error) -> BackupError {
    BackupError::Sql(sql_message(&e))
}

/// What a backup needs to know of the server whose data directory it copies.
#[derive(Debug, Clone, Copy)]
pub(super) struct Server {
    /// Major version.
    pub pg_version: u32,
    /// `pg_is_in_recovery()`: a backup from a streaming standby.
    pub from_standby: bool,
    pub sysid: u64,
    pub seg_size: u32,
    /// How its pages are checked, when `data_checksums` is on (from its `pg_control`, through
    /// `pg_control_init()`); `None` when off or not known (over the protocol).
    pub pages: Option<PageLayout>,
}

/// A cluster with data checksums: its page size and blocks per segment file, as built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PageLayout {
    pub blcksz: u32,
    pub relseg_size: u32,
}

/// The connection a backup holds from before `pg_backup_start` until `pg_backup_stop`: a
/// non-exclusive backup ends when its session does.
pub(super) struct Session {
    client: tokio_postgres::Client,
    conn_task: ConnTask,
    pub server: Server,
}

/// A backup as `pg_backup_start` began it.
pub(super) struct Started {
    pub id: BackupId,
    /// The server's clock just before the start.
    pub start_time_us: i64,
    /// Where the backup starts (`pg_backup_start`'s LSN, the redo point of its checkpoint): a
    /// page carrying this LSN or a later one is rewritten whole by WAL replay.
    pub start_lsn: Lsn,
}

/// A backup as `pg_backup_stop` ended it.
pub(super) struct Stopped {
    pub stop_lsn: Lsn,
    pub backup_label: String,
    pub spcmap: Option<String>,
    /// The server's clock once `pg_backup_stop` returned (see [`Session::stop`]).
    pub stop_time_us: i64,
    /// From a standby: the timeline of its `minRecoveryPoint`, where the backup ends.
    pub stop_tli: Option<i32>,
}

impl Session {
    /// Connect to `pg_conn` and learn the server's version (checked to be supported), role,
    /// system identifier and WAL segment size.
    pub async fn connect(pg_conn: &str) -> Result<Session, BackupError> {
        let (client, connection) = tokio_postgres::connect(pg_conn, tokio_postgres::NoTls)
            .await
            .map_err(|e| BackupError::Connect(e.to_string()))?;
        let conn_task = tokio::spawn(connection);
        let version_num: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(sql_err)?
            .get(0);
        let pg_version = crate::wal::version::major_of_version_num(version_num);
        if crate::wal::version::for_major(pg_version).is_none() {
            return Err(BackupError::Version(pg_version));
        }
        let from_standby: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(sql_err)?
            .get(0);
        let sysid: i64 = client
            .query_one("SELECT system_identifier FROM pg_control_system()", &[])
            .await
            .map_err(sql_err)?
            .get(0);
        let seg_size: i32 = client
            .query_one(
                "SELECT setting::int FROM pg_settings WHERE name = 'wal_segment_size'",
                &[],
            )
            .await
            .map_err(sql_err)?
            .get(0);
        let server = Server {
            pg_version,
            from_standby,
            sysid: sysid as u64,
            seg_size: seg_size as u32,
            pages: page_layout(&client).await?,
        };
        Ok(Session {
            client,
            conn_task,
            server,
        })
    }

    /// `pg_backup_start`, with the backup's id taken from the server's clock.
    pub async fn start(&self) -> Result<Started, BackupError> {
        let start_time_us: i64 = self
            .client
            .query_one(SERVER_CLOCK, &[])
            .await
            .map_err(sql_err)?
            .get(0);
        let id = BackupId::from_unix(start_time_us.div_euclid(1_000_000));
        let label_text = format!("walvault {id}");
        let start_sql = if self.server.pg_version >= 15 {
            "SELECT pg_backup_start($1, true)::text"
        } else {
            "SELECT pg_start_backup($1, true, false)::text"
        };
        let start: String = self
            .client
            .query_one(start_sql, &[&label_text])
            .await
            .map_err(sql_err)?
            .get(0);
        let start_lsn: Lsn = start
            .parse()
            .map_err(|_| BackupError::Sql(format!("bad start LSN {start:?}")))?;
        tracing::info!(backup = %id, from_standby = self.server.from_standby, start = %start_lsn, "backup started");
        Ok(Started {
            id,
            start_time_us,
            start_lsn,
        })
    }

    /// Store the names for `restore-agent find` (and for damaged pages), as of the backup's
    /// start. Derived data: a failure costs names, never the backup.
    pub async fn store_relation_map(
        &self,
        pg_conn: &str,
        id: &BackupId,
        store: &WritableStore,
        sealer: &Sealer,
    ) {
        store_relation_map(&self.client, pg_conn, id, store, sealer).await
    }

    /// `pg_backup_stop`, then the server's clock and (from a standby) the backup's stop
    /// timeline, and the session closed. Every query is sent even when one fails, and the
    /// first failure is returned.
    ///
    /// PostgreSQL is not asked to wait for the archiving of the stop segment (on a primary it
    /// still switches WAL, so the segment is complete): its wait polls once a second, and a
    /// standby would wait only with archive_mode = always, for a segment that only the primary
    /// can complete. walvault waits for the repository itself, with a bounded time.
    pub async fn stop(self) -> Result<Stopped, BackupError> {
        let Session {
            client,
            conn_task,
            server,
        } = self;
        let stop_sql = if server.pg_version >= 15 {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
        } else {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
        };
        let stopped = client.query_one(stop_sql, &[]).await.map_err(sql_err);
        // Read after pg_backup_stop returned, on the server's clock: every commit before the
        // consistency point carries an earlier timestamp. On a standby those timestamps come from
        // the primary's clock: take the later of the standby's clock and the last transaction it
        // replayed, so a standby clock running behind cannot open the window too early.
        let stop_clock = match server.from_standby {
            false => SERVER_CLOCK,
            true => {
                "SELECT (extract(epoch FROM greatest(clock_timestamp(), pg_last_xact_replay_timestamp())) \
                 * 1000000)::bigint"
            }
        };
        let stop_time_us: Result<i64, _> = client
            .query_one(stop_clock, &[])
            .await
            .map(|r| r.get(0))
            .map_err(sql_err);
        // A standby's backup ends on its minRecoveryPoint's timeline (do_pg_backup_stop).
        let stop_tli: Result<Option<i32>, _> = match server.from_standby {
            false => Ok(None),
            true => client
                .query_one("SELECT min_recovery_end_timeline FROM pg_control_recovery()", &[])
                .await
                .map(|r| Some(r.get(0)))
                .map_err(sql_err),
        };
        drop(client);
        let _ = conn_task.await;
        let row = stopped?;
        let stop_time_us = stop_time_us?;
        let stop_tli = stop_tli?;
        let stop_lsn: Lsn = row
            .get::<_, String>(0)
            .parse()
            .map_err(|_| BackupError::Sql("bad stop LSN".into()))?;
        Ok(Stopped {
            stop_lsn,
            backup_label: row.get(1),
            spcmap: row.get(2),
            stop_time_us,
            stop_tli,
        })
    }
}

/// The page layout of a cluster with data checksums on, as its control file records it; `None`
/// when they are off.
async fn page_layout(client: &tokio_postgres::Client) -> Result<Option<PageLayout>, BackupError> {
    let row = client
        .query_one(
            "SELECT data_page_checksum_version, database_block_size, blocks_per_segment FROM pg_control_init()",
            &[],
        )
        .await
        .map_err(sql_err)?;
    let (version, blcksz, relseg_size): (i32, i32, i32) = (row.get(0), row.get(1), row.get(2));
    Ok((version != 0).then_some(PageLayout {
        blcksz: blcksz as u32,
        relseg_size: relseg_size as u32,
    }))
}

/// Store the names for `restore-agent find`, read through `client` (and a session per database
/// on `pg_conn`). Derived data: a failure costs names, never the backup, and is logged.
pub(super) async fn store_relation_map(
    client: &tokio_postgres::Client,
    pg_conn: &str,
    id: &BackupId,
    store: &WritableStore,
    sealer: &Sealer,
) {
    match crate::basebackup::relmap::read_from_server(client, pg_conn, id).await {
        Ok(map) => {
            if let Err(e) = crate::basebackup::relmap::store(store, sealer, &map).await {
                tracing::warn!("the relation map was not stored: {e}");
            }
        }
        Err(e) => tracing::warn!("the relation map could not be read: {}", sql_message(&e)),
    }
}

/// What the server said, rather than tokio-postgres's "db error".
pub(super) fn sql_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map_or(e.to_string(), |d| d.message().to_string())
}

/// The primary of a standby being backed up, connected (and checked) before the backup starts.
pub(super) struct Primary {
    client: tokio_postgres::Client,
    conn_task: ConnTask,
}

fn primary_err(e: tokio_postgres::Error) -> BackupError {
    BackupError::Primary(e.as_db_error().map_or(e.to_string(), |d| d.message().to_string()))
}

impl Primary {
    /// The primary `primary_conn` names, for a backup of `server`: connected and checked when
    /// `server` is a standby, so that a wrong --primary-url never costs a finished copy.
    pub async fn of(primary_conn: Option<&str>, server: &Server) -> Result<Option<Primary>, BackupError> {
        match (primary_conn, server.from_standby) {
            (Some(conn), true) => Ok(Some(Primary::connect(conn, server.sysid).await?)),
            (Some(_), false) => {
                tracing::warn!("--primary-url is ignored: the server at --pg-url is not a standby");
                Ok(None)
            }
            (None, _) => Ok(None),
        }
    }

    /// Connect and check it is a primary of system `sysid`.
    async fn connect(conn: &str, sysid: u64) -> Result<Primary, BackupError> {
        let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
            .await
            .map_err(primary_err)?;
        let conn_task = tokio::spawn(connection);
        let row = client
            .query_one(
                "SELECT system_identifier, pg_is_in_recovery() FROM pg_control_system()",
                &[],
            )
            .await
            .map_err(primary_err)?;
        let (primary_sysid, in_recovery): (i64, bool) = (row.get(0), row.get(1));
        if primary_sysid as u64 != sysid {
            return Err(BackupError::Primary(format!(
                "system identifier {} is not the standby's ({sysid})",
                primary_sysid as u64
            )));
        }
        if in_recovery {
            return Err(BackupError::Primary(
                "that server is in recovery too; name the primary".into(),
            ));
        }
        Ok(Primary { client, conn_task })
    }

    /// For a backup from a standby: have `stop`, the last segment the backup needs, completed
    /// by `primary` when there is one, or say what the backup waits for.
    pub async fn complete_stop_segment(primary: Option<Primary>, stop: &SegmentName, seg_size: u32) {
        match primary {
            Some(p) => p.complete(stop, seg_size).await,
            None => tracing::info!(
                segment = %stop,
                "backup from a standby: waiting for the primary to complete and archive its stop segment \
                 (archive_timeout on the primary, or pass --primary-url to switch WAL there)"
            ),
        }
    }

    /// Ask for a WAL switch if the primary is still writing `stop`, the last segment the
    /// backup needs, so that it is completed and archived now. Best effort: on failure the
    /// backup still waits for the segment (archive_timeout or traffic completes it).
    async fn complete(self, stop: &SegmentName, seg_size: u32) {
        let switched = async {
            let insert: String = self
                .client
                .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                .await
                .map_err(primary_err)?
                .get(0);
            let insert: Lsn = insert
                .parse()
                .map_err(|_| BackupError::Primary(format!("bad insert LSN {insert:?}")))?;
            let writing = SegmentNo(insert.0 / u64::from(seg_size))
                <= stop.segment_no(seg_size).unwrap_or(SegmentNo(u64::MAX));
            if writing {
                self.client
                    .query_one("SELECT pg_switch_wal()::text", &[])
                    .await
                    .map_err(primary_err)?;
            }
            Ok::<bool, BackupError>(writing)
        }
        .await;
        match switched {
            Ok(true) => tracing::info!(segment = %stop, "asked the primary to switch WAL"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(segment = %stop, "cannot switch WAL on the primary ({e}); waiting for it to archive the segment")
            }
        }
        drop(self.client);
        let _ = self.conn_task.await;
    }
}
