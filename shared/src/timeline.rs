//! Timeline history files (`NNNNNNNN.history`) and the tree of timelines they describe.
//!
//! Format, as PostgreSQL writes it (`writeTimeLineHistory`) and reads it (`readTimeLineHistory`
//! in `src/backend/access/transam/timeline.c`): one line per ancestor timeline,
//! `<parent tli>\t<switch LSN>\t<reason>`, in increasing timeline order, where the switch LSN is
//! where the parent ended and the child began. Lines starting with `#` and blank lines are ignored.
//! The history of timeline N lists all its ancestors; N itself is implicit.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::wal::{Lsn, TimelineId};

/// One ancestor of a timeline: it ran until `switch_lsn`, then the next timeline took over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub timeline: TimelineId,
    pub switch_lsn: Lsn,
    pub reason: String,
}

/// The parsed history of one timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineHistory {
    pub timeline: TimelineId,
    /// Ancestors, oldest first.
    pub ancestors: Vec<HistoryEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error("history of timeline {timeline}, line {line}: {message}")]
    Syntax {
        timeline: TimelineId,
        line: usize,
        message: String,
    },
    #[error("history of timeline {timeline}: timeline ids must increase and stay below {timeline}")]
    Order { timeline: TimelineId },
    #[error("history of timeline {timeline}: switch points must not go backwards")]
    SwitchOrder { timeline: TimelineId },
}

impl TimelineHistory {
    /// Parse the content of `<timeline>.history`.
    pub fn parse(timeline: TimelineId, text: &[u8]) -> Result<TimelineHistory, HistoryError> {
        let tli = timeline;
        let text = String::from_utf8_lossy(text);
        let mut ancestors: Vec<HistoryEntry> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let syntax = |message: &str| HistoryError::Syntax {
                timeline: tli,
                line: i + 1,
                message: message.to_string(),
            };
            let mut fields = trimmed.splitn(3, '\t');
            let parent: u32 = fields
                .next()
                .and_then(|f| f.trim().parse().ok())
                .ok_or_else(|| syntax("expected a timeline id"))?;
            let Some(parent) = TimelineId::new(parent) else {
                return Err(HistoryError::Order { timeline: tli });
            };
            let switch_lsn: Lsn = fields
                .next()
                .and_then(|f| f.trim().parse().ok())
                .ok_or_else(|| syntax("expected a switch LSN like 0/3000060"))?;
            let reason = fields.next().unwrap_or("").trim().to_string();
            if parent >= tli || ancestors.last().is_some_and(|a| a.timeline >= parent) {
                return Err(HistoryError::Order { timeline: tli });
            }
            if ancestors.last().is_some_and(|a| a.switch_lsn > switch_lsn) {
                return Err(HistoryError::SwitchOrder { timeline: tli });
            }
            ancestors.push(HistoryEntry {
                timeline: parent,
                switch_lsn,
                reason,
            });
        }
        Ok(TimelineHistory {
            timeline: tli,
            ancestors,
        })
    }

    /// The timeline that wrote `lsn` as seen from this timeline: the first ancestor whose switch
    /// point lies after `lsn`, else this timeline itself.
    pub fn timeline_at(&self, lsn: Lsn) -> TimelineId {
        self.ancestors
            .iter()
            .find(|a| lsn < a.switch_lsn)
            .map_or(self.timeline, |a| a.timeline)
    }

    /// The direct parent and the point where this timeline branched from it.
    pub fn parent(&self) -> Option<&HistoryEntry> {
        self.ancestors.last()
    }

    /// Where this timeline begins (0/0 for a timeline without ancestors).
    pub fn begins_at(&self) -> Lsn {
        self.parent().map_or(Lsn(0), |p| p.switch_lsn)
    }
}

/// All known timelines of a repository, keyed by id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineTree {
    pub histories: BTreeMap<TimelineId, TimelineHistory>,
}

impl TimelineTree {
    pub fn insert(&mut self, history: TimelineHistory) {
        self.histories.insert(history.timeline, history);
    }

    /// The newest timeline (what `recovery_target_timeline = 'latest'` follows): the highest id.
    pub fn latest(&self) -> TimelineId {
        self.histories
            .keys()
            .next_back()
            .copied()
            .unwrap_or(TimelineId::FIRST)
    }

    /// The history of `timeline`; timeline 1 (or any without a history file) has no ancestors.
    pub fn history(&self, timeline: TimelineId) -> TimelineHistory {
        self.histories.get(&timeline).cloned().unwrap_or(TimelineHistory {
            timeline,
            ancestors: vec![],
        })
    }

    /// Whether `ancestor` is `timeline` or one of its ancestors.
    pub fn is_ancestor_or_self(&self, ancestor: TimelineId, timeline: TimelineId) -> bool {
        ancestor == timeline
            || self
                .history(timeline)
                .ancestors
                .iter()
                .any(|a| a.timeline == ancestor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tli(n: u32) -> TimelineId {
        TimelineId::new(n).unwrap()
    }

    #[test]
    fn parses_what_postgres_writes() {
        let text =
            b"1\t0/3000060\tno recovery target specified\n\n2\t0/5000000\tat restore point \"before\"\n";
        let h = TimelineHistory::parse(tli(3), text).unwrap();
        assert_eq!(h.ancestors.len(), 2);
        assert_eq!(h.ancestors[0].switch_lsn, Lsn(0x3000060));
        assert_eq!(h.ancestors[1].reason, "at restore point \"before\"");
        assert_eq!(h.timeline_at(Lsn(0x1000000)), 1);
        assert_eq!(h.timeline_at(Lsn(0x3000060)), 2);
        assert_eq!(h.timeline_at(Lsn(0x5000000)), 3);
        assert_eq!(h.begins_at(), Lsn(0x5000000));
        assert_eq!(h.parent().map(|p| p.timeline), Some(tli(2)));
    }

    #[test]
    fn parses_the_zero_padded_lsns_of_postgres_19() {
        // PostgreSQL 19 prints LSNs as %X/%08X everywhere, history files included.
        let h = TimelineHistory::parse(tli(2), b"1\t0/03000060\tno recovery target specified\n").unwrap();
        assert_eq!(h.ancestors[0].switch_lsn, Lsn(0x3000060));
    }

    #[test]
    fn comments_are_ignored_and_disorder_is_refused() {
        let h = TimelineHistory::parse(tli(2), b"# comment\n1\t0/3000060\tx\n").unwrap();
        assert_eq!(h.ancestors.len(), 1);
        assert!(TimelineHistory::parse(tli(2), b"2\t0/3000060\tself\n").is_err());
        assert!(TimelineHistory::parse(tli(4), b"2\t0/3000060\ta\n1\t0/4000000\tb\n").is_err());
        assert!(TimelineHistory::parse(tli(4), b"1\t0/5000000\ta\n2\t0/4000000\tb\n").is_err());
        assert!(TimelineHistory::parse(tli(2), b"1\tnot-an-lsn\n").is_err());
    }

    #[test]
    fn tree_knows_latest_and_ancestry() {
        let mut tree = TimelineTree::default();
        tree.insert(TimelineHistory::parse(tli(2), b"1\t0/3000060\tx\n").unwrap());
        tree.insert(TimelineHistory::parse(tli(3), b"1\t0/3000060\tx\n2\t0/6000000\ty\n").unwrap());
        assert_eq!(tree.latest(), 3);
        assert!(tree.is_ancestor_or_self(tli(1), tli(3)));
        assert!(tree.is_ancestor_or_self(tli(2), tli(3)));
        assert!(!tree.is_ancestor_or_self(tli(3), tli(2)));
        assert!(tree.history(tli(1)).ancestors.is_empty());
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in proptest::collection::vec(any::<u8>(), 0..400), t in 1u32..100) {
            let _ = TimelineHistory::parse(tli(t), &text);
        }
    }
}
