//! Base backups: online, non-exclusive, read straight from the data directory, split into
//! content-addressed chunks stored once, and described by a manifest written last.
//!
//! `take` runs a backup phase by phase: `session` starts it on PostgreSQL, `inventory` lists
//! what to copy and the backup it builds on, `copy` reads, chunks and uploads, `session` stops
//! it, and `finish` waits for its WAL and writes its manifest.

pub mod chunk;
mod control;
mod copy;
mod error;
pub mod exclude;
mod finish;
mod inventory;
pub mod label;
pub mod manifest;
pub mod reuse;
mod session;
pub mod take;

pub use error::BackupError;
pub use manifest::{BackupId, Manifest};
