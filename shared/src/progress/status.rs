//! What `restore-agent status` prints: a [`RecoveryStatus`] as aligned lines, or as JSON with the
//! plan flattened and the progress's derived values (percent, times as text, age).

use std::path::Path;

use serde::Serialize;

use super::files::StatusError;
use super::{RecoveryState, RecoveryStatus};
use crate::report::Report;
use crate::time::format_micros;

/// `restore-agent status`'s report.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub data_directory: String,
    pub state: RecoveryState,
    pub signal_file: Option<String>,
    pub backup: String,
    pub repository: String,
    pub target: String,
    pub timeline: u32,
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
        self.status.render()
    }
}

/// `restore-agent status`: the recovery of the data directory `pgdata`, read at `now_us`.
pub fn status(pgdata: &Path, now_us: i64) -> Result<StatusReport, StatusError> {
    super::files::status(pgdata, now_us).map(StatusReport::from)
}
