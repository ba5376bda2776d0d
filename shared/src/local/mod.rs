//! Files this host keeps beside PostgreSQL, never in the repository: crash-safe writes
//! ([`crashsafe`]), leases naming a live holder ([`lease`]), the daemon-to-push handoff of
//! archived markers ([`handoff`]) and what a data directory says about its server ([`pgdata`]).

pub mod crashsafe;
pub mod handoff;
pub mod lease;
pub mod pgdata;
