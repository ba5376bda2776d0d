//! The recovery configuration a restore writes into `postgresql.auto.conf`.
//!
//! A restored data directory must recover to exactly the target given on restore's command line,
//! with this repository's `restore_command`, whatever the backup's own configuration says: the
//! backup may come from a cluster that was itself restored (its `recovery_target_*` still set),
//! promoted, or run as a standby (`primary_conninfo`, `recovery_min_apply_delay`).
//!
//! How PostgreSQL reads the files makes this possible without touching `postgresql.conf`: it
//! reads `postgresql.auto.conf` last, and of several lines setting one parameter, in any of the
//! files, only the last one counts (`ProcessConfigFileInternal` in `guc-file.l` marks the earlier
//! ones ignored). So restore appends one explicit value for every parameter that steers archive
//! recovery ([`SET`]); the ones it does not use are set to their off value. Lines of the backup's
//! own `postgresql.auto.conf` that set one of them, or a standby-only one ([`STANDBY_ONLY`]), are
//! commented out, so that a DBA reading the file sees one value only.
//!
//! The standby-only parameters are commented out but not set: restore writes `recovery.signal`,
//! and archive recovery ignores them, while a value here would silently override the
//! `primary_conninfo` a DBA later puts in `postgresql.conf` to turn the restored directory into a
//! standby.
//!
//! The order of the appended lines matters: PostgreSQL applies the surviving lines in file order,
//! and a `recovery_target*` assign hook refuses a second kind of target while another one is still
//! set (`error_multiple_recovery_targets` in `xlogrecovery.c`), so the unused targets are cleared
//! before the chosen one is set.

use crate::wal::{Lsn, TimelineId};

/// Every parameter a restore sets, so none of the backup's values survives.
pub const SET: &[&str] = &[
    "restore_command",
    "recovery_end_command",
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_inclusive",
    "recovery_target_action",
    "recovery_target_timeline",
    "recovery_min_apply_delay",
];

/// Parameters only a standby reads: the backup's own lines are commented out, nothing is set.
pub const STANDBY_ONLY: &[&str] = &["primary_conninfo", "primary_slot_name", "archive_cleanup_command"];

fn owned(p: &str) -> bool {
    SET.contains(&p) || STANDBY_ONLY.contains(&p)
}

/// The `recovery_target*` parameters naming a target; at most one may be set.
pub const TARGET_KINDS: &[&str] = &[
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
];

/// Where recovery stops: the one form a target takes from the command line
/// (`--target-time` and its siblings) to the line in `postgresql.auto.conf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// Replay everything archived (the default).
    End,
    /// Stop as soon as the backup is consistent.
    Immediate,
    /// Unix microseconds.
    Time(i64),
    Lsn(Lsn),
    Xid(u64),
    Name(String),
}

impl RecoveryTarget {
    /// The recovery setting naming the target (one of [`TARGET_KINDS`]) and its value
    /// (unquoted); none for the end of the archive.
    pub fn setting(&self) -> Option<(&'static str, String)> {
        match self {
            RecoveryTarget::End => None,
            RecoveryTarget::Immediate => Some(("recovery_target", "immediate".into())),
            RecoveryTarget::Time(us) => Some(("recovery_target_time", crate::time::format_micros(*us))),
            RecoveryTarget::Lsn(l) => Some(("recovery_target_lsn", l.to_string())),
            RecoveryTarget::Xid(x) => Some(("recovery_target_xid", x.to_string())),
            RecoveryTarget::Name(n) => Some(("recovery_target_name", n.clone())),
        }
    }

    /// The target as restore reports it: `recovery_target_time = '...'`, or the end of the
    /// archive.
    pub fn describe(&self) -> String {
        match self.setting() {
            None => "the end of the archive".into(),
            Some((k, v)) => format!("{k} = '{v}'"),
        }
    }
}

/// As JSON: the setting, `{"name": ..., "value": ...}`, or `null` for the end of the archive.
impl serde::Serialize for RecoveryTarget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Setting {
            name: &'static str,
            value: String,
        }
        self.setting()
            .map(|(name, value)| Setting { name, value })
            .serialize(s)
    }
}

/// `recovery_target_timeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimelineTarget {
    Latest,
    Current,
    Id(TimelineId),
}

impl TimelineTarget {
    /// As `recovery_target_timeline` takes it: `latest`, `current` or the timeline's id.
    pub fn value(self) -> String {
        match self {
            TimelineTarget::Latest => "latest".into(),
            TimelineTarget::Current => "current".into(),
            TimelineTarget::Id(n) => n.to_string(),
        }
    }
}

/// As JSON: the setting's value (`"latest"`, `"current"`, `"3"`).
impl serde::Serialize for TimelineTarget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.value())
    }
}

/// `recovery_target_action`: what PostgreSQL does at the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TargetAction {
    #[default]
    Promote,
    Pause,
    Shutdown,
}

impl TargetAction {
    /// As `recovery_target_action` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

/// What recovery must do: the settings a restore writes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecoverySettings {
    pub restore_command: String,
    /// `null` in JSON for the end of the archive.
    pub target: RecoveryTarget,
    /// `recovery_target_inclusive`.
    pub inclusive: bool,
    pub action: TargetAction,
    pub timeline: TimelineTarget,
}

/// Quote a value for postgresql.conf.
pub fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// The parameter a configuration line sets, lower-cased, if it sets one.
fn parameter_of(line: &str) -> Option<String> {
    let line = line.trim_start();
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(line.len());
    let name = &line[..end];
    let rest = line[end..].trim_start();
    // `name = value` or `name value`: anything else (a comment, `include`, blank) sets nothing.
    (!name.is_empty() && !rest.is_empty() && !rest.starts_with('#')).then(|| name.to_ascii_lowercase())
}

impl RecoverySettings {
    /// The new `postgresql.auto.conf`: the backup's own (`existing`), with every line setting a
    /// [`SET`] or [`STANDBY_ONLY`] parameter commented out, then walvault's block. `header` is
    /// the first line of the block (a comment naming the restore).
    pub fn render(&self, existing: Option<&str>, header: &str) -> String {
        let mut out = String::new();
        for line in existing.unwrap_or_default().lines() {
            match parameter_of(line) {
                Some(p) if owned(&p) => {
                    out.push_str("# replaced by walvault restore: ");
                    out.push_str(line);
                }
                _ => out.push_str(line),
            }
            out.push('\n');
        }
        let mut block = format!("# {}\n", header.replace('\n', " "));
        let mut put = |k: &str, v: &str| block.push_str(&format!("{k} = {}\n", quote(v)));
        put("restore_command", &self.restore_command);
        // A delayed standby's or a previous restore's settings must not steer this recovery.
        put("recovery_end_command", "");
        put("recovery_min_apply_delay", "0");
        let target = self.target.setting();
        for kind in TARGET_KINDS {
            if target.as_ref().is_none_or(|(k, _)| k != kind) {
                put(kind, "");
            }
        }
        if let Some((k, v)) = &target {
            put(k, v);
        }
        put(
            "recovery_target_inclusive",
            if self.inclusive { "on" } else { "off" },
        );
        put("recovery_target_action", self.action.as_str());
        put("recovery_target_timeline", &self.timeline.value());
        out.push_str(&block);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(target: RecoveryTarget) -> RecoverySettings {
        RecoverySettings {
            restore_command: "restore-agent fetch --repo 'file:///r' %f %p".into(),
            target,
            inclusive: true,
            action: TargetAction::Promote,
            timeline: TimelineTarget::Latest,
        }
    }

    /// The value PostgreSQL ends up with for `param`: the last line setting it.
    fn effective(conf: &str, param: &str) -> Option<String> {
        conf.lines()
            .rfind(|l| parameter_of(l).as_deref() == Some(param))
            .map(|l| {
                let v = l.split_once('=').map_or("", |(_, v)| v).trim();
                let v = v
                    .strip_prefix('\'')
                    .and_then(|v| v.strip_suffix('\''))
                    .unwrap_or(v);
                v.replace("''", "'")
            })
    }

    const PROMOTED_STANDBY: &str = "# Do not edit this file manually!\n\
        max_connections = '50'\n\
        restore_command = 'cp /old/archive/%f %p'\n\
        primary_conninfo = 'host=old-primary user=replicator'\n\
        Primary_Slot_Name='standby1'\n\
        recovery_min_apply_delay = '1h'\n\
        recovery_target_time = '2026-01-01 00:00:00+00'\n\
        recovery_target_action   'shutdown'\n\
        recovery_end_command = 'rm -rf /'\n\
        # recovery_target_name = 'a comment stays as it is'\n";

    #[test]
    fn none_of_the_backups_recovery_settings_survive() {
        let conf = settings(RecoveryTarget::End).render(Some(PROMOTED_STANDBY), "walvault restore");
        assert_eq!(effective(&conf, "max_connections").as_deref(), Some("50"));
        assert_eq!(
            effective(&conf, "restore_command").as_deref(),
            Some("restore-agent fetch --repo 'file:///r' %f %p")
        );
        for p in TARGET_KINDS.iter().chain(&["recovery_end_command"]) {
            assert_eq!(effective(&conf, p).as_deref(), Some(""), "{p}");
        }
        // Standby-only settings: the backup's are gone, and nothing overrides postgresql.conf.
        for p in STANDBY_ONLY {
            assert_eq!(effective(&conf, p), None, "{p}");
        }
        assert_eq!(effective(&conf, "recovery_min_apply_delay").as_deref(), Some("0"));
        assert_eq!(
            effective(&conf, "recovery_target_action").as_deref(),
            Some("promote")
        );
        // Every old line that set an owned parameter is commented out; comments stay as they are.
        for old in PROMOTED_STANDBY.lines().filter(|l| parameter_of(l).is_some()) {
            let owned = owned(&parameter_of(old).unwrap());
            assert_eq!(
                conf.contains(&format!("# replaced by walvault restore: {old}\n")),
                owned,
                "{old}"
            );
        }
        assert!(conf.contains("\n# recovery_target_name = 'a comment stays as it is'\n"));
    }

    #[test]
    fn the_unused_targets_are_cleared_before_the_chosen_one_is_set() {
        let conf = settings(RecoveryTarget::Name("before 'drop'".into()))
            .render(Some(PROMOTED_STANDBY), "walvault restore");
        assert_eq!(
            effective(&conf, "recovery_target_name").as_deref(),
            Some("before 'drop'")
        );
        assert_eq!(effective(&conf, "recovery_target_time").as_deref(), Some(""));
        let block: Vec<&str> = conf
            .lines()
            .skip_while(|l| *l != "# walvault restore")
            .filter_map(|l| {
                parameter_of(l)
                    .filter(|p| p.starts_with("recovery_target"))
                    .map(|_| l)
            })
            .collect();
        let chosen = block
            .iter()
            .position(|l| l.starts_with("recovery_target_name"))
            .unwrap();
        for (i, l) in block.iter().enumerate() {
            let kind = parameter_of(l).unwrap();
            if TARGET_KINDS.contains(&kind.as_str()) && i != chosen {
                assert!(i < chosen, "{l} comes after the chosen target");
            }
        }
    }

    #[test]
    fn every_recovery_parameter_is_set_exactly_once_by_the_block() {
        for target in [RecoveryTarget::End, RecoveryTarget::Immediate] {
            let conf = settings(target).render(None, "walvault restore");
            for p in SET {
                let n = conf
                    .lines()
                    .filter(|l| parameter_of(l).as_deref() == Some(p))
                    .count();
                assert_eq!(n, 1, "{p} in\n{conf}");
            }
        }
    }
}
