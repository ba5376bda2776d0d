//! Where each object lives in the repository (relative to the repository prefix).
//!
//! ```text
//! walvault.json                                    repository descriptor (format version, cluster)
//! wal/<timeline><log>/<segment>.wvo                segments, .partial and .backup files
//! wal/history/<timeline>.history.wvo               timeline history files
//! ```
//! Keys are built only from validated [`WalFileName`]s, so no key can leave the prefix.

use crate::wal::WalFileName;

/// The repository descriptor.
pub const DESCRIPTOR_KEY: &str = "walvault.json";
/// Suffix of a sealed walvault object.
pub const OBJECT_SUFFIX: &str = ".wvo";

/// The key of the object that stores `name`. Segments are grouped per timeline and 4 GiB log id
/// (256 segments of 16 MiB), so no directory or listing grows without bound.
pub fn wal_key(name: &WalFileName) -> String {
    match name {
        WalFileName::History(_) => format!("wal/history/{name}{OBJECT_SUFFIX}"),
        WalFileName::Segment(s) | WalFileName::Partial(s) | WalFileName::Backup { segment: s, .. } => {
            format!("wal/{:08X}{:08X}/{name}{OBJECT_SUFFIX}", s.timeline.get(), s.log)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> String {
        wal_key(&s.parse().unwrap())
    }

    #[test]
    fn keys_are_stable() {
        // These paths are part of repository format v1: changing them orphans existing archives.
        assert_eq!(
            key("000000010000000A000000FF"),
            "wal/000000010000000A/000000010000000A000000FF.wvo"
        );
        assert_eq!(
            key("000000020000000000000003.partial"),
            "wal/0000000200000000/000000020000000000000003.partial.wvo"
        );
        assert_eq!(
            key("000000010000000000000002.00000028.backup"),
            "wal/0000000100000000/000000010000000000000002.00000028.backup.wvo"
        );
        assert_eq!(key("00000002.history"), "wal/history/00000002.history.wvo");
    }
}
