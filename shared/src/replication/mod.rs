//! WAL over PostgreSQL's streaming replication protocol: the pieces `archive-agent daemon
//! --stream` (`commands::daemon::stream`) is built from.
//!
//! The daemon connects as a replica would (see [`conninfo`] for how the connection string is
//! read, [`source`] for the connection), keeps a physical replication slot so the server holds
//! the WAL while the daemon is down, and stores what it receives: whole segments exactly as
//! `archive-agent push` stores them, and the segment still being received in pieces at most
//! every `--stream-flush` ([`pieces`]), which fetch serves at the end of the archive. The
//! flush position it reports is the end of what the repository holds, never more; with
//! `--synchronous` it is reported as soon as it moves, so a primary that names the daemon in
//! `synchronous_standby_names` acknowledges a commit only once it is in the repository.
//! `archive-agent backup --pg-url` without a data directory runs `BASE_BACKUP` on the same kind
//! of connection and reads its tar archives as they stream ([`backup_stream`], [`tar`]).
//! docs/STREAMING.md has the design and its sources (`pg_receivewal`, Barman).

pub mod assembler;
pub mod backup_stream;
pub mod conninfo;
pub mod pieces;
pub mod source;
pub mod tar;
