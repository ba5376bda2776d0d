//! The recovery target flags `restore-agent restore` and `drill` share (`--target-time`,
//! `--target-lsn`, `--target-xid`, `--target-name`, `--target-timeline`, `--target-exclusive`)
//! and the targets they name.

use crate::commands::restore::{RecoveryTarget, TimelineTarget};
use crate::time::TimeParseError;
use crate::wal::TimelineId;
use crate::wal::lsn::LsnParseError;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Time(#[from] TimeParseError),
    #[error(transparent)]
    Lsn(#[from] LsnParseError),
    #[error("--target-timeline {0:?}: use latest, current or a timeline id")]
    Timeline(String),
}

/// The recovery targets restore and drill share.
#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// Recover to this time: 'YYYY-MM-DD HH:MM:SS[.ffffff][+TZ]' (UTC when no zone is given)
    #[arg(long, value_name = "TIME")]
    pub target_time: Option<String>,
    /// Recover to this LSN (like 0/16B3748)
    #[arg(long, value_name = "LSN")]
    pub target_lsn: Option<String>,
    /// Recover to the commit of this transaction id
    #[arg(long, value_name = "XID")]
    pub target_xid: Option<u64>,
    /// Recover to this restore point (pg_create_restore_point)
    #[arg(long, value_name = "NAME")]
    pub target_name: Option<String>,
    /// Timeline to follow: latest, current, or a timeline id
    #[arg(long, default_value = "latest", value_name = "TIMELINE")]
    pub target_timeline: String,
    /// Stop just before the target rather than just after it
    #[arg(long)]
    pub target_exclusive: bool,
}

impl TargetArgs {
    /// The target named by a --target-* flag, if one is.
    pub fn target(&self) -> Result<Option<RecoveryTarget>, TargetError> {
        Ok(Some(match self {
            TargetArgs {
                target_time: Some(t), ..
            } => RecoveryTarget::Time(crate::time::parse_time(t)?),
            TargetArgs {
                target_lsn: Some(l), ..
            } => RecoveryTarget::Lsn(l.parse()?),
            TargetArgs {
                target_xid: Some(x), ..
            } => RecoveryTarget::Xid(*x),
            TargetArgs {
                target_name: Some(n), ..
            } => RecoveryTarget::Name(n.clone()),
            _ => return Ok(None),
        }))
    }
}

/// `--target-timeline`: latest, current or a timeline id.
pub fn parse_timeline(s: &str) -> Result<TimelineTarget, TargetError> {
    Ok(match s {
        "latest" => TimelineTarget::Latest,
        "current" => TimelineTarget::Current,
        n => TimelineTarget::Id(
            n.parse::<u32>()
                .ok()
                .and_then(TimelineId::new)
                .ok_or_else(|| TargetError::Timeline(n.to_string()))?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timelines_are_named_or_numbered() {
        assert_eq!(parse_timeline("latest").unwrap(), TimelineTarget::Latest);
        assert_eq!(parse_timeline("current").unwrap(), TimelineTarget::Current);
        assert_eq!(
            parse_timeline("3").unwrap(),
            TimelineTarget::Id(TimelineId::new(3).unwrap())
        );
        let e = parse_timeline("newest").unwrap_err().to_string();
        assert_eq!(
            e,
            "--target-timeline \"newest\": use latest, current or a timeline id"
        );
    }
}
