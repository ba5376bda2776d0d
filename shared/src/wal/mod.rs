//! PostgreSQL write-ahead log: file names, LSNs, timelines and page headers.

pub mod lsn;
pub mod name;
pub mod page;

pub use lsn::{Lsn, TimelineId};
pub use name::{NameError, SegmentName, WalFileName};
pub use page::{PageError, SegmentInfo};
