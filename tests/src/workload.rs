//! Data to archive and a way to tell whether a restored cluster holds the same data: pgbench
//! plus a table of random payloads, and per-table row counts and checksums.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
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
    let batch = 500;
    let mut first = 1;
    while first <= w.payload_rows {
        let last = (first + batch - 1).min(w.payload_rows);
        insert_payload(cluster, first, last)?;
        first = last + 1;
    }
    cluster.execute(
        "UPDATE payload SET body = md5(body) || body WHERE id % 5 = 0;
         DELETE FROM payload WHERE id % 7 = 0;
         CHECKPOINT",
    )
}

/// Insert `payload` rows `first..=last` of 1–4 KiB random text, in one statement.
pub fn insert_payload(cluster: &Cluster, first: u32, last: u32) -> Result<()> {
    // Each row: 32–128 md5 strings whose inputs include a Rust-side salt, so two runs never
    // produce the same bytes. The subquery references `g`, so it runs once per row.
    let salt: u64 = rand::rng().random();
    cluster.execute(&format!(
        "INSERT INTO payload (id, body)
         SELECT g, (SELECT string_agg(md5(random()::text || '{salt}' || g || ':' || i), '')
                    FROM generate_series(1, 32 + (random() * 96)::int) AS i)
         FROM generate_series({first}, {last}) AS g"
    ))
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
    fingerprints_of(cluster, CHECKED_TABLES)
}

/// [`table_fingerprint`] of each `(table, order)`, in that order.
pub fn fingerprints_of(cluster: &Cluster, tables: &[(&str, &str)]) -> Result<Vec<TableFingerprint>> {
    tables
        .iter()
        .map(|(table, order)| table_fingerprint(cluster, table, order))
        .collect()
}

/// Row count and checksum of one table, its rows taken in `order` (an `ORDER BY` list).
pub fn table_fingerprint(cluster: &Cluster, table: &str, order: &str) -> Result<TableFingerprint> {
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
}

/// The table [`Ledger`] changes: small rows, so its whole contents can be checksummed after every
/// transaction.
pub const LEDGER_TABLE: &str = "ledger";

/// Row count and checksum of the ledger table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerContents {
    pub rows: u64,
    /// md5 of all rows' text forms in id order (`-` when empty).
    pub md5: String,
}

/// The ledger as it was just after one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerState {
    /// `clock_timestamp()` after the commit returned, in UTC: `YYYY-MM-DD HH:MM:SS.ffffff+00`,
    /// the form `--target-time` takes. The next transaction commits later.
    pub time: String,
    /// The same instant in Unix microseconds.
    pub unix_micros: i64,
    /// `pg_current_wal_insert_lsn()` after the commit: every record of this transaction and of
    /// those before it ends at or before it, every record of the next one starts at or after it.
    pub lsn: u64,
    pub contents: LedgerContents,
}

/// One ledger transaction, committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerCommit {
    /// Its transaction id (`txid_current()`), the form `--target-xid` takes.
    pub xid: u64,
    /// The state its commit left.
    pub state: LedgerState,
}

const LEDGER_CONTENTS_SQL: &str = "(SELECT count(*) FROM ledger)::text, \
     (SELECT coalesce(md5(string_agg(l::text, ',' ORDER BY id)), '-') FROM ledger l)";

/// Create the ledger table.
pub fn create_ledger(cluster: &Cluster) -> Result<()> {
    cluster.execute(
        "CREATE TABLE ledger (id bigserial PRIMARY KEY, account integer NOT NULL, \
         amount bigint NOT NULL, memo text NOT NULL)",
    )
}

/// What the ledger table of `cluster` holds now.
pub fn ledger_contents(cluster: &Cluster) -> Result<LedgerContents> {
    let rows = cluster.query_rows(&format!("SELECT {LEDGER_CONTENTS_SQL}"))?;
    match rows.as_slice() {
        [r] => Ok(LedgerContents {
            rows: r[0]
                .as_deref()
                .unwrap_or_default()
                .parse()
                .context("ledger row count")?,
            md5: r[1].clone().unwrap_or_default(),
        }),
        _ => anyhow::bail!("ledger contents: unexpected result {rows:?}"),
    }
}

/// A stream of small transactions on the ledger table (inserts, updates, deletes, each its own
/// transaction), over one connection of its own, recording the state after each commit.
pub struct Ledger {
    client: postgres::Client,
    rng: rand::rngs::StdRng,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger").finish_non_exhaustive()
    }
}

impl Ledger {
    pub fn connect(cluster: &Cluster) -> Result<Ledger> {
        use rand::SeedableRng;
        Ok(Ledger {
            client: cluster.connect()?,
            rng: rand::rngs::StdRng::seed_from_u64(rand::random()),
        })
    }

    /// Commit one transaction, then record the state it left.
    pub fn step(&mut self) -> Result<LedgerState> {
        Ok(self.commit()?.state)
    }

    /// Commit one transaction, then record its id and the state it left. Every transaction
    /// takes an id, even an `UPDATE` that matches no row, so each one writes a commit record a
    /// recovery target can name.
    pub fn commit(&mut self) -> Result<LedgerCommit> {
        let account = self.rng.random_range(0..20);
        let amount: i64 = self.rng.random_range(-10_000..10_000);
        let sql = match self.rng.random_range(0..100) {
            0..55 => {
                let rows = self.rng.random_range(1..=3);
                format!(
                    "INSERT INTO ledger (account, amount, memo) \
                     SELECT {account}, {amount} + g, md5(random()::text) FROM generate_series(1, {rows}) g"
                )
            }
            55..80 => format!(
                "UPDATE ledger SET amount = amount + {amount}, memo = md5(memo) WHERE account = {account}"
            ),
            80..90 => format!(
                "UPDATE ledger SET amount = amount - {amount} WHERE account = {account};
                 INSERT INTO ledger (account, amount, memo) VALUES ({}, {amount}, 'transfer')",
                (account + 1) % 20
            ),
            _ => format!("DELETE FROM ledger WHERE account = {account} AND id % 3 = 0"),
        };
        let replies = self
            .client
            .simple_query(&format!("BEGIN; {sql}; SELECT txid_current()::text; COMMIT"))
            .with_context(|| format!("ledger transaction: {sql}"))?;
        let xid = replies
            .iter()
            .find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => r.get(0),
                _ => None,
            })
            .context("txid_current() returned no row")?
            .parse()
            .context("ledger transaction id")?;
        Ok(LedgerCommit {
            xid,
            state: self.state()?,
        })
    }

    /// The state now (with no transaction of ours in flight: the last commit's).
    pub fn state(&mut self) -> Result<LedgerState> {
        let sql = format!(
            "WITH now AS (SELECT clock_timestamp() AS t)
             SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00',
                    (extract(epoch FROM t) * 1000000)::bigint::text,
                    pg_current_wal_insert_lsn()::text,
                    {LEDGER_CONTENTS_SQL}
             FROM now"
        );
        let rows = self
            .client
            .simple_query(&sql)
            .context("recording the ledger state")?;
        let row = rows
            .iter()
            .find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .context("the ledger state query returned no row")?;
        let col = |i: usize| row.get(i).map(str::to_string).unwrap_or_default();
        Ok(LedgerState {
            time: col(0),
            unix_micros: col(1).parse().context("ledger state time")?,
            lsn: parse_lsn(&col(2))?,
            contents: LedgerContents {
                rows: col(3).parse().context("ledger row count")?,
                md5: col(4),
            },
        })
    }
}

/// Commit ledger transactions on `cluster`, `between` apart, for as long as `during` runs, as
/// on a live server; returns every state recorded and what `during` returned.
pub fn ledger_while<T>(
    cluster: &Cluster,
    between: Duration,
    during: impl FnOnce() -> Result<T>,
) -> Result<(Vec<LedgerState>, T)> {
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let writer = s.spawn(|| -> Result<Vec<LedgerState>> {
            let mut ledger = Ledger::connect(cluster)?;
            let mut states = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                states.push(ledger.step()?);
                thread::sleep(between);
            }
            Ok(states)
        });
        let result = during();
        stop.store(true, Ordering::Relaxed);
        let states = writer
            .join()
            .map_err(|_| anyhow!("the ledger writer panicked"))??;
        Ok((states, result?))
    })
}

/// A number as PostgreSQL writes an LSN (`X/Y`), the form `--target-lsn` takes.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// `X/Y` (PostgreSQL's LSN text form) as a number.
pub fn parse_lsn(text: &str) -> Result<u64> {
    let (hi, lo) = text
        .split_once('/')
        .with_context(|| format!("{text:?} is not an LSN"))?;
    let hi = u64::from_str_radix(hi, 16).with_context(|| format!("{text:?} is not an LSN"))?;
    let lo = u64::from_str_radix(lo, 16).with_context(|| format!("{text:?} is not an LSN"))?;
    Ok(hi << 32 | lo)
}
