//! What `restore-agent status` prints: a [`RecoveryStatus`] as aligned lines, or as JSON with the
//! plan flattened and the progress's derived values (percent, times as text, age).

use std::path::Path;

use serde::Serialize;

use crate::replay::files::StatusError;
use crate::replay::{RecoveryState, RecoveryStatus, eta_text, format_duration};
use crate::report::Report;
use crate::time::format_micros;
use crate::wal::TimelineId;

/// `restore-agent status`'s report.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub data_directory: String,
    pub state: RecoveryState,
    pub signal_file: Option<String>,
    pub backup: String,
    pub repository: String,
    pub target: String,
    pub timeline: TimelineId,
    pub first_segment: String,
    pub last_segment: String,
    pub last_is_upper_bound: bool,
    pub segments: Option<u64>,
    pub progress: Option<ProgressReport>,
    /// The status the text is rendered from.
    #[serde(skip)]
    status: RecoveryStatus,
}

/// The last progress recorded, with what follows from it.
#[derive(Debug, Clone, Serialize)]
pub struct ProgressReport {
    pub segment: String,
    pub n: u64,
    pub total: u64,
    pub total_is_upper_bound: bool,
    pub percent: Option<u64>,
    pub commits_replayed_up_to: Option<String>,
    pub eta_seconds: Option<u64>,
    pub started_at: String,
    pub updated_at: String,
    pub updated_seconds_ago: Option<u64>,
}

impl From<RecoveryStatus> for StatusReport {
    fn from(status: RecoveryStatus) -> Self {
        let progress = status.progress.as_ref().map(|p| ProgressReport {
            segment: p.segment.clone(),
            n: p.n,
            total: p.total,
            total_is_upper_bound: p.total_is_upper_bound,
            percent: p.percent(),
            commits_replayed_up_to: p.reached_commit_us.map(format_micros),
            eta_seconds: p.eta_seconds,
            started_at: format_micros(p.started_at_us),
            updated_at: format_micros(p.updated_at_us),
            updated_seconds_ago: status.progress_age(),
        });
        let plan = &status.plan;
        StatusReport {
            data_directory: status.data_directory.clone(),
            state: status.state,
            signal_file: status.signal_file.clone(),
            backup: plan.backup.clone(),
            repository: plan.repository.clone(),
            target: plan.target.clone(),
            timeline: plan.timeline,
            first_segment: plan.first_segment.clone(),
            last_segment: plan.last_segment.clone(),
            last_is_upper_bound: plan.last_is_upper_bound,
            segments: plan.total(),
            progress,
            status,
        }
    }
}

impl Report for StatusReport {
    fn render(&self) -> String {
        render(&self.status)
    }
}

/// `restore-agent status`: the recovery of the data directory `pgdata`, read at `now_us`.
pub fn status(pgdata: &Path, now_us: i64) -> Result<StatusReport, StatusError> {
    crate::replay::files::status(pgdata, now_us).map(StatusReport::from)
}

/// The status for a DBA, one aligned `label  value` line each.
fn render(status: &RecoveryStatus) -> String {
    let state = match (status.state, &status.signal_file) {
        (RecoveryState::InProgress, Some(f)) => format!("in progress ({f}, PostgreSQL running)"),
        (RecoveryState::InProgress, None) => "in progress".to_string(),
        (RecoveryState::NotRunning, Some(f)) => {
            format!("not running ({f} present, no PostgreSQL running on the directory)")
        }
        (RecoveryState::NotRunning, None) => "not running".to_string(),
        (RecoveryState::Finished, _) => "recovery finished".to_string(),
    };
    let plan = &status.plan;
    let last = if plan.last_is_upper_bound {
        "the newest archived when restore ran"
    } else {
        "the target's"
    };
    let mut rows: Vec<(&str, String)> = vec![
        ("data directory", status.data_directory.clone()),
        ("recovery", state),
        ("backup", format!("{} from {}", plan.backup, plan.repository)),
        ("target", format!("{} on timeline {}", plan.target, plan.timeline)),
        (
            "segments",
            format!(
                "{} to {} ({last}): {}",
                plan.first_segment,
                plan.last_segment,
                plan.total().unwrap_or(0)
            ),
        ),
    ];
    match &status.progress {
        None => rows.push(("progress", "no segment fetched yet".into())),
        Some(p) => {
            rows.push(("last segment", format!("{} ({})", p.segment, p.place())));
            rows.push((
                "commits",
                p.reached_commit_us.map_or("none known replayed yet".into(), |t| {
                    format!("replayed up to {}", format_micros(t))
                }),
            ));
            if status.state != RecoveryState::Finished {
                rows.push((
                    "eta",
                    p.eta_seconds.map_or("not known yet".into(), |e| {
                        format!("{} to {}, as of the last update", eta_text(e), p.goal())
                    }),
                ));
            }
            rows.push((
                "last update",
                format!(
                    "{} ({} ago)",
                    format_micros(p.updated_at_us),
                    format_duration(status.progress_age().unwrap_or(0))
                ),
            ));
        }
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::advance;
    use crate::replay::tests::{SEC, T0, plan, seg};

    #[test]
    fn status_renders_aligned_and_as_json() {
        let p = plan("000000010000000000000001", "000000010000000000000028", false);
        let mut pr = advance(&p, None, &seg("00000001000000000000000C"), None, T0).unwrap();
        pr.eta_seconds = Some(80);
        let status = RecoveryStatus {
            data_directory: "/srv/restored".into(),
            state: RecoveryState::InProgress,
            signal_file: Some("recovery.signal".into()),
            plan: p,
            progress: Some(pr),
            now_us: T0 + 5 * SEC,
        };
        let text = render(&status);
        assert!(
            text.contains("recovery        in progress (recovery.signal, PostgreSQL running)"),
            "{text}"
        );
        assert!(
            text.contains("last segment    00000001000000000000000C (12 of 40, 30%)"),
            "{text}"
        );
        assert!(text.contains("(5s ago)"), "{text}");
        let json = serde_json::to_value(StatusReport::from(status)).unwrap();
        assert_eq!(json["state"], "in_progress");
        assert_eq!(json["progress"]["n"], 12);
        assert_eq!(json["progress"]["percent"], 30);
        assert_eq!(json["progress"]["updated_seconds_ago"], 5);
        assert_eq!(json["segments"], 40);
    }
}
