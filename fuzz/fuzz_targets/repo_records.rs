//! The small JSON records retention and locking keep in the repository (`retention.json`,
//! `locks/<kind>-<token>.json`, `backups/<id>/pinned.json`) and the keys they live under: bytes
//! anyone with write access to the bucket can change.
//!
//! Properties:
//! * `RetentionRecord::parse` never panics; a policy it accepts is recorded again (with the same
//!   rules) and parses back to the same policy;
//! * a lock record that parses serializes and parses back equal;
//! * a listed key accepted as a lock or pin key is exactly the key built back from what it names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walvault::repo::layout;
use walvault::repo::locks::LockRecord;
use walvault::retention::RetentionRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok(policy) = RetentionRecord::parse(data) {
        let again = RetentionRecord::new(&policy, 0);
        let json = serde_json::to_vec(&again).expect("a record serializes");
        let back = RetentionRecord::parse(&json).expect("a recorded policy parses back");
        assert_eq!(back, policy);
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
