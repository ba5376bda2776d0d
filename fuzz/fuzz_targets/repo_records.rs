//! The small JSON records retention and locking keep in the repository (`retention.json`,
//! `locks/<kind>-<token>.json`, `backups/<id>/pinned.json`) and the keys they live under: bytes
//! anyone with write access to the bucket can change.
//!
//! Properties:
//! * `RetentionRecord::parse` never panics; a record it accepts serializes and parses back equal,
//!   and its policy is recorded again (same rules) to a record whose policy is the same;
//! * a lock record that parses serializes and parses back equal;
//! * a listed key accepted as a lock or pin key is exactly the key built back from what it names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walvault::repo::layout;
use walvault::repo::locks::LockRecord;
use walvault::retention::RetentionRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = RetentionRecord::parse(data) {
        let json = serde_json::to_vec(&record).expect("a record serializes");
        assert_eq!(RetentionRecord::parse(&json).ok().as_ref(), Some(&record));
        let policy = record.policy().expect("an accepted record has a valid policy");
        let again = RetentionRecord::new(&policy, &[], 0);
        let json = serde_json::to_vec(&again).expect("a record serializes");
        let back = RetentionRecord::parse(&json).expect("a recorded policy parses back");
        assert_eq!(back.policy().ok(), Some(policy));
    }
    if let Ok(lock) = serde_json::from_slice::<LockRecord>(data) {
        let json = serde_json::to_vec(&lock).expect("a lock serializes");
        assert_eq!(serde_json::from_slice::<LockRecord>(&json).ok(), Some(lock));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some((kind, token)) = layout::parse_lock_key(text) {
            assert_eq!(layout::lock_key(kind, token).as_deref(), Some(text));
        }
        if let Some(id) = layout::parse_pin_key(text) {
            assert_eq!(layout::pin_key(&id), text);
        }
    }
});
