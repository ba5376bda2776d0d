//! WAL file names (`wal/name.rs`), LSNs (`wal/lsn.rs`), repository keys (`repo/layout.rs`) and
//! timeline history files (`timeline.rs`) on arbitrary text.
//!
//! Properties:
//! * an accepted file name is exactly its own display (`parse(s).to_string() == s`, so
//!   `parse(display(x)) == x`), holds no `/`, `..`, NUL or control character, and its storage
//!   key stays under `wal/`;
//! * a segment name maps to a start LSN and back for every segment size that can hold it;
//! * an accepted LSN round-trips through its display;
//! * an accepted history lists ancestors with increasing ids below its own timeline and switch
//!   points that never go backwards, and written back in PostgreSQL's format parses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walvault::repo::layout::wal_key;
use walvault::timeline::TimelineHistory;
use walvault::wal::{Lsn, SegmentName, TimelineId, WalFileName};

fn check_name(s: &str) {
    let Ok(name) = s.parse::<WalFileName>() else {
        return;
    };
    let shown = name.to_string();
    assert_eq!(shown, s, "accepted name is not its own display");
    assert_eq!(shown.parse::<WalFileName>(), Ok(name));
    assert!(
        !shown.contains('/') && !shown.contains("..") && !shown.chars().any(|c| c.is_control()),
        "{shown:?}"
    );
    let key = wal_key(&name);
    assert!(key.starts_with("wal/") && key.ends_with(".wvo"), "{key:?}");
    assert!(
        !key.contains("..") && !key.contains("//") && !key.chars().any(|c| c.is_control()),
        "{key:?}"
    );
    if let Some(seg) = name.wal_segment() {
        for shift in 20..=30 {
            let size = 1u32 << shift;
            let Some(start) = seg.start_lsn(size) else {
                continue;
            };
            assert_eq!(SegmentName::containing(seg.timeline, start, size), seg, "{size}");
            let last = Lsn(start.0 + (u64::from(size) - 1));
            assert_eq!(SegmentName::containing(seg.timeline, last, size), seg, "{size}");
        }
    }
}

fn check_lsn(s: &str) {
    if let Ok(lsn) = s.parse::<Lsn>() {
        assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
    }
}

fn check_history(tli: u32, text: &[u8]) {
    let Some(timeline) = TimelineId::new(tli) else {
        return;
    };
    let Ok(h) = TimelineHistory::parse(timeline, text) else {
        return;
    };
    assert_eq!(h.timeline, tli);
    let mut written = String::new();
    for pair in h.ancestors.windows(2) {
        assert!(pair[0].timeline < pair[1].timeline, "{h:?}");
        assert!(pair[0].switch_lsn <= pair[1].switch_lsn, "{h:?}");
    }
    for a in &h.ancestors {
        assert!(a.timeline.get() >= 1 && a.timeline < timeline, "{h:?}");
        assert!(!a.reason.contains('\n'), "{h:?}");
        written.push_str(&format!("{}\t{}\t{}\n", a.timeline, a.switch_lsn, a.reason));
    }
    let again = TimelineHistory::parse(timeline, written.as_bytes());
    assert_eq!(again.as_ref(), Ok(&h), "{written:?}");
    if let Some(p) = h.parent() {
        assert_eq!(h.begins_at(), p.switch_lsn);
        assert_eq!(h.timeline_at(p.switch_lsn), tli);
    }
    if let Some(first) = h.ancestors.first()
        && first.switch_lsn.0 > 0
    {
        assert_eq!(h.timeline_at(Lsn(0)), first.timeline);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        check_name(s);
        check_lsn(s);
    }
    // History: the first four bytes are the timeline, the rest the file's content.
    if let Some((tli, text)) = data.split_first_chunk::<4>() {
        check_history(u32::from_le_bytes(*tli).max(1), text);
    }
});
