//! The encrypted object envelope (format version 2, `repo/object.rs`, `docs/FORMAT.md`
//! "Encryption") under a repository key this process made.
//!
//! Input: `[op][at: u16 le][content...]`. The content is sealed as an object of the kind `op`'s
//! bits 2-4 pick, then changed as bits 0-1 say: one bit flipped at `at`, cut to `at` bytes, a
//! header byte at `at` rewritten with the header CRC repaired (what a forger would do), or a byte
//! appended. The whole input is also opened as it is.
//!
//! Properties: no panic on any bytes; the sealed object opens to its content; every change of a
//! sealed object, anywhere, is refused (no forgery, no truncation or extension accepted); and no
//! object of version 1 (plain) is accepted by an encrypted repository.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use walvault::repo::RepoId;
use walvault::repo::keys::{KeySource, RepoKeys};
use walvault::repo::object::{ObjectKind, Sealer};

fn sealer() -> &'static Sealer {
    static SEALER: OnceLock<Sealer> = OnceLock::new();
    SEALER.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("walvault-fuzz-key-{}", std::process::id()));
        std::fs::write(&path, "5a".repeat(32)).expect("key file");
        let (keys, _) =
            RepoKeys::generate(&KeySource::File(path.clone()), &RepoId::random(), None).expect("keys");
        let _ = std::fs::remove_file(&path);
        Sealer::encrypted(keys)
    })
}

/// Where the name starts in a version 2 header, and the CRC's length.
const FIXED_LEN_V2: usize = 96;
const CRC_LEN: usize = 4;

fuzz_target!(|data: &[u8]| {
    let sealer = sealer();
    // Arbitrary bytes: never a panic, and nothing a fuzzer can make opens.
    for kind in [ObjectKind::WalFile, ObjectKind::Chunk, ObjectKind::Record] {
        assert!(sealer.open(data, kind, "000000010000000000000001").is_err());
    }
    assert!(sealer.open_record("retention.json", data).is_err());

    let Some((&op, rest)) = data.split_first() else {
        return;
    };
    let Some((at, content)) = rest.split_first_chunk::<2>() else {
        return;
    };
    let at = u16::from_le_bytes(*at) as usize;
    let (kind, name) = match (op >> 2) & 7 {
        0 => (ObjectKind::WalFile, "000000010000000000000001"),
        1 => (ObjectKind::Chunk, "ab"),
        2 => (ObjectKind::Manifest, "20261122T101010Z"),
        3 => (ObjectKind::Summary, "0000000100000000000000FF"),
        _ => (
            ObjectKind::Record,
            "locks/backup-0123456789abcdef0123456789abcdef.json",
        ),
    };
    let sealed = sealer.seal(kind, name, content, 1).expect("seal");
    let (header, opened) = sealer
        .open(&sealed.bytes, kind, name)
        .expect("a sealed object opens");
    assert_eq!(opened, content);
    assert_eq!(header.blake3, sealer.content_hash(content));
    // Plain objects are refused by an encrypted repository.
    let plain = Sealer::plain().seal(kind, name, content, 1).expect("seal");
    assert!(sealer.open(&plain.bytes, kind, name).is_err());

    let mut changed = sealed.bytes.to_vec();
    let len = changed.len();
    let header_end = FIXED_LEN_V2 + name.len();
    match op & 3 {
        0 => changed[at % len] ^= 1 << (op >> 5),
        1 => changed.truncate(at % len),
        2 => {
            let i = at % header_end;
            changed[i] = changed[i].wrapping_add(1 + (op >> 2));
            let crc = crc32fast::hash(&changed[..header_end]);
            changed[header_end..header_end + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
        }
        _ => changed.push(op),
    }
    assert!(
        sealer.open(&changed, kind, name).is_err(),
        "a changed object opened (op {op}, at {at})"
    );
});
