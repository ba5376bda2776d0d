//! walvault-testkit: end-to-end tests against real PostgreSQL clusters.
//!
//! The harness runs throwaway clusters ([`cluster::Cluster`]) that archive through the real
//! `archive-agent` and restore through the real `restore-agent` ([`agents`]), into `file://`
//! repositories ([`repo::Repo`]) in a scratch directory, in a real S3 server
//! ([`garage::Garage`]) or in Azure's emulator ([`azurite::Azurite`]), as `WALVAULT_TEST_STORE`
//! says, and compares what a user would compare: the rows.
//!
//! Build the agents before running the tests, with the same profile:
//! `cargo build --workspace --bins && cargo test -p walvault-testkit`.

pub mod agents;
pub mod azurite;
pub mod backup;
pub mod cluster;
pub mod copy;
pub mod daemon;
pub mod dirwatch;
pub mod faultproxy;
pub mod fixtures;
pub mod garage;
pub mod host;
pub mod object;
pub mod pg;
pub mod repo;
pub mod workload;

pub use agents::agents;
pub use cluster::{Cluster, InitOptions};
pub use repo::Repo;
