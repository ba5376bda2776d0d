//! Data to archive and a way to tell whether a restored cluster holds the same data: pgbench
//! plus a table of random payloads, and per-table row counts and checksums.

use std::fmt;

use anyhow::{Context, Result};
use rand::Rng;

use crate::cluster::Cluster;

/// How much work [`run`] does.
#[derive(Debug, Clone)]
pub struct Workload {
    /// `pgbench -i -s`.
    pub scale: u32,
    /// `pgbench -c`.
    pub clients: u32,
    /// `pgbench -t` (transactions per client).
    pub transactions: u32,
    /// Rows of 1–4 KiB random text inserted into `payload`.
    pub payload_rows: u32,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            scale: 3,
            clients: 2,
            transactions: 1500,
            payload_rows: 3000,
        }
    }
}

/// Tables [`fingerprints`] compares, with an order that makes their text form deterministic.
pub const CHECKED_TABLES: &[(&str, &str)] = &[
    ("pgbench_accounts", "aid"),
    ("pgbench_branches", "bid"),
    ("pgbench_tellers", "tid"),
    ("pgbench_history", "tid, bid, aid, delta, mtime, filler"),
    ("payload", "id"),
];

/// Create the `payload` table (before a base backup, so that replay covers both a table the
/// backup has and the pgbench tables it does not).
pub fn create_payload_table(cluster: &Cluster) -> Result<()> {
    cluster.execute("CREATE TABLE payload (id integer PRIMARY KEY, body text NOT NULL)")
}

/// Run the workload: `pgbench -i`, a pgbench run, then random payload rows (inserted in
/// batches, some updated and deleted, so replay sees inserts, TOAST, updates and deletes).
pub fn run(cluster: &Cluster, w: &Workload) -> Result<()> {
    cluster.pgbench(&["-i", "-s", &w.scale.to_string(), "-q"])?;
    cluster.pgbench(&[
        "-c",
        &w.clients.to_string(),
        "-j",
        &w.clients.to_string(),
        "-t",
        &w.transactions.to_string(),
    ])?;
    let mut rng = rand::rng();
    let batch = 500;
    let mut first = 1;
    while first <= w.payload_rows {
        let last = (first + batch - 1).min(w.payload_rows);
        // Each row: 32–128 md5 strings (1–4 KiB) whose inputs include a Rust-side salt, so two
        // runs never produce the same bytes. The subquery references `g`, so it runs once per row.
        let salt: u64 = rng.random();
        cluster.execute(&format!(
            "INSERT INTO payload (id, body)
             SELECT g, (SELECT string_agg(md5(random()::text || '{salt}' || g || ':' || i), '')
                        FROM generate_series(1, 32 + (random() * 96)::int) AS i)
             FROM generate_series({first}, {last}) AS g"
        ))?;
        first = last + 1;
    }
    cluster.execute(
        "UPDATE payload SET body = md5(body) || body WHERE id % 5 = 0;
         DELETE FROM payload WHERE id % 7 = 0;
         CHECKPOINT",
    )
}

/// What a table holds, condensed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFingerprint {
    pub table: String,
    pub rows: u64,
    /// md5 of all rows' text forms in a fixed order.
    pub md5: String,
}

impl fmt::Display for TableFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<18} {:>8} rows  md5 {}", self.table, self.rows, self.md5)
    }
}

/// Row count and checksum of every table in [`CHECKED_TABLES`].
pub fn fingerprints(cluster: &Cluster) -> Result<Vec<TableFingerprint>> {
    CHECKED_TABLES
        .iter()
        .map(|(table, order)| {
            let row = cluster.query_rows(&format!(
                "SELECT count(*)::text, coalesce(md5(string_agg(t::text, ',' ORDER BY {order})), '-')
                 FROM {table} t"
            ))?;
            let (rows, md5) = match row.as_slice() {
                [r] => (r[0].clone().unwrap_or_default(), r[1].clone().unwrap_or_default()),
                _ => anyhow::bail!("fingerprint of {table}: unexpected result {row:?}"),
            };
            Ok(TableFingerprint {
                table: table.to_string(),
                rows: rows
                    .parse()
                    .with_context(|| format!("row count of {table}: {rows:?}"))?,
                md5,
            })
        })
        .collect()
}
