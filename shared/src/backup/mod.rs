//! Base backups: online, non-exclusive, read straight from the data directory, split into
//! content-addressed chunks stored once, and described by a manifest written last.

pub mod chunk;
pub mod exclude;
pub mod label;
pub mod manifest;
pub mod reuse;
pub mod take;

pub use manifest::{BackupId, Manifest};
