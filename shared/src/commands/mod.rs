//! What a user runs: one module per command of `archive-agent` and `restore-agent`, each split by
//! phase where it has phases (`backup`, `restore`, `drill`, the `daemon`'s services). Each
//! command takes its options, does its work over the core (the rest of the crate) and returns one
//! report value; the binaries print it and map it to an exit code.
//!
//! archive-agent: [`push`] (via [`archive_command`], what PostgreSQL's `archive_command` runs),
//! [`daemon`], [`backup`], [`expire`], [`admin`] (`init`, `rekey`, `pin`).
//! restore-agent: [`fetch`] (via [`restore_command`], with the [`prefetch`]er), [`restore`],
//! [`verify`], [`find`], [`drill`], [`status`], [`info`] (`info`, `list`).

pub mod admin;
pub mod archive_command;
pub mod backup;
pub mod copy;
pub mod daemon;
pub mod drill;
pub mod expire;
pub mod extract;
pub mod fetch;
pub mod find;
pub mod info;
pub mod prefetch;
pub(crate) mod private_server;
pub mod push;
pub mod restore;
pub mod restore_command;
pub mod status;
pub mod verify;
