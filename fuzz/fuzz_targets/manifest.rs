//! The JSON documents a repository holds, on arbitrary bytes: the backup manifest
//! (`basebackup/manifest.rs`), the repository descriptor (`repo/descriptor.rs`), the stored segment
//! summary of the time index (`timeindex.rs`) and the WAL decoder state it carries
//! (`wal/decode.rs`, resumed as `summarize_segment` and `WalDecoder::resume` would).
//!
//! Every input goes to every parser (each document names its own format, so at most one
//! accepts it). Properties:
//! * an accepted manifest has only safe relative entry paths (not absolute, no empty, `.` or `..`
//!   component, no NUL or other control character, no backslash), which joined to a directory
//!   stay inside it; chunk ids are 64 lower-case hex digits and match the file size; it follows
//!   the other rules of `docs/FORMAT.md` ("Validation") that need no repository: sorted unique
//!   paths, nothing under a file, modes, sizes, names restore owns, tablespaces, header fields;
//!   and it round-trips through its JSON;
//! * chunks stored as differences (version 4) are sorted, each once, each read from a packed
//!   difference and a base that are both stored whole;
//! * an accepted descriptor or summary round-trips through its JSON;
//! * a carried decoder state from the repository is either refused or resumes and decodes
//!   following bytes without panicking.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use walvault::basebackup::BackupId;
use walvault::basebackup::manifest::{EntryKind, Manifest};
use walvault::basebackup::pack::Places;
use walvault::repo::RepoDescriptor;
use walvault::repo::layout::{chunk_key, parse_chunk_key};
use walvault::timeindex::StoredSummary;
use walvault::wal::decode::{DecoderState, WalDecoder};
use walvault::wal::summary::summarize_segment;
use walvault::wal::{Lsn, WalFileName};

fn check_manifest(data: &[u8]) {
    let Ok(m) = Manifest::parse(data) else {
        return;
    };
    let root = Path::new("/restore/pgdata");
    for e in &m.entries {
        let p = &e.path;
        assert!(!p.is_empty() && !p.starts_with('/'), "{p:?}");
        assert!(
            !p.contains('\0') && !p.contains('\\') && !p.chars().any(char::is_control),
            "{p:?}"
        );
        assert!(
            p.split('/').all(|c| !c.is_empty() && c != "." && c != ".."),
            "{p:?}"
        );
        let joined = root.join(p);
        assert!(joined.starts_with(root), "{p:?}");
        assert!(
            joined
                .components()
                .all(|c| !matches!(c, Component::ParentDir | Component::CurDir)),
            "{p:?}"
        );
        // Every accepted chunk id names a key under chunks/ that parses back to it.
        assert!(
            e.chunks
                .iter()
                .all(|c| parse_chunk_key(&chunk_key(c)) == Some(*c) && chunk_key(c).starts_with("chunks/")),
            "{e:?}"
        );
        match e.within {
            // A small file sharing its chunk: its only chunk, which holds it whole (version 3).
            Some(w) => assert!(
                e.kind == EntryKind::File
                    && m.version >= 3
                    && e.chunks.len() == 1
                    && e.size > 0
                    && w.at.checked_add(e.size).is_some_and(|end| end <= w.of)
                    && w.of <= m.chunk_size,
                "{e:?}"
            ),
            None if e.kind == EntryKind::File => {
                assert_eq!(e.chunks.len() as u64, e.size.div_ceil(m.chunk_size), "{e:?}");
            }
            None => {}
        }
    }
    check_deltas(&m);
    check_manifest_rules(&m);
    let again = Manifest::parse(&m.to_json()).expect("a manifest's own JSON parses");
    assert_eq!(again, m);
    assert_eq!(m.id.as_str().parse::<BackupId>().as_ref(), Ok(&m.id));
}

/// Chunks stored as differences (version 4): sorted and each once, read from a packed
/// difference and a base both stored whole, so that a restore never follows a chain.
fn check_deltas(m: &Manifest) {
    if m.deltas.is_empty() {
        return;
    }
    assert!(m.version >= 4, "deltas in version {}", m.version);
    let packed = Places::of(&m.packs);
    let places = m.places();
    for pair in m.deltas.windows(2) {
        assert!(pair[0].chunk < pair[1].chunk, "{pair:?}");
    }
    for d in &m.deltas {
        assert!(packed.get(&d.xor).is_some(), "{d:?}");
        assert!(d.base != d.chunk && d.xor != d.chunk, "{d:?}");
        for whole in [&d.base, &d.xor] {
            assert!(places.delta(whole).is_none(), "a chain: {d:?}");
        }
    }
}

/// The rules of FORMAT.md, "Validation", that need no repository or target directory.
fn check_manifest_rules(m: &Manifest) {
    assert!(
        m.chunk_size >= 1 && m.chunk_size <= 1 << 30,
        "chunk size {}",
        m.chunk_size
    );
    assert!(m.timeline != 0 && m.start_lsn <= m.stop_lsn);
    for wal in [&m.start_wal, &m.stop_wal] {
        assert!(matches!(wal.parse(), Ok(WalFileName::Segment(_))), "{wal:?}");
    }
    assert!(!m.backup_label.contains('\0'));
    assert!(m.tablespace_map.as_ref().is_none_or(|t| !t.contains('\0')));
    for pair in m.entries.windows(2) {
        assert!(
            pair[0].path.as_bytes() < pair[1].path.as_bytes(),
            "not sorted or twice: {pair:?}"
        );
        let under_file = pair[0].kind == EntryKind::File
            && pair[1]
                .path
                .strip_prefix(pair[0].path.as_str())
                .is_some_and(|r| r.starts_with('/'));
        assert!(!under_file, "an entry under a file: {pair:?}");
    }
    let mut total: u64 = 0;
    for e in &m.entries {
        assert!(
            e.path.len() <= 4095 && e.path.split('/').all(|c| c.len() <= 255),
            "{e:?}"
        );
        assert!(e.mode <= 0o7777, "{e:?}");
        match e.kind {
            EntryKind::File => {
                assert_eq!(e.mode & 0o7000, 0, "setuid, setgid or sticky file: {e:?}");
                assert!(e.size <= 1 << 40, "{e:?}");
                total = total.checked_add(e.size).expect("total size overflows");
            }
            EntryKind::Dir => {
                assert_eq!(e.mode & 0o5000, 0, "setuid or sticky directory: {e:?}");
                assert_eq!(e.mode & 0o700, 0o700, "directory not 0700 for its owner: {e:?}");
                assert!(
                    e.size == 0 && e.chunks.is_empty(),
                    "directory with content: {e:?}"
                );
            }
        }
        let first = e.path.split('/').next().unwrap_or_default();
        assert!(
            !["backup_label", "tablespace_map", "walvault.spool"].contains(&first),
            "{e:?}"
        );
        for top in ["postgresql.auto.conf", "recovery.signal", "standby.signal"] {
            if first == top {
                assert!(e.path == top && e.kind == EntryKind::File, "{e:?}");
            }
        }
    }
    assert!(total <= 1 << 50);
    let mut oids: Vec<u32> = m.tablespaces.iter().map(|t| t.oid).collect();
    oids.sort_unstable();
    oids.dedup();
    assert_eq!(oids.len(), m.tablespaces.len(), "tablespace oid twice");
    for t in &m.tablespaces {
        let loc = &t.location;
        assert!(t.oid != 0 && loc.starts_with('/') && loc != "/", "{t:?}");
        assert!(loc.len() <= 4095 && !loc.chars().any(char::is_control), "{t:?}");
        assert!(
            Path::new(loc)
                .components()
                .all(|c| !matches!(c, Component::ParentDir | Component::CurDir)),
            "{t:?}"
        );
        assert!(!loc.split('/').any(|c| c == "." || c == ".."), "{t:?}");
    }
}

fn check_descriptor(data: &[u8]) {
    if let Ok(d) = RepoDescriptor::parse(data) {
        assert_eq!(RepoDescriptor::parse(&d.to_json()).ok(), Some(d));
    }
}

fn check_summary(data: &[u8]) {
    // The summary names its segment; the reader asks for that one.
    let Some(seg) = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v.get("segment")?.as_str()?.parse::<WalFileName>().ok())
        .and_then(|n| n.wal_segment())
    else {
        return;
    };
    let Ok(s) = StoredSummary::parse(data, &seg) else {
        return;
    };
    assert_eq!(s.segment, seg.to_string());
    let json = serde_json::to_vec(&s).expect("summary serializes");
    assert_eq!(StoredSummary::parse(&json, &seg).as_ref(), Ok(&s));
    let Some(carry) = s.carry else {
        return;
    };
    // Push resumes the next segment's summary from a stored carry (timeindex::carry_before).
    let state = serde_json::to_value(&carry).expect("carry serializes");
    let Some(state) = state
        .get("state")
        .and_then(|v| serde_json::from_value::<DecoderState>(v.clone()).ok())
    else {
        return;
    };
    if state.segment_size() == 1 << 20 {
        let mut bytes = continuation(&state, state.next_lsn().0, 1 << 20);
        bytes.resize(1 << 20, 0);
        let _ = summarize_segment(&bytes, carry.next_segment_start(), Some(carry));
    }
}

/// Bytes that continue `state` from `from`: zeros to the next page, then a page header that
/// matches the state (what a well-formed next page would hold), then zeros.
fn continuation(state: &DecoderState, from: u64, len: usize) -> Vec<u8> {
    let json = serde_json::to_value(state).expect("state serializes");
    let num = |k: &str| json.get(k).and_then(serde_json::Value::as_u64);
    let blk = u64::from(state.block_size().max(1));
    let seg = u64::from(state.segment_size().max(1));
    let to_page = usize::try_from((blk - from % blk) % blk)
        .unwrap_or(usize::MAX)
        .min(len);
    let mut out = vec![0u8; to_page];
    let page = from.saturating_add(to_page as u64);
    let long = page.is_multiple_of(seg);
    let remaining = json
        .get("phase")
        .and_then(|p| p.get("Record"))
        .and_then(|r| {
            Some(
                r.get("tot_len")?
                    .as_u64()?
                    .saturating_sub(r.get("got")?.as_u64()?),
            )
        })
        .or_else(|| {
            json.get("phase")?
                .get("SkipContinuation")?
                .get("remaining")?
                .as_u64()
        })
        .unwrap_or(0);
    let magic = num("magic").unwrap_or(0xD110) as u16;
    let info: u16 = u16::from(remaining > 0) | if long { 2 } else { 0 };
    out.extend_from_slice(&magic.to_le_bytes());
    out.extend_from_slice(&info.to_le_bytes());
    out.extend_from_slice(&(num("timeline").unwrap_or(1).max(1) as u32).to_le_bytes());
    out.extend_from_slice(&page.to_le_bytes());
    out.extend_from_slice(&(remaining as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    if long {
        out.extend_from_slice(&num("system_identifier").unwrap_or(1).to_le_bytes());
        out.extend_from_slice(&state.segment_size().to_le_bytes());
        out.extend_from_slice(&state.block_size().to_le_bytes());
    }
    out.resize(len.max(out.len()), 0);
    out
}

/// A decoder state read back from storage is untrusted: resume refuses it or decodes on.
fn check_decoder_state(data: &[u8]) {
    let Ok(state) = serde_json::from_slice::<DecoderState>(data) else {
        return;
    };
    let from = state.next_lsn();
    let Ok(mut d) = WalDecoder::resume(state.clone()) else {
        return;
    };
    assert_eq!(d.next_feed_lsn(), from);
    assert_eq!(d.snapshot().as_ref(), Some(&state));
    let bytes = continuation(&state, from.0, 4096);
    d.feed(&bytes);
    let mut last = Lsn(0);
    for _ in 0..10_000 {
        match d.poll() {
            Ok(Some(r)) => {
                assert!(r.lsn >= last);
                last = r.lsn;
            }
            Ok(None) | Err(_) => return,
        }
    }
    panic!("more than 10000 records from 4 KiB");
}

fuzz_target!(|data: &[u8]| {
    check_manifest(data);
    check_descriptor(data);
    check_summary(data);
    check_decoder_state(data);
});
