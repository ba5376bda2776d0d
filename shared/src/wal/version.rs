//! What differs between the PostgreSQL major versions walvault reads and drives: one row per
//! version, so that supporting a new release is one new row plus its tests. Mostly the WAL
//! format; also where `pg_control`'s CRC sits, which backups check.
//!
//! Every value was checked against that version's own headers (`xlog_internal.h`,
//! `xlogrecord.h`, `rmgrlist.h`) on the release branches REL_13 to REL_19_STABLE. What stayed the
//! same from 13 to 19, and so is not in the table: the page header layouts (24 and 40 bytes), the
//! record header (24 bytes), the block reference layout, `XLOG_SWITCH` (0x40) and
//! `XLOG_RESTORE_POINT` (0x70) with `xl_restore_point { rp_time; rp_name[64] }`, and the xact
//! records' main data, which starts with `TimestampTz xact_time` for commit, abort and their
//! prepared variants.

/// The WAL format of one PostgreSQL major version, as far as walvault reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalFormat {
    /// PostgreSQL major version.
    pub major: u32,
    /// `XLOG_PAGE_MAGIC`: changes whenever the WAL format does, so it names the version.
    pub magic: u16,
    /// `XLP_FIRST_IS_OVERWRITE_CONTRECORD`: 0x0008 up to 18; 19 removed `XLP_BKP_REMOVABLE`
    /// (0x0004) and renumbered this flag into its place.
    pub overwrite_contrecord: u16,
    /// `XLP_ALL_FLAGS`: any other `xlp_info` bit makes a page header invalid.
    pub all_page_flags: u16,
    /// `RM_MAX_BUILTIN_ID` (`RM_MAX_ID` before 15): 21 (`RM_LOGICALMSG_ID`) up to 18; 19 added
    /// `RM_XLOG2_ID` (22).
    pub max_builtin_rmgr: u8,
    /// Whether custom resource managers (ids 128 to 255) exist: from 15.
    pub custom_rmgrs: bool,
    /// `bimg_info` bits saying a full-page image is compressed (and so carries a hole length):
    /// `BKPIMAGE_IS_COMPRESSED` (0x02) up to 14; from 15 one bit per method, PGLZ 0x04, LZ4 0x08,
    /// ZSTD 0x10 (0x02 became `BKPIMAGE_APPLY`).
    pub image_compressed_bits: u8,
    /// `offsetof(ControlFileData, crc)` on 64-bit platforms: the CRC-32C of `pg_control`'s
    /// bytes before it. 18 added `default_char_signedness`; 19 grew `CheckPoint` and added the
    /// online checksum state.
    pub control_crc_offset: usize,
}

const PRE_19_PAGE_FLAGS: (u16, u16) = (0x0008, 0x000F);
const PG19_PAGE_FLAGS: (u16, u16) = (0x0004, 0x0007);
const COMPRESSED_PG13: u8 = 0x02;
const COMPRESSED_PG15: u8 = 0x04 | 0x08 | 0x10;

const fn format(
    major: u32,
    magic: u16,
    flags: (u16, u16),
    max_rmgr: u8,
    image: u8,
    control_crc_offset: usize,
) -> WalFormat {
    WalFormat {
        major,
        magic,
        overwrite_contrecord: flags.0,
        all_page_flags: flags.1,
        max_builtin_rmgr: max_rmgr,
        custom_rmgrs: major >= 15,
        image_compressed_bits: image,
        control_crc_offset,
    }
}

/// Every supported version, oldest first. PostgreSQL 19's betas 1 and 2 wrote 0xD120, a format
/// that changed again before the release (0xD121, REL_19_STABLE `b01c31eef9`): not supported.
pub const FORMATS: [WalFormat; 7] = [
    format(13, 0xD106, PRE_19_PAGE_FLAGS, 21, COMPRESSED_PG13, 288),
    format(14, 0xD10D, PRE_19_PAGE_FLAGS, 21, COMPRESSED_PG13, 288),
    format(15, 0xD110, PRE_19_PAGE_FLAGS, 21, COMPRESSED_PG15, 288),
    format(16, 0xD113, PRE_19_PAGE_FLAGS, 21, COMPRESSED_PG15, 288),
    format(17, 0xD116, PRE_19_PAGE_FLAGS, 21, COMPRESSED_PG15, 288),
    format(18, 0xD118, PRE_19_PAGE_FLAGS, 21, COMPRESSED_PG15, 292),
    format(19, 0xD121, PG19_PAGE_FLAGS, 22, COMPRESSED_PG15, 308),
];

/// The oldest and newest supported major versions.
pub const OLDEST: u32 = FORMATS[0].major;
pub const NEWEST: u32 = FORMATS[FORMATS.len() - 1].major;

/// "PostgreSQL 13 to 19", for messages.
pub fn supported_range() -> String {
    format!("PostgreSQL {OLDEST} to {NEWEST}")
}

/// The format whose pages carry `magic`, if supported.
pub fn for_magic(magic: u16) -> Option<&'static WalFormat> {
    FORMATS.iter().find(|f| f.magic == magic)
}

/// The format of major version `major`, if supported.
pub fn for_major(major: u32) -> Option<&'static WalFormat> {
    FORMATS.iter().find(|f| f.major == major)
}

/// The major version of a `server_version_num` (`180004` is 18; `90624` would be 9).
pub fn major_of_version_num(version_num: i32) -> u32 {
    u32::try_from(version_num / 10000).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_version_from_13_to_19_once_with_its_own_magic() {
        let majors: Vec<u32> = FORMATS.iter().map(|f| f.major).collect();
        assert_eq!(majors, (13..=19).collect::<Vec<_>>());
        for f in &FORMATS {
            assert_eq!(for_magic(f.magic), Some(f));
            assert_eq!(for_major(f.major), Some(f));
        }
        assert_eq!(supported_range(), "PostgreSQL 13 to 19");
    }

    #[test]
    fn magics_as_the_headers_define_them() {
        let magic = |v| for_major(v).unwrap().magic;
        assert_eq!(
            [13, 14, 15, 16, 17, 18, 19].map(magic),
            [0xD106, 0xD10D, 0xD110, 0xD113, 0xD116, 0xD118, 0xD121]
        );
        // 12, a 19 beta and 20devel-to-be are not known.
        for unknown in [0xD101, 0xD120, 0xD122] {
            assert_eq!(for_magic(unknown), None, "{unknown:#06X}");
        }
    }

    #[test]
    fn pg19_renumbered_the_overwrite_flag_and_added_a_resource_manager() {
        let (f18, f19) = (for_major(18).unwrap(), for_major(19).unwrap());
        assert_eq!((f18.overwrite_contrecord, f18.all_page_flags), (0x0008, 0x000F));
        assert_eq!((f19.overwrite_contrecord, f19.all_page_flags), (0x0004, 0x0007));
        assert_eq!((f18.max_builtin_rmgr, f19.max_builtin_rmgr), (21, 22));
        assert!(!for_major(14).unwrap().custom_rmgrs && for_major(15).unwrap().custom_rmgrs);
    }

    #[test]
    fn majors_of_version_numbers() {
        assert_eq!(major_of_version_num(130023), 13);
        assert_eq!(major_of_version_num(180004), 18);
        assert_eq!(major_of_version_num(190000), 19);
        assert_eq!(major_of_version_num(90624), 9);
        assert_eq!(major_of_version_num(-1), 0);
    }
}
