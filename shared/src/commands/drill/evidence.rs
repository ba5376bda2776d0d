//! The evidence a drill leaves: the [`Evidence`] record (its checks and objectives), its
//! one-screen summary, and its storage in the repository ([`store`], [`recent`]).
//!
//! Stored as `drills/<id>.json`; the format is in docs/FORMAT.md, frozen by `drill-v1.json`.

use serde::{Deserialize, Serialize};

use crate::repo::{ObjectError, StoreError};

pub const FORMAT_NAME: &str = "walvault-drill";
pub const FORMAT_VERSION: u32 = 1;

/// One check and its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// A measured objective against its target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Objective {
    /// Seconds measured (`None` when the drill did not get that far).
    pub measured_seconds: Option<f64>,
    pub target_seconds: Option<f64>,
    /// Measured and within the target (`true` without a target when measured).
    pub met: bool,
}

/// What a drill proved: stored in the repository by the daemon (`drills/<id>.json`), written by
/// `restore-agent drill --json`. Format in docs/FORMAT.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub format: String,
    pub version: u32,
    /// `YYYYMMDDTHHMMSSZ` of the start: the record's name in the repository.
    pub id: String,
    pub started_at: String,
    pub finished_at: String,
    /// `passed` or `failed`.
    pub outcome: String,
    /// The first thing that failed, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    pub repository: String,
    #[serde(default)]
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_version: Option<u32>,
    /// The recovery target as restore describes it.
    pub target: String,
    /// The random instant chosen, for `--target random`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_time: Option<String>,
    /// The last transaction the server replayed (`pg_last_xact_replay_timestamp()`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_to: Option<String>,
    pub bytes_restored: u64,
    pub files_restored: u64,
    pub segments_replayed: u64,
    pub restore_seconds: Option<f64>,
    pub recovery_seconds: Option<f64>,
    /// From the drill's start until the server answered, recovered.
    pub rto: Objective,
    /// Now minus the newest restorable commit in the repository.
    pub rpo: Objective,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_restorable_commit: Option<String>,
    pub checks: Vec<Check>,
}

impl Evidence {
    pub fn passed(&self) -> bool {
        self.outcome == "passed"
    }

    /// A few lines for a terminal or a log.
    pub fn summary(&self) -> String {
        let secs = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.1}s"));
        let mut out = format!(
            "drill {} {}: backup {}, target {}{}\n",
            self.id,
            self.outcome.to_uppercase(),
            self.backup.as_deref().unwrap_or("-"),
            self.target,
            self.target_time
                .as_ref()
                .map_or(String::new(), |t| format!(" ({t})"))
        );
        out.push_str(&format!(
            "  restored {} files, {} bytes in {}; replayed {} segments in {}; recovered to {}\n",
            self.files_restored,
            self.bytes_restored,
            secs(self.restore_seconds),
            self.segments_replayed,
            secs(self.recovery_seconds),
            self.recovered_to.as_deref().unwrap_or("-")
        ));
        let objective = |name: &str, o: &Objective| {
            format!(
                "  {name} {} (target {}): {}\n",
                secs(o.measured_seconds),
                o.target_seconds
                    .map_or("none".to_string(), |t| format!("{t:.0}s")),
                if o.met { "met" } else { "NOT MET" }
            )
        };
        out.push_str(&objective("RTO", &self.rto));
        out.push_str(&objective("RPO", &self.rpo));
        for c in &self.checks {
            out.push_str(&format!(
                "  [{}] {}: {}\n",
                if c.passed { "ok" } else { "FAILED" },
                c.name,
                c.detail
            ));
        }
        if let Some(f) = &self.failure {
            out.push_str(&format!("  failure: {f}\n"));
        }
        out
    }
}

/// Why evidence could not be stored or read back.
#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    /// The record's id is not the `YYYYMMDDTHHMMSSZ` its key is made of.
    #[error("drill id {0:?}")]
    Id(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sealed record does not open (wrong key, damaged).
    #[error(transparent)]
    Record(#[from] ObjectError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Store a drill's evidence in the repository (`drills/<id>.json`; records are kept: they are
/// the audit history).
pub async fn store(repo: &crate::repo::Writer, ev: &Evidence) -> Result<(), EvidenceError> {
    let id: crate::basebackup::manifest::BackupId =
        ev.id.parse().map_err(|_| EvidenceError::Id(ev.id.clone()))?;
    let key = crate::repo::layout::drill_key(&id);
    let json = serde_json::to_vec_pretty(ev).expect("evidence serializes");
    repo.writable()
        .put(&key, repo.sealer().seal_record(&key, json))
        .await?;
    Ok(())
}

/// The newest `n` drills' evidence, newest first. A record that cannot be read is skipped with
/// a warning: the history is informative, never load-bearing.
pub async fn recent(repo: &crate::repo::Reader, n: usize) -> Result<Vec<Evidence>, StoreError> {
    use crate::repo::layout::{Kind, parse_drill_key};
    let mut keys: Vec<String> = repo
        .store()
        .list(Kind::Drill.dirname())
        .await?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| parse_drill_key(k).is_some())
        .collect();
    keys.sort_unstable_by(|a, b| b.cmp(a));
    let mut out = Vec::new();
    for key in keys.into_iter().take(n) {
        let Some(bytes) = repo.store().get(&key).await? else {
            continue;
        };
        let record = match read_record(repo, &key, &bytes) {
            Err(e) => {
                let reopen = |b: &[u8]| read_record(repo, &key, b);
                let again = repo
                    .store()
                    .reread_from_fallback(&key, None, e.to_string(), reopen);
                again.await.ok_or(e)
            }
            read => read,
        };
        match record {
            Ok(ev) if ev.format == FORMAT_NAME => out.push(ev),
            Ok(_) => tracing::warn!("{key}: not a drill record"),
            Err(e) => tracing::warn!("{key}: unreadable drill record: {e}"),
        }
    }
    Ok(out)
}

/// One stored record, opened and parsed.
fn read_record(repo: &crate::repo::Reader, key: &str, bytes: &[u8]) -> Result<Evidence, EvidenceError> {
    let json = repo.sealer().open_record(key, bytes)?;
    Ok(serde_json::from_slice::<Evidence>(&json)?)
}

/// The host the drill ran on, for the record.
pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The evidence as `restore-agent drill` shows it: the summary, or `--json -` the record.
impl crate::report::Report for Evidence {
    fn render(&self) -> String {
        self.summary()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_fixture_v1() {
        let ev: Evidence =
            serde_json::from_slice(include_bytes!("../../../tests/fixtures/drill-v1.json")).unwrap();
        assert_eq!((ev.format.as_str(), ev.version), (FORMAT_NAME, FORMAT_VERSION));
        assert!(!ev.passed());
        assert_eq!(ev.rto.measured_seconds, Some(0.8));
        assert!(ev.rpo.met);
        assert_eq!(ev.checks.len(), 2);
        assert!(!ev.checks[1].passed);
        assert!(ev.summary().contains("[FAILED] /etc/walvault/checks.sql query 2"));
        let again: Evidence = serde_json::from_str(&serde_json::to_string(&ev).unwrap()).unwrap();
        assert_eq!(again, ev);
    }

    #[test]
    fn evidence_errors_read_as_before() {
        assert_eq!(EvidenceError::Id("x".into()).to_string(), "drill id \"x\"");
    }
}
