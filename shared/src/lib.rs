//! walvault: the library behind `archive-agent` and `restore-agent`.
//!
//! Two floors (docs/ARCHITECTURE.md draws them). [`commands`] holds what a user runs, one module
//! per command, each split by phase. Below it is the core the commands share: the WAL ([`wal`]),
//! the repository and its formats ([`repo`]), the base-backup format ([`basebackup`]), timelines
//! ([`timeline`]), the time index ([`timeindex`]), replay progress ([`replay`]), files local to
//! the host ([`local`]) and the report layer ([`report`]). Pure parts are plain functions over
//! bytes and values; the storage, the file system and the clock live at the edges. The binaries
//! only parse flags, call into here and map the outcome to an exit code (see [`exit`]).
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod basebackup;
pub mod call;
pub mod catalog;
pub mod cli;
pub mod commands;
pub mod config;
pub mod exit;
pub mod invocation;
pub mod local;
pub mod recovery_conf;
pub mod replay;
pub mod replication;
pub mod repo;
pub mod report;
pub mod retention;
pub mod retry;
pub mod time;
pub mod timeindex;
pub mod timeline;
pub mod wal;
