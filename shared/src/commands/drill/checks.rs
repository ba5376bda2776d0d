//! What a drill checks once the server is up: the recovery target was reached, every database
//! accepts a connection, the `--check-sql` queries return true, amcheck finds no corruption;
//! and the objectives (RTO, RPO) measured against their targets.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::commands::restore::RecoveryTarget;

use super::evidence::{Check, Objective};
use crate::commands::private_server::Server;

/// Why a check could not be made or did not pass.
#[derive(Debug, thiserror::Error)]
pub enum ChecksError {
    /// A `--check-sql` file that is not there.
    #[error("{}: {source}", path.display())]
    SqlFile { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Connect(tokio_postgres::Error),
    /// A query the server refused: its message, without the `db error:` prefix.
    #[error("{}", db_message(.0))]
    Query(tokio_postgres::Error),
    #[error("verify_heapam reports {0} corrupt tuples or pages")]
    Corrupt(i64),
}

/// The server's own message for a database error, else the client's.
fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map_or(e.to_string(), |d| d.message().to_string())
}

impl Objective {
    /// `measured` seconds (`None`: not measured) against `target`.
    pub(super) fn new(measured: Option<f64>, target: Option<Duration>) -> Objective {
        let target_seconds = target.map(|t| t.as_secs_f64());
        Objective {
            measured_seconds: measured,
            target_seconds,
            met: measured.is_some_and(|m| target_seconds.is_none_or(|t| m <= t)),
        }
    }
}

/// `--check-sql` files as a drill reads them: each must exist, and is named by its absolute
/// path (the drill's server runs elsewhere; the evidence names the file).
pub fn check_sql_files(files: &[PathBuf]) -> Result<Vec<PathBuf>, ChecksError> {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .and_then(|_| std::path::absolute(f))
                .map_err(|source| ChecksError::SqlFile {
                    path: f.clone(),
                    source,
                })
        })
        .collect()
}

/// The WAL segments the server restored, from its log (timeline history files not counted).
pub(super) fn segments_replayed(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("restored log file") && !l.contains(".history"))
        .count() as u64
}

/// Whether the server stopped where it was asked to (from its log and replayed time).
pub(super) fn reached_check(
    target: &RecoveryTarget,
    exclusive: bool,
    replayed: Option<i64>,
    log: &str,
) -> Check {
    let stopping = log
        .lines()
        .find(|l| l.contains("recovery stopping"))
        .map(|l| l.split("LOG:").last().unwrap_or(l).trim().to_string());
    let (passed, detail) = match target {
        RecoveryTarget::End => (
            log.contains("archive recovery complete") || log.contains("redo done"),
            format!(
                "replayed to the end of the archive; last transaction at {}",
                replayed.map_or("-".into(), crate::time::format_micros)
            ),
        ),
        RecoveryTarget::Time(t) => {
            let before = replayed.is_none_or(|r| if exclusive { r < *t } else { r <= *t });
            (
                before && stopping.is_some(),
                format!(
                    "{}; last transaction replayed at {} (target {})",
                    stopping
                        .as_deref()
                        .unwrap_or("the log says no \"recovery stopping\""),
                    replayed.map_or("-".into(), crate::time::format_micros),
                    crate::time::format_micros(*t)
                ),
            )
        }
        RecoveryTarget::Immediate => (
            log.contains("consistent recovery state reached"),
            "stopped at the backup's consistency point".into(),
        ),
        _ => (
            stopping.is_some(),
            stopping.unwrap_or_else(|| "the log says no \"recovery stopping\"".into()),
        ),
    };
    Check {
        name: "recovery target reached".into(),
        passed,
        detail,
    }
}

/// Every database that allows connections answers `SELECT 1`.
pub(super) async fn connect_every_database(server: &Server) -> Vec<Check> {
    let dbs = match server.databases().await {
        Ok(d) => d,
        Err(e) => {
            return vec![Check {
                name: "databases accept connections".into(),
                passed: false,
                detail: e.to_string(),
            }];
        }
    };
    let mut bad = Vec::new();
    for db in &dbs {
        let ok = match server.connect(db).await {
            Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        };
        if !ok {
            bad.push(db.clone());
        }
    }
    vec![Check {
        name: "databases accept connections".into(),
        passed: bad.is_empty(),
        detail: if bad.is_empty() {
            format!("{} databases: {}", dbs.len(), dbs.join(", "))
        } else {
            format!("no connection to {}", bad.join(", "))
        },
    }]
}

/// One check per query of `file`, run in database `db`: each must return one row of one true.
pub(super) async fn check_sql(server: &Server, file: &Path, db: &str) -> Vec<Check> {
    let name = |i: usize| format!("{} query {}", file.display(), i + 1);
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            return vec![Check {
                name: file.display().to_string(),
                passed: false,
                detail: format!("cannot read: {e}"),
            }];
        }
    };
    let client = match server.connect(db).await {
        Ok(c) => c,
        Err(e) => {
            return vec![Check {
                name: file.display().to_string(),
                passed: false,
                detail: format!("cannot connect to database {db}: {e}"),
            }];
        }
    };
    let mut checks = Vec::new();
    for (i, query) in split_queries(&text).into_iter().enumerate() {
        let (passed, detail) = match client.query(query.as_str(), &[]).await {
            Ok(rows) => match rows.as_slice() {
                [row] if row.len() == 1 => match row.try_get::<_, Option<bool>>(0) {
                    Ok(Some(true)) => (true, format!("true: {query}")),
                    Ok(v) => (false, format!("returned {v:?}, not true: {query}")),
                    Err(_) => (false, format!("did not return a boolean: {query}")),
                },
                rows => (
                    false,
                    format!("returned {} rows, not one boolean: {query}", rows.len()),
                ),
            },
            Err(e) => (false, format!("{}: {query}", db_message(&e))),
        };
        checks.push(Check {
            name: name(i),
            passed,
            detail,
        });
    }
    checks
}

/// amcheck in every database: its B-tree indexes, and from PostgreSQL 14 its tables' heaps.
pub(super) async fn amcheck(server: &Server, major: u32) -> Vec<Check> {
    let dbs = server.databases().await.unwrap_or_default();
    let mut checks = Vec::new();
    for db in dbs {
        let r = amcheck_database(server, &db, major).await;
        checks.push(Check {
            name: format!("amcheck {db}"),
            passed: r.is_ok(),
            detail: r.unwrap_or_else(|e| e.to_string()),
        });
    }
    checks
}

/// amcheck in one database: what it found intact.
async fn amcheck_database(server: &Server, db: &str, major: u32) -> Result<String, ChecksError> {
    let c = server.connect(db).await.map_err(ChecksError::Connect)?;
    c.batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        .await
        .map_err(ChecksError::Query)?;
    let indexes: i64 = c
        .query_one(
            "SELECT count(bt_index_check(c.oid)) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
              JOIN pg_am a ON a.oid = c.relam
             WHERE a.amname = 'btree' AND i.indisvalid AND c.relpersistence <> 't'",
            &[],
        )
        .await
        .map_err(ChecksError::Query)?
        .get(0);
    let mut detail = format!("{indexes} B-tree indexes intact");
    if major >= 14 {
        let row = c
            .query_one(
                "SELECT count(*), count(v.blkno) FROM pg_class c
                   LEFT JOIN LATERAL verify_heapam(c.oid) v ON true
                  WHERE c.relkind IN ('r', 't') AND c.relpersistence <> 't'
                    AND c.relam = (SELECT oid FROM pg_am WHERE amname = 'heap')",
                &[],
            )
            .await
            .map_err(ChecksError::Query)?;
        let corrupt: i64 = row.get(1);
        if corrupt > 0 {
            return Err(ChecksError::Corrupt(corrupt));
        }
        detail.push_str(", every table's heap intact");
    }
    Ok(detail)
}

/// Queries separated by `;` (outside quotes); `--` comments and blank ones dropped.
fn split_queries(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for line in text.lines() {
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match (quote, c) {
                (None, '-') if chars.peek() == Some(&'-') => break,
                (None, ';') => {
                    out.push(std::mem::take(&mut cur));
                    continue;
                }
                (None, '\'' | '"') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                _ => {}
            }
            cur.push(c);
        }
        cur.push('\n');
    }
    out.push(cur);
    out.into_iter()
        .map(|q| q.trim().to_string())
        .filter(|q| !q.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_split_on_semicolons_outside_quotes_and_comments() {
        let q = split_queries(
            "-- checks\nSELECT count(*) > 0 FROM t;\nSELECT 'a;b' = 'a;b'; -- trailing\n\nSELECT true",
        );
        assert_eq!(
            q,
            vec![
                "SELECT count(*) > 0 FROM t",
                "SELECT 'a;b' = 'a;b'",
                "SELECT true"
            ]
        );
        assert!(split_queries("-- nothing\n;\n").is_empty());
    }

    #[test]
    fn objectives_are_met_only_when_measured_within_target() {
        assert!(Objective::new(Some(5.0), Some(Duration::from_secs(10))).met);
        assert!(!Objective::new(Some(15.0), Some(Duration::from_secs(10))).met);
        assert!(Objective::new(Some(15.0), None).met);
        assert!(!Objective::new(None, None).met);
    }

    #[test]
    fn the_target_check_reads_the_server_log() {
        let log = "LOG:  recovery stopping before commit of transaction 731, time 2026-11-22 19:33:48.72+00\nLOG:  archive recovery complete\n";
        let c = reached_check(&RecoveryTarget::Time(100), false, Some(90), log);
        assert!(c.passed, "{c:?}");
        let c = reached_check(&RecoveryTarget::Time(100), false, Some(120), log);
        assert!(!c.passed, "replayed past the target: {c:?}");
        let c = reached_check(&RecoveryTarget::Time(100), false, Some(90), "LOG:  redo done\n");
        assert!(!c.passed, "never stopped for the target: {c:?}");
        assert!(reached_check(&RecoveryTarget::End, false, None, log).passed);
    }

    #[test]
    fn segments_replayed_count_wal_not_history() {
        let log = "LOG:  restored log file \"000000010000000000000003\" from archive\nLOG:  restored log file \"00000002.history\" from archive\nLOG:  restored log file \"000000010000000000000004\" from archive\n";
        assert_eq!(segments_replayed(log), 2);
    }

    #[test]
    fn a_missing_check_sql_file_is_named() {
        let e = check_sql_files(&[PathBuf::from("/nonexistent/checks.sql")]).unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/checks.sql: "), "{e}");
    }
}
