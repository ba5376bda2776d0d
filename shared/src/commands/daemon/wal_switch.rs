//! Forced WAL switches (`--max-wal-age`): asks PostgreSQL, off the upload path and one call at a
//! time, whether WAL has waited too long for the archive, and switches to a new segment if so
//! (the rule is [`super::scheduler::wal_switch_due`]).

use std::time::Duration;

use tokio::task::JoinHandle;

use super::scheduler::{SwitchDue, wal_switch_due};

/// How long the forced-switch check may take, connection included.
const SWITCH_CALL_BOUND: Duration = Duration::from_secs(15);

/// The forced-switch checks: the one in flight, and the insert position after the last switch
/// the daemon forced.
#[derive(Debug)]
pub(crate) struct WalSwitcher {
    conn: String,
    max_age: Duration,
    last: Option<String>,
    task: Option<JoinHandle<Option<String>>>,
}

impl WalSwitcher {
    pub(crate) fn new(conn: String, max_age: Duration) -> WalSwitcher {
        WalSwitcher {
            conn,
            max_age,
            last: None,
            task: None,
        }
    }

    /// Whether a check is in flight (or ended without [`WalSwitcher::take_finished`] yet).
    pub(crate) fn checking(&self) -> bool {
        self.task.is_some()
    }

    /// Keep what a finished check learnt.
    pub(crate) async fn take_finished(&mut self) {
        if let Some(t) = self.task.take_if(|t| t.is_finished()) {
            self.last = t.await.unwrap_or(None);
        }
    }

    /// Start a check, bounded by [`SWITCH_CALL_BOUND`].
    pub(crate) fn start(&mut self) {
        let (conn, last, max_age) = (self.conn.clone(), self.last.clone(), self.max_age);
        self.task = Some(tokio::spawn(async move {
            match tokio::time::timeout(SWITCH_CALL_BOUND, force_switch(&conn, last.clone(), max_age)).await {
                Ok(lsn) => lsn,
                Err(_) => {
                    tracing::warn!(
                        "forced WAL switch: no answer from PostgreSQL within {SWITCH_CALL_BOUND:?}"
                    );
                    last
                }
            }
        }));
    }
}

/// Switch WAL when PostgreSQL has archived nothing for `max_age` (`pg_stat_archiver`, which
/// counts every success, whoever uploaded the file) and WAL was written since the last switch we
/// forced (like archive_timeout), so an idle cluster's last transactions reach the archive.
/// Returns the insert position after the last switch.
async fn force_switch(conn: &str, last: Option<String>, max_age: Duration) -> Option<String> {
    let (client, connection) = match tokio_postgres::connect(conn, tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("forced WAL switch: cannot connect: {e}");
            return last;
        }
    };
    let handle = tokio::spawn(connection);
    // Since the last file archived, or since the server started if it archived none yet.
    let state: Option<(f64, String)> = client
        .query_one(
            "SELECT extract(epoch FROM now() - coalesce(last_archived_time, pg_postmaster_start_time()))::float8, \
                    pg_current_wal_insert_lsn()::text \
             FROM pg_stat_archiver",
            &[],
        )
        .await
        .map_err(|e| tracing::warn!("forced WAL switch: {e}"))
        .ok()
        .map(|r| (r.get(0), r.get(1)));
    let result = match state {
        None => last,
        Some((age, now)) => match wal_switch_due(age, &now, last.as_deref(), max_age) {
            SwitchDue::NotYet => last,
            SwitchDue::NothingWritten => Some(now),
            SwitchDue::Switch => switch(&client).await.or(last),
        },
    };
    drop(client);
    let _ = handle.await;
    result
}

/// Switch WAL; the insert position after the switch, `None` when it failed.
async fn switch(client: &tokio_postgres::Client) -> Option<String> {
    match client
        .query_one(
            "SELECT pg_switch_wal()::text, pg_current_wal_insert_lsn()::text",
            &[],
        )
        .await
    {
        Ok(row) => {
            tracing::info!(
                "forced a WAL switch at {} (max WAL age reached)",
                row.get::<_, String>(0)
            );
            Some(row.get(1))
        }
        Err(e) => {
            tracing::warn!("forced WAL switch failed: {e}");
            None
        }
    }
}
