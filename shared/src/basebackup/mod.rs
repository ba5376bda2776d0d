//! The base-backup format: what a backup is once stored. Files split into content-addressed
//! chunks stored once ([`chunk`]), described by a manifest written last ([`manifest`]), with the
//! backup label PostgreSQL needs ([`label`]), the relation map `find` reads ([`relmap`]), what a
//! backup leaves out ([`exclude`]) and how an unchanged file is taken over from an earlier backup
//! unread ([`reuse`]). `archive-agent backup` (in [`crate::commands::backup`]) writes it;
//! restore, verify, find and expire read it.

pub mod chunk;
pub mod chunk_id;
pub mod exclude;
pub mod incremental;
pub mod label;
pub mod manifest;
pub mod pack;
pub mod pack_space;
pub mod page_checksum;
pub mod relmap;
pub mod reuse;
pub mod server_manifest;

pub use manifest::{BackupId, Manifest};
