//! PostgreSQL write-ahead log: file names, LSNs, timelines and page headers.

pub mod catalog_rows;
pub mod changes;
mod crc32c;
pub mod decode;
pub mod lsn;
pub mod name;
pub mod page;
pub mod page_image;
pub mod pgtime;
pub mod record;
pub mod summary;
#[cfg(test)]
pub(crate) mod testwal;
pub mod version;

pub use lsn::{Lsn, TimelineId, TimelineZero};
pub use name::{NameError, SegmentName, SegmentNo, WalFileName};
pub use page::{PageError, SegmentInfo};
