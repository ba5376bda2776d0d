//! CRC-32C (Castagnoli), the checksum of WAL records (`pg_crc32c.h`), in PostgreSQL's INIT /
//! COMP / FIN steps: [`INIT`], [`update`] and a final complement, which a record check needs
//! separately (the body is summed before the header). The arithmetic is the `crc32c` crate's
//! (hardware instructions where the CPU has them): the time index decodes every archived byte.

/// `INIT_CRC32C`: the register before any byte.
pub(crate) const INIT: u32 = 0xFFFF_FFFF;

/// `COMP_CRC32C`: feed `data` into the register `crc` (start from [`INIT`], finish with `!crc`).
pub(crate) fn update(crc: u32, data: &[u8]) -> u32 {
    // The crate works on finished values (complemented registers).
    !::crc32c::crc32c_append(!crc, data)
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

    /// Reflected Castagnoli polynomial.
    const POLY: u32 = 0x82F6_3B78;

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
        fn incremental_equals_bitwise_whatever_the_split(data in proptest::collection::vec(any::<u8>(), 0..300), cut: usize) {
            let cut = cut % (data.len() + 1);
            let split = !update(update(INIT, &data[..cut]), &data[cut..]);
            prop_assert_eq!(split, bitwise(&data));
        }
    }
}
