//! The daemon's metrics: the counters and gauges its services update, their Prometheus text
//! exposition, and the small HTTP server answering `GET /metrics` and `GET /health`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::DaemonError;

/// Counters and gauges exported on `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub archived: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_stored: AtomicU64,
    pub ready_files: AtomicU64,
    pub oldest_ready_age_secs: AtomicU64,
    pub last_archived_unix: AtomicI64,
    pub last_archived_name: Mutex<String>,
    pub last_backup_unix: AtomicI64,
    pub last_backup_duration_ms: AtomicU64,
    pub last_backup_bytes: AtomicU64,
    /// Damaged pages the last scheduled backup found (0 when it checked none).
    pub last_backup_bad_pages: AtomicU64,
    pub backups_failed: AtomicU64,
    /// Restorable window of the newest timeline (Unix seconds; 0 when unknown).
    pub window_earliest_unix: AtomicI64,
    pub window_latest_unix: AtomicI64,
    /// Backups in the repository (from the last catalog read).
    pub backups: AtomicU64,
    pub last_expire_unix: AtomicI64,
    /// 1 when the last expire succeeded, 0 when it failed.
    pub last_expire_ok: AtomicU64,
    pub last_expire_deleted_bytes: AtomicU64,
    pub last_expire_deleted_backups: AtomicU64,
    pub last_verify_unix: AtomicI64,
    /// 1 when the last verify found nothing at risk, 0 otherwise (or when it could not run).
    pub last_verify_ok: AtomicU64,
    pub last_verify_problems: AtomicU64,
    /// Bytes and objects in the repository, as the last verify listed them.
    pub repository_bytes: AtomicU64,
    pub repository_objects: AtomicU64,
    pub last_drill_unix: AtomicI64,
    /// 1 when the last drill passed, 0 when it failed (or none ran).
    pub last_drill_ok: AtomicU64,
    /// Milliseconds measured by the last drill (0 when not measured).
    pub last_drill_rto_ms: AtomicU64,
    pub last_drill_rpo_ms: AtomicU64,
    /// `--stream`: 1 while streaming from a server.
    pub stream_connected: AtomicU64,
    /// `--stream`: positions (LSNs as byte numbers): received, durable in the repository (the
    /// flush position reported), and the server's WAL end as it last said.
    pub stream_received_lsn: AtomicU64,
    pub stream_flushed_lsn: AtomicU64,
    pub stream_server_lsn: AtomicU64,
    /// `--stream`: the slot's `wal_status`: 0 unknown, 1 reserved, 2 extended, 3 unreserved,
    /// 4 lost; and its `safe_wal_size` (-1 when unknown or unlimited).
    pub stream_slot_wal_status: AtomicU64,
    pub stream_slot_safe_wal_bytes: AtomicI64,
    /// `--copy-to`: 1 when a second repository is kept (the `copy_` families are shown only then).
    pub copying: AtomicU64,
    /// Seconds since the start of the last complete copy pass (-1 before the first).
    pub copy_lag_seconds: AtomicI64,
    /// Bytes the last copy pass found missing from the second repository.
    pub copy_lag_bytes: AtomicU64,
    /// When (Unix seconds) the last complete copy pass started (0 before the first).
    pub copy_complete_unix: AtomicI64,
    /// 1 when the last copy pass left nothing behind.
    pub copy_last_ok: AtomicU64,
    pub copy_bytes: AtomicU64,
    pub copy_failed: AtomicU64,
}

/// One metric as exposed: its name (with labels, without the `walvault_` prefix), type, help
/// and value.
struct Sample {
    name: String,
    kind: &'static str,
    help: &'static str,
    value: String,
}

fn counter(name: &str, help: &'static str, value: &AtomicU64) -> Sample {
    Sample {
        name: name.into(),
        kind: "counter",
        help,
        value: value.load(Ordering::Relaxed).to_string(),
    }
}

fn gauge(name: &str, help: &'static str, value: String) -> Sample {
    Sample {
        name: name.into(),
        kind: "gauge",
        help,
        value,
    }
}

fn count(a: &AtomicU64) -> String {
    a.load(Ordering::Relaxed).to_string()
}

fn unix(a: &AtomicI64) -> String {
    a.load(Ordering::Relaxed).to_string()
}

/// Milliseconds as seconds with three decimals.
fn seconds(ms: &AtomicU64) -> String {
    format!("{:.3}", ms.load(Ordering::Relaxed) as f64 / 1000.0)
}

impl Metrics {
    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let samples = self
            .wal_samples()
            .into_iter()
            .chain(self.backup_samples())
            .chain(self.expire_samples())
            .chain(self.verify_samples())
            .chain(self.drill_samples())
            .chain(self.stream_samples())
            .chain(self.copy_samples())
            .chain([gauge("up", "The daemon is running", "1".into())]);
        let mut out = String::new();
        for Sample {
            name,
            kind,
            help,
            value,
        } in samples
        {
            let family = name.split('{').next().unwrap_or(&name);
            out.push_str(&format!(
                "# HELP walvault_{family} {help}\n# TYPE walvault_{family} {kind}\nwalvault_{name} {value}\n"
            ));
        }
        out
    }

    /// How far behind the second repository is (`--copy-to`; nothing without it).
    fn copy_samples(&self) -> Vec<Sample> {
        if self.copying.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        vec![
            gauge(
                "copy_lag_seconds",
                "Seconds since the start of the last complete copy pass: the second repository holds everything the first held then (-1 before the first)",
                unix(&self.copy_lag_seconds),
            ),
            gauge(
                "copy_complete_timestamp_seconds",
                "When the last complete copy pass started: the second repository holds everything the first held then (0 before the first)",
                unix(&self.copy_complete_unix),
            ),
            gauge(
                "copy_lag_bytes",
                "Bytes the last copy pass found missing from the second repository",
                count(&self.copy_lag_bytes),
            ),
            gauge(
                "copy_last_ok",
                "1 when the last copy pass left nothing behind, 0 otherwise",
                count(&self.copy_last_ok),
            ),
            counter(
                "copy_bytes_total",
                "Bytes copied to the second repository",
                &self.copy_bytes,
            ),
            counter(
                "copy_failed_total",
                "Copy passes that failed (the second repository unreachable, or the first)",
                &self.copy_failed,
            ),
        ]
    }

    /// What the stream reports (all zero without `--stream`).
    fn stream_samples(&self) -> Vec<Sample> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let lag = load(&self.stream_server_lsn).saturating_sub(load(&self.stream_flushed_lsn));
        vec![
            gauge(
                "stream_connected",
                "1 while streaming WAL from a server",
                count(&self.stream_connected),
            ),
            gauge(
                "stream_received_lsn",
                "End of the WAL received (LSN as a byte position)",
                count(&self.stream_received_lsn),
            ),
            gauge(
                "stream_flushed_lsn",
                "End of the WAL durable in the repository (the flush position reported)",
                count(&self.stream_flushed_lsn),
            ),
            gauge(
                "stream_server_lsn",
                "The server's WAL end as it last reported",
                count(&self.stream_server_lsn),
            ),
            gauge(
                "stream_lag_bytes",
                "WAL the server has that the repository does not (the slot holds it)",
                lag.to_string(),
            ),
            gauge(
                "stream_slot_wal_status",
                "The replication slot's wal_status: 0 unknown, 1 reserved, 2 extended, 3 unreserved (about to be invalidated), 4 lost",
                count(&self.stream_slot_wal_status),
            ),
            gauge(
                "stream_slot_safe_wal_bytes",
                "WAL the server can still write before the slot is in danger (safe_wal_size; -1 when unlimited or unknown)",
                unix(&self.stream_slot_safe_wal_bytes),
            ),
        ]
    }

    /// What the uploader counts.
    fn wal_samples(&self) -> Vec<Sample> {
        let name = self
            .last_archived_name
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default();
        let last_archived = Sample {
            name: format!("last_archived_info{{file=\"{name}\"}}"),
            kind: "gauge",
            help: "The last WAL file archived",
            value: "1".into(),
        };
        vec![
            counter(
                "segments_archived_total",
                "WAL files uploaded by the daemon",
                &self.archived,
            ),
            counter(
                "segments_failed_total",
                "WAL file uploads that failed (retried later)",
                &self.failed,
            ),
            counter("bytes_read_total", "Bytes of WAL read", &self.bytes_read),
            counter(
                "bytes_stored_total",
                "Bytes written to the repository for WAL",
                &self.bytes_stored,
            ),
            gauge(
                "ready_files",
                "WAL files PostgreSQL has marked .ready",
                count(&self.ready_files),
            ),
            gauge(
                "oldest_ready_age_seconds",
                "Age of the oldest .ready file",
                count(&self.oldest_ready_age_secs),
            ),
            gauge(
                "last_archived_timestamp_seconds",
                "When the last WAL file was archived",
                unix(&self.last_archived_unix),
            ),
            last_archived,
        ]
    }

    /// Scheduled backups, the restorable window and the backups in the repository.
    fn backup_samples(&self) -> Vec<Sample> {
        vec![
            gauge(
                "last_backup_timestamp_seconds",
                "When the newest backup finished: the daemon's own, or the newest in the repository (read every minute)",
                unix(&self.last_backup_unix),
            ),
            gauge(
                "last_backup_duration_seconds",
                "How long the last scheduled backup took",
                seconds(&self.last_backup_duration_ms),
            ),
            gauge(
                "last_backup_bytes",
                "Bytes the last scheduled backup covered",
                count(&self.last_backup_bytes),
            ),
            gauge(
                "last_backup_bad_pages",
                "Pages of the cluster that failed their checksum in the last scheduled backup (recorded in its manifest)",
                count(&self.last_backup_bad_pages),
            ),
            counter(
                "backups_failed_total",
                "Scheduled backups that failed",
                &self.backups_failed,
            ),
            gauge(
                "restorable_earliest_timestamp_seconds",
                "Earliest restorable time on the newest timeline",
                unix(&self.window_earliest_unix),
            ),
            gauge(
                "restorable_latest_timestamp_seconds",
                "Latest restorable time on the newest timeline (just before the last archived transaction)",
                unix(&self.window_latest_unix),
            ),
            gauge("backups", "Backups in the repository", count(&self.backups)),
        ]
    }

    fn expire_samples(&self) -> Vec<Sample> {
        vec![
            gauge(
                "last_expire_timestamp_seconds",
                "When the last expire ran (0: never)",
                unix(&self.last_expire_unix),
            ),
            gauge(
                "last_expire_success",
                "1 if the last expire succeeded",
                count(&self.last_expire_ok),
            ),
            gauge(
                "last_expire_deleted_bytes",
                "Bytes the last expire deleted",
                count(&self.last_expire_deleted_bytes),
            ),
            gauge(
                "last_expire_deleted_backups",
                "Backups the last expire deleted",
                count(&self.last_expire_deleted_backups),
            ),
        ]
    }

    fn verify_samples(&self) -> Vec<Sample> {
        vec![
            gauge(
                "last_verify_timestamp_seconds",
                "When the last verify ran (0: never)",
                unix(&self.last_verify_unix),
            ),
            gauge(
                "last_verify_success",
                "1 if the last verify found every backup restorable",
                count(&self.last_verify_ok),
            ),
            gauge(
                "last_verify_problems",
                "Problems the last verify reported",
                count(&self.last_verify_problems),
            ),
            gauge(
                "repository_bytes",
                "Bytes stored in the repository (as the last verify listed them)",
                count(&self.repository_bytes),
            ),
            gauge(
                "repository_objects",
                "Objects in the repository (as the last verify listed them)",
                count(&self.repository_objects),
            ),
        ]
    }

    fn drill_samples(&self) -> Vec<Sample> {
        vec![
            gauge(
                "last_drill_timestamp_seconds",
                "When the last scheduled restore drill finished (Unix time; 0: none yet)",
                unix(&self.last_drill_unix),
            ),
            gauge(
                "last_drill_success",
                "1 if the last restore drill passed every check and target",
                count(&self.last_drill_ok),
            ),
            gauge(
                "last_drill_rto_seconds",
                "Recovery time the last drill measured (0: not measured)",
                seconds(&self.last_drill_rto_ms),
            ),
            gauge(
                "last_drill_rpo_seconds",
                "Recovery point the last drill measured: its start minus the newest restorable commit",
                seconds(&self.last_drill_rpo_ms),
            ),
        ]
    }
}

/// Bind `addr` and answer `/metrics` and `/health` there until the process ends.
pub(crate) async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<(), DaemonError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Metrics { addr, source })?;
    tokio::spawn(serve_metrics(listener, metrics));
    tracing::info!(%addr, "serving /metrics and /health");
    Ok(())
}

/// A minimal HTTP/1.1 responder: `GET /metrics` (Prometheus text) and `GET /health`.
async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(answer(sock, Arc::clone(&metrics)));
    }
}

/// Answer one connection's request.
async fn answer(mut sock: tokio::net::TcpStream, metrics: Arc<Metrics>) {
    // Read the request head, however it is split across packets (bounded: 8 KiB, 5 s).
    let mut buf = Vec::with_capacity(1024);
    let read_head = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read_head).await;
    let request = String::from_utf8_lossy(&buf);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match path {
        "/metrics" => ("200 OK", metrics.render()),
        "/health" => ("200 OK", "ok\n".to_string()),
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(response.as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every field set to a value of its own, so that a metric showing another's value shows.
    fn distinct() -> Metrics {
        let m = Metrics::default();
        let u = [
            &m.archived,
            &m.failed,
            &m.bytes_read,
            &m.bytes_stored,
            &m.ready_files,
            &m.oldest_ready_age_secs,
            &m.last_backup_duration_ms,
            &m.last_backup_bytes,
            &m.backups_failed,
            &m.backups,
            &m.last_expire_ok,
            &m.last_expire_deleted_bytes,
            &m.last_expire_deleted_backups,
            &m.last_verify_ok,
            &m.last_verify_problems,
            &m.repository_bytes,
            &m.repository_objects,
            &m.last_drill_ok,
            &m.last_drill_rto_ms,
            &m.last_drill_rpo_ms,
            &m.last_backup_bad_pages,
        ];
        for (i, a) in u.into_iter().enumerate() {
            a.store(1001 + i as u64 * 1234, Ordering::Relaxed);
        }
        let i = [
            &m.last_archived_unix,
            &m.last_backup_unix,
            &m.window_earliest_unix,
            &m.window_latest_unix,
            &m.last_expire_unix,
            &m.last_verify_unix,
            &m.last_drill_unix,
        ];
        for (n, a) in i.into_iter().enumerate() {
            a.store(1_700_000_000 + n as i64, Ordering::Relaxed);
        }
        *m.last_archived_name.lock().unwrap() = "000000010000000000000003".into();
        m.stream_connected.store(1, Ordering::Relaxed);
        m.stream_received_lsn.store(0x300_0000, Ordering::Relaxed);
        m.stream_flushed_lsn.store(0x280_0000, Ordering::Relaxed);
        m.stream_server_lsn.store(0x310_0000, Ordering::Relaxed);
        m.stream_slot_wal_status.store(3, Ordering::Relaxed);
        m.stream_slot_safe_wal_bytes.store(-1, Ordering::Relaxed);
        m
    }

    /// The exposition, frozen: testdata/metrics.prom was written by the render before it was split
    /// into groups (the `stream_` families were added after), and dashboards and the e2e tests
    /// scrape these names.
    #[test]
    fn render_exposes_every_metric_under_its_name() {
        assert_eq!(distinct().render(), include_str!("testdata/metrics.prom"));
    }

    #[test]
    fn the_copy_lag_is_shown_only_when_a_second_repository_is_kept() {
        let m = distinct();
        m.copying.store(1, Ordering::Relaxed);
        m.copy_lag_seconds.store(42, Ordering::Relaxed);
        m.copy_lag_bytes.store(4096, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("\nwalvault_copy_lag_seconds 42\n"), "{text}");
        assert!(text.contains("\nwalvault_copy_lag_bytes 4096\n"), "{text}");
        assert!(text.contains("# TYPE walvault_copy_bytes_total counter"));
        assert!(!distinct().render().contains("copy_"));
    }

    /// The alert rules, their promtool tests and the Grafana dashboard shipped in `deploy/` name
    /// only metrics the daemon exports (with `--copy-to`, so every family shows): a renamed or
    /// removed metric fails here instead of leaving an alert that can never fire.
    #[test]
    fn the_shipped_alerts_and_dashboard_use_only_exported_metrics() {
        let m = Metrics::default();
        m.copying.store(1, Ordering::Relaxed);
        let text = m.render();
        let exported: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        for (file, deployed) in [
            (
                "walvault-alerts.yml",
                include_str!("../../../../deploy/prometheus/walvault-alerts.yml"),
            ),
            (
                "walvault-alerts.test.yml",
                include_str!("../../../../deploy/prometheus/walvault-alerts.test.yml"),
            ),
            (
                "walvault-alerts.schedule.test.yml",
                include_str!("../../../../deploy/prometheus/walvault-alerts.schedule.test.yml"),
            ),
            (
                "walvault-dashboard.json",
                include_str!("../../../../deploy/grafana/walvault-dashboard.json"),
            ),
        ] {
            let used = metric_names(deployed);
            assert!(!used.is_empty(), "{file} names no metric");
            let unknown: Vec<_> = used.difference(&exported).collect();
            assert!(
                unknown.is_empty(),
                "{file} uses metrics the daemon does not export: {unknown:?}"
            );
        }
    }

    /// Every `walvault_<name>` in `text` that does not continue another identifier.
    fn metric_names(text: &str) -> BTreeSet<&str> {
        const PREFIX: &str = "walvault_";
        let ident = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
        let mut names = BTreeSet::new();
        for (at, _) in text.match_indices(PREFIX) {
            if text[..at]
                .chars()
                .next_back()
                .is_some_and(|c| ident(c) || c.is_ascii_uppercase())
            {
                continue;
            }
            let rest = &text[at + PREFIX.len()..];
            let len = rest.find(|c: char| !ident(c)).unwrap_or(rest.len());
            if len > 0 {
                names.insert(&text[at..at + PREFIX.len() + len]);
            }
        }
        names
    }
}
