//! The `backup_label` text `pg_backup_stop` returns: where the backup's WAL starts.

use crate::wal::{Lsn, TimelineId};

/// What walvault needs from a backup label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupLabel {
    pub start_lsn: Lsn,
    pub start_wal: String,
    pub timeline: TimelineId,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backup_label lacks {0}")]
pub struct LabelError(pub &'static str);

/// Parse `START WAL LOCATION: 0/2000028 (file 000000010000000000000002)` and
/// `START TIMELINE: 1` (written by PostgreSQL 11 and later).
pub fn parse(text: &str) -> Result<BackupLabel, LabelError> {
    let field = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).map(str::trim);
    let loc = field("START WAL LOCATION:").ok_or(LabelError("START WAL LOCATION"))?;
    let (lsn, file) = loc
        .split_once(" (file ")
        .ok_or(LabelError("START WAL LOCATION file"))?;
    let start_lsn: Lsn = lsn.trim().parse().map_err(|_| LabelError("a valid start LSN"))?;
    let start_wal = file.trim_end_matches(')').trim().to_string();
    if start_wal.parse::<crate::wal::WalFileName>().is_err() {
        return Err(LabelError("a valid start WAL file"));
    }
    let timeline = field("START TIMELINE:")
        .and_then(|t| t.parse().ok())
        .and_then(TimelineId::new)
        .ok_or(LabelError("START TIMELINE"))?;
    Ok(BackupLabel {
        start_lsn,
        start_wal,
        timeline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_postgres_15_label() {
        let text = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n\
START TIME: 2026-11-21 10:00:00 UTC\nLABEL: walvault\nSTART TIMELINE: 1\n";
        let l = parse(text).unwrap();
        assert_eq!(l.start_lsn, Lsn(0x2000028));
        assert_eq!(l.start_wal, "000000010000000000000002");
        assert_eq!(l.timeline, 1);
        assert!(parse("START TIMELINE: 1\n").is_err());
    }

    #[test]
    fn parses_the_labels_of_13_and_19_and_of_a_standby() {
        // 13 says "master"; 19 zero-pads LSNs; a standby's says so, and both read the same.
        let pg13 = "START WAL LOCATION: 0/9000028 (file 000000010000000000000009)\n\
CHECKPOINT LOCATION: 0/9000060\nBACKUP METHOD: streamed\nBACKUP FROM: master\n\
START TIME: 2026-11-21 10:00:00 UTC\nLABEL: walvault\nSTART TIMELINE: 1\n";
        let pg19 = "START WAL LOCATION: 0/09000028 (file 000000020000000000000009)\n\
CHECKPOINT LOCATION: 0/09000060\nBACKUP METHOD: streamed\nBACKUP FROM: standby\n\
START TIME: 2026-11-21 10:00:00 UTC\nLABEL: walvault\nSTART TIMELINE: 2\n";
        let (a, b) = (parse(pg13).unwrap(), parse(pg19).unwrap());
        assert_eq!((a.start_lsn, a.timeline.get()), (Lsn(0x9000028), 1));
        assert_eq!((b.start_lsn, b.timeline.get()), (Lsn(0x9000028), 2));
        assert_eq!(b.start_wal, "000000020000000000000009");
    }
}
