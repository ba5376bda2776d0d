//! CRC-32C (Castagnoli), the checksum of WAL records (`pg_crc32c.h`).
//!
//! Written out here rather than pulled in as a dependency: it is forty lines, and PostgreSQL's
//! INIT / COMP / FIN steps map onto [`INIT`], [`update`] and a final complement, which a record
//! check needs separately (the body is summed before the header).

/// Reflected Castagnoli polynomial.
const POLY: u32 = 0x82F6_3B78;

/// `INIT_CRC32C`: the register before any byte.
pub(crate) const INIT: u32 = 0xFFFF_FFFF;

/// Slicing-by-8 tables: `TABLES[k][b]` is the CRC of byte `b` followed by `k` zero bytes.
static TABLES: [[u32; 256]; 8] = build_tables();

const fn build_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ POLY } else { crc >> 1 };
            bit += 1;
        }
        t[0][i] = crc;
        i += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

/// `COMP_CRC32C`: feed `data` into the register `crc` (start from [`INIT`], finish with `!crc`).
pub(crate) fn update(mut crc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        crc = TABLES[7][(lo & 0xFF) as usize]
            ^ TABLES[6][((lo >> 8) & 0xFF) as usize]
            ^ TABLES[5][((lo >> 16) & 0xFF) as usize]
            ^ TABLES[4][(lo >> 24) as usize]
            ^ TABLES[3][c[4] as usize]
            ^ TABLES[2][c[5] as usize]
            ^ TABLES[1][c[6] as usize]
            ^ TABLES[0][c[7] as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ TABLES[0][((crc ^ u32::from(b)) & 0xFF) as usize];
    }
    crc
}

/// The CRC-32C of `data` in one go.
#[cfg(test)]
pub(crate) fn checksum(data: &[u8]) -> u32 {
    !update(INIT, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_the_standard_check_values() {
        // RFC 3720 (iSCSI) appendix B.4 and the usual "123456789" check value.
        assert_eq!(checksum(b"123456789"), 0xE306_9283);
        assert_eq!(checksum(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(checksum(&[0xFFu8; 32]), 0x62A8_AB43);
        assert_eq!(checksum(b""), 0);
    }

    fn bitwise(data: &[u8]) -> u32 {
        let mut crc = INIT;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ POLY } else { crc >> 1 };
            }
        }
        !crc
    }

    proptest! {
        #[test]
        fn sliced_equals_bitwise_whatever_the_split(data in proptest::collection::vec(any::<u8>(), 0..300), cut: usize) {
            let cut = cut % (data.len() + 1);
            let split = !update(update(INIT, &data[..cut]), &data[cut..]);
            prop_assert_eq!(split, bitwise(&data));
        }
    }
}
