//! `restore-agent restore --database NAME`: a partial restore. The catalogs, the system databases
//! and the named database are restored; every other database's relation files are created zeroed,
//! at their size, without fetching their chunks. Recovery replays as usual, and the named
//! database is exactly as it was at the target, while far fewer bytes were fetched than by a full
//! restore. A name the backup does not know is refused with nothing written.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use serde_json::Value;
use walvault_testkit::Repo;
use walvault_testkit::agents::exit;
use walvault_testkit::backup::{self, BackupSummary, Restore, restore_new_cluster, take_backup};
use walvault_testkit::fixtures::{RECOVERY_TIMEOUT, archive_everything, archiving_cluster};
use walvault_testkit::host::{Finished, ScratchDir};

/// The restore point the restores target: after the backup, before `orders` is dropped.
const TARGET: &str = "before_orders_dropped";

/// The database restored, and the one left out.
const SHOP: &str = "shop";
const ANALYTICS: &str = "analytics";

/// `orders`' contents: its row count and the md5 of its rows in id order.
const ORDERS_FINGERPRINT: &str = "SELECT count(*)::text || ' rows, md5 ' || \
     coalesce(md5(string_agg(t::text, ',' ORDER BY id)), '-') FROM orders t";

/// A repository with one backup of a cluster holding `shop` (about 8 MB of orders) and
/// `analytics` (about 50 MB of events), and the archive past the backup to the restore point
/// [`TARGET`] and beyond.
struct Backed {
    repo: Repo,
    backup: BackupSummary,
    /// [`ORDERS_FINGERPRINT`] at [`TARGET`].
    orders_at_target: String,
    shop_oid: String,
    analytics_oid: String,
}

fn backed_up() -> &'static Backed {
    static BACKED: OnceLock<Backed> = OnceLock::new();
    BACKED.get_or_init(|| make_backed().unwrap_or_else(|e| panic!("{e:#}")))
}

fn make_backed() -> Result<Backed> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("db-source", &repo, "")?;
    // One statement each: CREATE DATABASE runs outside any transaction block.
    source.execute(&format!("CREATE DATABASE {SHOP}"))?;
    source.execute(&format!("CREATE DATABASE {ANALYTICS}"))?;
    // About 8 MB of orders; rows of ~340 bytes stay in the heap (no TOAST, no compression).
    source.execute_in(
        SHOP,
        "CREATE TABLE orders (id integer PRIMARY KEY, customer integer NOT NULL, note text NOT NULL);
         INSERT INTO orders
         SELECT g, g % 97, rpad(md5(g::text), 300, md5((g * 7)::text)) FROM generate_series(1, 20000) g",
    )?;
    // About six times as much in analytics: the data a partial restore must not fetch.
    source.execute_in(
        ANALYTICS,
        "CREATE TABLE events (id bigint PRIMARY KEY, kind integer NOT NULL, payload text NOT NULL);
         INSERT INTO events
         SELECT g, g % 13, rpad(md5(g::text), 400, md5((g * 3)::text)) FROM generate_series(1, 110000) g",
    )?;
    source.execute("CHECKPOINT")?;
    let oid_of = |db: &str| {
        source.query_one_string(&format!(
            "SELECT oid::text FROM pg_database WHERE datname = '{db}'"
        ))
    };
    let (shop_oid, analytics_oid) = (oid_of(SHOP)?, oid_of(ANALYTICS)?);
    let backup = take_backup(&source, &repo)?;

    // Past the backup, to the target: orders changed, analytics written.
    source.execute_in(
        SHOP,
        "UPDATE orders SET note = 'changed ' || id, customer = customer + 1 WHERE id % 10 = 0;
         INSERT INTO orders SELECT g, g % 97, 'after the backup ' || g FROM generate_series(20001, 21000) g;
         DELETE FROM orders WHERE id % 97 = 0",
    )?;
    source.execute_in(
        ANALYTICS,
        "INSERT INTO events SELECT g, 99, md5(g::text) FROM generate_series(110001, 115000) g;
         UPDATE events SET kind = kind + 100 WHERE id % 50 = 0",
    )?;
    let orders_at_target = source.query_in(SHOP, ORDERS_FINGERPRINT)?;
    source.execute(&format!("SELECT pg_create_restore_point('{TARGET}')"))?;

    // Past the target: must not be replayed.
    source.execute_in(SHOP, "DROP TABLE orders")?;
    source.execute_in(
        ANALYTICS,
        "DELETE FROM events WHERE id % 3 = 0;
         INSERT INTO events SELECT g, 7, md5(g::text) FROM generate_series(115001, 118000) g",
    )?;
    archive_everything(&source)?;
    source.stop()?;
    eprintln!(
        "backup {} (stop {}); shop is oid {shop_oid}, analytics oid {analytics_oid}; orders at \
         {TARGET}: {orders_at_target}",
        backup.id, backup.stop_lsn
    );
    Ok(Backed {
        repo,
        backup,
        orders_at_target,
        shop_oid,
        analytics_oid,
    })
}

fn json(run: &Finished) -> Result<Value> {
    serde_json::from_str(&run.stdout).with_context(|| format!("restore --json printed no JSON:\n{run}"))
}

/// `chunks_fetched` and `bytes_fetched` of a restore's JSON report.
fn fetched(report: &Value) -> Result<(u64, u64)> {
    let num = |k: &str| {
        report[k]
            .as_u64()
            .ok_or_else(|| anyhow!("the restore's report has no number {k:?}: {report:#}"))
    };
    Ok((num("chunks_fetched")?, num("bytes_fetched")?))
}

/// The `fetched N distinct chunks (B bytes)` line of a restore's text report, as `(N, B)`.
fn fetched_line(run: &Finished) -> Result<(u64, u64)> {
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("fetched "))
        .ok_or_else(|| anyhow!("no `fetched ... distinct chunks` line:\n{run}"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["fetched", chunks, "distinct", "chunks", bytes, "bytes),", ..] => Ok((
            chunks.parse().with_context(|| line.to_string())?,
            bytes
                .trim_start_matches('(')
                .parse()
                .with_context(|| line.to_string())?,
        )),
        _ => Err(anyhow!("unexpected line {line:?}:\n{run}")),
    }
}

/// Whether a file name in a database directory is a relation file: `<relfilenode>[_fork][.N]`.
fn is_relation_file(name: &str) -> bool {
    let base = name.split('.').next().unwrap_or_default();
    let node = ["_fsm", "_vm", "_init"]
        .iter()
        .find_map(|f| base.strip_suffix(f))
        .unwrap_or(base);
    !node.is_empty()
        && node.bytes().all(|b| b.is_ascii_digit())
        && name[base.len()..]
            .strip_prefix('.')
            .is_none_or(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The relation files of a database directory, with their sizes.
fn relation_files(dir: &Path) -> Result<Vec<(String, u64)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_relation_file(&name) {
            files.push((name, entry.metadata()?.len()));
        }
    }
    files.sort();
    Ok(files)
}

/// Whether the file at `path` holds nothing but zero bytes.
fn all_zeroes(path: &Path) -> Result<bool> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
}

#[test]
fn database_restore_fetches_only_the_named_database_and_recovers_it() -> Result<()> {
    let b = backed_up();

    // A full restore to the target: what every database costs.
    let (full, run) = restore_new_cluster(
        &b.repo,
        "db-full",
        Restore::with(&["--target-name", TARGET, "--json"]),
    )?;
    let (full_chunks, full_bytes) = fetched(&json(&run)?)?;

    // Only shop (besides the catalogs and the system databases).
    let (mut partial, run) = restore_new_cluster(
        &b.repo,
        "db-shop",
        Restore::with(&["--target-name", TARGET, "--database", SHOP, "--json"]),
    )?;
    let report = json(&run)?;
    let (chunks, bytes) = fetched(&report)?;
    eprintln!(
        "full restore: {full_chunks} chunks, {full_bytes} bytes; --database {SHOP}: {chunks} chunks, \
         {bytes} bytes ({:.2} of the full restore's bytes)",
        bytes as f64 / full_bytes as f64
    );
    assert_eq!(report["backup"], b.backup.id.as_str(), "{report:#}");
    assert!(
        bytes * 2 < full_bytes,
        "--database {SHOP} must fetch well under half the bytes of a full restore ({full_bytes}), \
         it fetched {bytes}:\n{run}"
    );
    assert!(
        chunks < full_chunks,
        "{chunks} chunks, the full restore {full_chunks}"
    );
    // The plan names what is restored and what is left zeroed.
    let names = |list: &str| -> Vec<String> {
        report["plan"]["databases"][list]
            .as_array()
            .map(|dbs| {
                dbs.iter()
                    .filter_map(|d| d["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(names("zeroed"), [ANALYTICS], "{:#}", report["plan"]["databases"]);
    for db in ["postgres", "template0", "template1", SHOP] {
        assert!(
            names("restored").iter().any(|n| n == db),
            "{db} must be restored: {:#}",
            report["plan"]["databases"]
        );
    }

    // Both restores hold the same relation files, of the same sizes: analytics' all zeroes,
    // shop's as the full restore wrote them.
    for (db, oid) in [(ANALYTICS, &b.analytics_oid), (SHOP, &b.shop_oid)] {
        let rel = format!("base/{oid}");
        let (full_dir, partial_dir) = (full.data_dir().join(&rel), partial.data_dir().join(&rel));
        let in_full = relation_files(&full_dir)?;
        assert!(
            in_full.len() > 100,
            "{db}: {rel} of the full restore: {in_full:?}"
        );
        assert_eq!(
            relation_files(&partial_dir)?,
            in_full,
            "{db}: {rel} must hold the same relation files, of the same sizes, as a full restore"
        );
        for (name, _) in &in_full {
            let path = partial_dir.join(name);
            if db == ANALYTICS {
                assert!(
                    all_zeroes(&path)?,
                    "{db} is left out, yet {rel}/{name} holds data"
                );
            } else {
                assert!(
                    fs::read(&path)? == fs::read(full_dir.join(name))?,
                    "{db} is restored, yet {rel}/{name} differs from the full restore's"
                );
            }
        }
    }
    drop(full);

    // Recovery replays to the target: shop's orders as they were then.
    partial
        .start_and_wait_recovery_end(RECOVERY_TIMEOUT)
        .with_context(|| format!("recovery of the --database {SHOP} restore:\n{run}"))?;
    assert_eq!(
        partial.query_in(SHOP, ORDERS_FINGERPRINT)?,
        b.orders_at_target,
        "{SHOP}.orders after recovery to {TARGET}\n{}",
        partial.log_tail()
    );
    assert_eq!(
        partial.query_one_string("SELECT count(*)::text FROM pg_database WHERE datname = 'postgres'")?,
        "1"
    );
    // The database left out is dropped, as the DBA is told to; the cluster goes on.
    partial.execute(&format!("DROP DATABASE {ANALYTICS}"))?;
    assert_eq!(
        partial.query_one_string("SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database")?,
        format!("postgres,{SHOP},template0,template1")
    );
    partial.execute_in(
        SHOP,
        "INSERT INTO orders SELECT g, 1, 'after recovery' FROM generate_series(900001, 900010) g",
    )?;
    partial.stop()?;

    // The same selection by oid, as text: the same chunks, reported on the text line.
    let scratch = ScratchDir::new("db-by-oid")?;
    let pgdata = scratch.path().join("data");
    let text = backup::restore(
        &b.repo,
        &pgdata,
        &["--target-name", TARGET, "--database", &b.shop_oid],
    )?
    .check()
    .with_context(|| format!("restore --database {} (shop's oid)", b.shop_oid))?;
    assert_eq!(
        fetched_line(&text)?,
        (chunks, bytes),
        "--database {} (shop's oid) must fetch what --database {SHOP} fetched",
        b.shop_oid
    );
    Ok(())
}

#[test]
fn database_restore_refuses_a_database_the_backup_does_not_have() -> Result<()> {
    let b = backed_up();
    let scratch = ScratchDir::new("db-refused")?;
    let pgdata = scratch.path().join("data");

    let run = backup::restore(&b.repo, &pgdata, &["--database", "nosuchdb"])?;
    run.assert_failed_naming(&["nosuchdb", SHOP, ANALYTICS]);
    let errors: Vec<&str> = run.stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one error line: {run}");
    for named in ["nosuchdb", SHOP, ANALYTICS, "postgres"] {
        assert!(
            errors[0].contains(named),
            "the error line names {named:?} (the database asked for, and those the backup has): {run}"
        );
    }
    assert!(
        !pgdata.exists(),
        "a refused restore must not create --pgdata: {run}"
    );

    // A partial restore over an existing directory is not offered.
    let run = backup::restore(&b.repo, &pgdata, &["--database", SHOP, "--delta"])?;
    run.assert_code(exit::USAGE);
    assert!(
        run.stderr.contains("--delta") && run.stderr.contains("--database"),
        "{run}"
    );
    assert!(
        !pgdata.exists(),
        "a refused restore must not create --pgdata: {run}"
    );
    Ok(())
}
