//! Writes the seed corpora under `fuzz/seeds/<target>/` from the frozen fixtures in
//! `shared/tests/fixtures/` and, when a directory of real WAL segments is given, from the first
//! pages of real segments. Seeds are kept small (a few pages each, under 200 KiB in all).
//!
//! `cargo +nightly run --example gen_seeds -- [WAL_DIR]` from `fuzz/` (WAL_DIR defaults to
//! `/tmp/walsample` when it exists).

use std::fs;
use std::path::{Path, PathBuf};

use walvault::repo::object::{ObjectKind, SealedObject};
use walvault::timeindex::{FORMAT_NAME, FORMAT_VERSION, StoredSummary};
use walvault::wal::decode::{RecordKind, WalDecoder};
use walvault::wal::summary::summarize_segment;
use walvault::wal::{SegmentName, WalFileName};

const PAGE: usize = 8192;
const SEG: usize = 16 << 20;
/// Geometry byte of `wal_decode` for 8 KiB pages in 16 MiB segments.
const GEOMETRY_16M_8K: u8 = 7 * 4 + 3;

/// Whether a record is of the kind a seed is wanted for.
type KindTest = fn(&RecordKind) -> bool;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    fs::create_dir_all(&d).expect("seed dir");
    fs::write(d.join(name), bytes).expect("seed file");
}

fn main() {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let fixtures = fuzz.join("../shared/tests/fixtures");
    let seeds = fuzz.join("seeds");
    let wal_dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/tmp/walsample")).filter(|p| p.is_dir()));

    let object = fs::read(fixtures.join("object-v1-history.wvo")).expect("fixture");
    let manifest = fs::read(fixtures.join("manifest-v1.json")).expect("fixture");
    let descriptor = fs::read(fixtures.join("walvault-v1.json")).expect("fixture");
    let (_, history) = walvault::repo::object::open(&object, ObjectKind::WalFile, "00000002.history")
        .expect("fixture opens");

    // wal_name: every name shape, LSNs, and the fixture's history file behind its timeline.
    for (i, name) in [
        "000000010000000A000000FF",
        "00000002000000000000000C.partial",
        "000000010000000000000002.00000028.backup",
        "0000000A.history",
        "16/B374D848",
        "0/3000060",
    ]
    .iter()
    .enumerate()
    {
        write(&seeds, "wal_name", &format!("name-{i}"), name.as_bytes());
    }
    let mut h = 2u32.to_le_bytes().to_vec();
    h.extend_from_slice(&history);
    write(&seeds, "wal_name", "history-fixture", &h);
    let mut h = 3u32.to_le_bytes().to_vec();
    h.extend_from_slice(
        b"# comment\n1\t0/3000060\tno recovery target specified\n\n2\t0/5000000\tat restore point \"x\"\n",
    );
    write(&seeds, "wal_name", "history-two", &h);

    // time_url.
    for (i, s) in [
        "2026-11-21 14:31:59",
        "2026-11-21T14:31:59.123456+02:00",
        "2024-02-29 09:01:59-0530",
        "file:///var/lib/walvault",
        "s3://key:secret@backups/pg/main",
    ]
    .iter()
    .enumerate()
    {
        write(&seeds, "time_url", &format!("text-{i}"), s.as_bytes());
    }

    // sealed_object: the fixture as stored, and objects of every kind and both codecs with the
    // repair bits set (mode 7: payload length, content length and hash, CRC).
    let mut s = vec![0u8];
    s.extend_from_slice(&object);
    write(&seeds, "sealed_object", "fixture-history", &s);
    let kinds = [
        (ObjectKind::Chunk, "ab".repeat(32), &descriptor[..]),
        (
            ObjectKind::Manifest,
            "20261121T143200Z".to_string(),
            &manifest[..],
        ),
        (
            ObjectKind::Summary,
            "000000010000000000000003".to_string(),
            &b"{}"[..],
        ),
    ];
    for (kind, name, content) in kinds {
        let sealed = SealedObject::seal(kind, &name, content, 3).expect("seal");
        let mut s = vec![7u8];
        s.extend_from_slice(&sealed.bytes);
        write(&seeds, "sealed_object", &format!("{kind:?}"), &s);
    }
    // Codec 0 (none): the payload is the content.
    let sealed = SealedObject::seal(ObjectKind::WalFile, "00000002.history", &history, 3).expect("seal");
    let mut plain = sealed.bytes[..sealed.bytes.len() - sealed.header.payload_len as usize].to_vec();
    plain[11] = 0;
    plain.extend_from_slice(&history);
    let mut s = vec![7u8];
    s.extend_from_slice(&plain);
    write(&seeds, "sealed_object", "codec-none", &s);

    // wal_decode, structure-aware mode (geometry bit 7; here 1 KiB pages, 1 MiB segments): a
    // commit, an abort, a restore point, a raw body spanning pages, a torn record, a custom
    // resource manager and a switch, all in PostgreSQL 15 pages.
    let mut spec = vec![0x80u8, 0x5A, 2];
    let mut rec = |rmid: u8, info: u8, flags: u8, data: &[u8]| {
        let unit = if flags & 8 != 0 { 64 } else { 1 };
        spec.extend_from_slice(&[rmid, info, flags, (data.len() / unit) as u8]);
        spec.extend_from_slice(data);
    };
    let mut commit = 817_040_000_123_456i64.to_le_bytes().to_vec();
    commit.extend_from_slice(&[1, 0, 0, 0, 5, 0, 0, 0, 0x7F, 0x06, 0, 0]);
    rec(1, 0x00, 1, &commit);
    rec(1, 0x20, 2, &817_040_000_200_000i64.to_le_bytes());
    let mut rp = 817_040_001_000_000i64.to_le_bytes().to_vec();
    rp.extend_from_slice(b"before-upgrade");
    rp.resize(72, 0);
    rec(0, 0x70, 1, &rp);
    rec(10, 0x00, 8, &[0xAB; 40 * 64]);
    rec(10, 0x00, 1 | 4 | 8, &[0xCD; 3 * 64]);
    rec(130, 0x00, 1, b"custom");
    rec(1, 0x30, 1, &commit);
    rec(0, 0x40, 0, &[]);
    write(&seeds, "wal_decode", "synthetic-records", &spec);

    // manifest: the fixtures.
    write(&seeds, "manifest", "manifest-v1.json", &manifest);
    write(&seeds, "manifest", "walvault-v1.json", &descriptor);

    let Some(wal_dir) = wal_dir else {
        eprintln!("no WAL directory: WAL seeds not written");
        return;
    };
    let mut all: Vec<(SegmentName, PathBuf)> = fs::read_dir(&wal_dir)
        .expect("WAL dir")
        .flatten()
        .filter_map(|e| match e.file_name().to_str()?.parse().ok()? {
            WalFileName::Segment(name) => Some((name, e.path())),
            _ => None,
        })
        .collect();
    all.sort();
    let mut segments: Vec<(SegmentName, Vec<u8>)> = Vec::new();
    for (name, path) in &all {
        let bytes = fs::read(path).expect("segment");
        if bytes.len() == SEG {
            segments.push((*name, bytes));
        }
        if segments.len() == 4 {
            break;
        }
    }
    if segments.is_empty() {
        eprintln!("no 16 MiB segments in {}", wal_dir.display());
        return;
    }
    let wal_seed = |name: &str, stream: &[u8]| {
        let mut s = vec![GEOMETRY_16M_8K, 0x5A];
        s.extend_from_slice(stream);
        write(&seeds, "wal_decode", name, &s);
    };
    // The start of the first segment and of a later one (which begins with a continuation).
    wal_seed("segment-start", &segments[0].1[..PAGE + 2048]);
    let (_, last) = segments.last().expect("a segment");
    wal_seed("segment-start-continued", &last[..PAGE + 2048]);
    // A segment boundary: the last page of one segment, then the first page of the next.
    if segments.len() >= 2 {
        let mut b = segments[0].1[SEG - PAGE..].to_vec();
        b.extend_from_slice(&segments[1].1[..PAGE / 2]);
        wal_seed("segment-boundary", &b);
    }
    // Pages holding the record kinds the time index reads: commit, abort, restore point, switch
    // (searched for in every segment of the directory, not only the first few).
    let mut wanted: Vec<(&str, KindTest)> = vec![
        ("commit", |k| matches!(k, RecordKind::Commit { .. })),
        ("abort", |k| matches!(k, RecordKind::Abort { .. })),
        ("restore-point", |k| matches!(k, RecordKind::RestorePoint { .. })),
        ("switch", |k| matches!(k, RecordKind::Switch)),
    ];
    for (name, path) in &all {
        if wanted.is_empty() {
            break;
        }
        let bytes = fs::read(path).expect("segment");
        if bytes.len() != SEG {
            continue;
        }
        let start = name.start_lsn(SEG as u32).expect("segment start");
        let mut d = WalDecoder::new(start, SEG as u32, PAGE as u32);
        d.feed(&bytes);
        while let Ok(Some(r)) = d.poll() {
            if let Some(i) = wanted.iter().position(|(_, f)| f(&r.kind)) {
                let (label, _) = wanted.remove(i);
                let page = (r.lsn.0 - start.0) as usize / PAGE * PAGE;
                let end = (page + PAGE + 1024).min(SEG);
                wal_seed(&format!("page-with-{label}"), &bytes[page..end]);
            }
        }
    }
    for (label, _) in wanted {
        eprintln!("no {label} record in {}", wal_dir.display());
    }

    // manifest: stored summaries with their carries, and one bare decoder state.
    let mut carry = None;
    for (name, bytes) in &segments {
        let start = name.start_lsn(SEG as u32).expect("segment start");
        let Ok((summary, next)) = summarize_segment(bytes, start, carry.take()) else {
            break;
        };
        let stored = StoredSummary {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            segment: name.to_string(),
            summary,
            carry: next.clone(),
        };
        if next.as_ref().is_some_and(|c| c.pending_record().is_some()) {
            let json = serde_json::to_vec(&stored).expect("summary serializes");
            write(&seeds, "manifest", &format!("summary-{name}.json"), &json);
            let state = serde_json::to_value(next.as_ref().expect("carry")).expect("carry serializes");
            let state = serde_json::to_vec(&state["state"]).expect("state serializes");
            write(&seeds, "manifest", &format!("decoder-state-{name}.json"), &state);
        }
        carry = next;
    }
}
