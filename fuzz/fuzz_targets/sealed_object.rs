//! The sealed object envelope (`repo/object.rs`, `docs/FORMAT.md` "sealed WAL object") on
//! arbitrary bytes.
//!
//! Input: `[mode][object bytes...]`. Random bytes rarely get past the header CRC, so the mode
//! bits let the harness repair what a hostile writer would also get right: bit 0 the payload
//! length, bit 1 the original length and blake3 (from the payload as this harness decodes it),
//! bit 2 the header CRC. Bits 3-4 pick the kind the reader expects; the name expected is the
//! one in the header (what a reader that asks for the right key sees).
//!
//! Properties: no panic and no allocation beyond the fuzzer's malloc limit (the header's length
//! fields are checked against the payload before a buffer is sized from them); a header that
//! reads has an ASCII name of 1 to 64 bytes; an object that opens has the length and blake3 its
//! header states, and sealed again under the same kind and name opens to the same content and
//! header fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walvault::repo::object::{self, ObjectKind, SealedObject};

const FIXED_LEN: usize = 64;
const CRC_LEN: usize = 4;

/// What this harness is willing to decompress to repair a header.
const REPAIR_LIMIT: usize = 1 << 20;

fn repair(obj: &mut [u8], mode: u8) {
    if obj.len() < FIXED_LEN + CRC_LEN {
        return;
    }
    let name_len = u32::from_le_bytes(obj[12..16].try_into().unwrap()) as usize;
    let Some(header_end) = FIXED_LEN
        .checked_add(name_len)
        .filter(|&e| e + CRC_LEN <= obj.len())
    else {
        return;
    };
    let payload_at = header_end + CRC_LEN;
    if mode & 1 != 0 {
        let len = (obj.len() - payload_at) as u64;
        obj[56..64].copy_from_slice(&len.to_le_bytes());
    }
    if mode & 2 != 0 {
        let payload = &obj[payload_at..];
        let content = match obj[11] {
            0 => Some(payload.to_vec()),
            1 => zstd::bulk::decompress(payload, REPAIR_LIMIT).ok(),
            _ => None,
        };
        if let Some(content) = content {
            let hash = *blake3::hash(&content).as_bytes();
            obj[16..24].copy_from_slice(&(content.len() as u64).to_le_bytes());
            obj[24..56].copy_from_slice(&hash);
        }
    }
    if mode & 4 != 0 {
        let crc = crc32fast::hash(&obj[..header_end]);
        obj[header_end..payload_at].copy_from_slice(&crc.to_le_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let mut obj = bytes.to_vec();
    repair(&mut obj, mode);

    let Ok(header) = object::read_header(&obj) else {
        return;
    };
    // As FORMAT.md specifies: an ASCII name of 1 to 64 bytes, at most 1 GiB of content.
    let n = &header.name;
    assert!(n.is_ascii() && (1..=64).contains(&n.len()), "{n:?}");
    assert!(header.original_len <= object::MAX_ORIGINAL_LEN);
    let kind = match (mode >> 3) & 3 {
        0 => header.kind,
        1 => ObjectKind::WalFile,
        2 => ObjectKind::Chunk,
        _ => ObjectKind::Manifest,
    };
    let Ok((opened, content)) = object::open(&obj, kind, &header.name) else {
        return;
    };
    assert_eq!(opened, header);
    assert_eq!(opened.kind, kind);
    assert_eq!(content.len() as u64, header.original_len);
    assert_eq!(blake3::hash(&content).as_bytes(), &header.blake3);
    assert_eq!(
        obj.len() as u64,
        (FIXED_LEN + header.name.len() + CRC_LEN) as u64 + header.payload_len
    );

    // Whatever opens can be sealed again and reads back the same.
    let resealed = SealedObject::seal(kind, &header.name, &content, 1).expect("seal");
    let (h2, c2) = object::open(&resealed.bytes, kind, &header.name).expect("a resealed object opens");
    assert_eq!(c2, content);
    assert_eq!(
        (h2.kind, &h2.name, h2.original_len, h2.blake3),
        (kind, &header.name, header.original_len, header.blake3)
    );
    assert_eq!(object::read_header(&resealed.bytes).as_ref(), Ok(&h2));
});
