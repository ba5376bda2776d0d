//! What a restore did ([`RestoreReport`]), and how `restore-agent restore` shows it.

use std::path::PathBuf;

use serde::Serialize;

use super::{DeltaReport, ReplaySpan, RestorePlan, Waits};
use crate::basebackup::BackupId;
use crate::repo::reads::ReadReport;
use crate::report::Report;

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub backup: BackupId,
    /// PostgreSQL major version of the backup: the server that must recover it.
    pub pg_version: u32,
    pub files: u64,
    /// Bytes written into files.
    pub bytes: u64,
    /// Distinct chunks fetched from the repository: each once, however many positions share it.
    pub chunks_fetched: u64,
    /// Their bytes, decompressed.
    pub bytes_fetched: u64,
    /// The requests that read the files' data: how many, their sizes, how they overlapped.
    pub reads: ReadReport,
    /// Seconds each stage of the restore waited on another: where it is bound.
    pub waits: Waits,
    pub timeline: String,
    pub target: String,
    /// With `--delta`: what was compared, rewritten and removed.
    pub delta: Option<DeltaReport>,
    /// The segments replay goes through, as far as the repository tells.
    pub replay: Option<ReplaySpan>,
    /// The data directory restored.
    pub pgdata: PathBuf,
    /// How long the restore took, from opening the repository (or from planning, for
    /// [`restore_from`]) to the last file synced.
    pub seconds: f64,
    /// The plan the restore carried out: what `--dry-run` prints.
    pub plan: RestorePlan,
}

impl Report for RestoreReport {
    fn render(&self) -> String {
        let pgdata = self.pgdata.display();
        let mut lines = vec![format!(
            "restored backup {} into {pgdata}: {} files, {} bytes, {:.1}s",
            self.backup, self.files, self.bytes, self.seconds
        )];
        if let Some(d) = &self.delta {
            lines.push(format!(
                "delta: checked {} existing files ({} bytes hashed), {} unchanged; compared {} small files with their shared chunks; rewrote {} chunks ({} from bases on disk), created {} files, removed {} files and directories",
                d.files_checked, d.bytes_hashed, d.files_unchanged, d.files_compared_as_fetched, d.chunks_rewritten, d.bases_on_disk, d.files_created, d.removed
            ));
        }
        lines.push(format!(
            "fetched {} distinct chunks ({} bytes), wrote {} bytes",
            self.chunks_fetched, self.bytes_fetched, self.bytes
        ));

        lines.push(format!(
            "recovery target: {}, timeline {}",
            self.target, self.timeline
        ));
        if let Some(span) = &self.replay {
            let to = if span.last_is_upper_bound {
                "the newest archived segment"
            } else {
                "the target's segment"
            };
            lines.push(format!(
                "replay: {} segments, {} to {} ({to}); watch it with:  restore-agent status --pgdata {pgdata}",
                span.segments, span.first, span.last
            ));
        }
        lines.push(format!(
            "start PostgreSQL {} to complete the recovery:  pg_ctl -D {pgdata} start",
            self.pg_version
        ));
        lines.join("\n")
    }
}
