//! walvault: the library behind `archive-agent` and `restore-agent`.
//!
//! Pure parts (WAL names, page headers, the object envelope, the repository layout) are plain
//! functions over bytes and values; the storage, the file system and the clock live at the edges
//! (`repo::store`, `archive`, `restore`). The binaries only parse flags, call into here and map
//! the outcome to an exit code (see [`exit`]).
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod admin;
pub mod archive;
pub mod archive_command;
pub mod backup;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod drill;
pub mod exit;
pub mod expire;
pub mod fetch;
pub mod find;
pub mod fsutil;
pub mod info;
pub mod lease;
pub mod prefetch;
pub mod progress;
pub mod progress_bar;
pub mod recovery_conf;
pub mod relmap;
pub mod repo;
pub mod report;
pub mod restore;
pub mod restore_command;
pub mod retention;
pub mod retry;
pub mod spool;
pub mod time;
pub mod timeindex;
pub mod timeline;
pub mod verify;
pub mod wal;
