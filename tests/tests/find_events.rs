//! `restore-agent find` against a real PostgreSQL: a mass DELETE, a TRUNCATE and a DROP TABLE,
//! each found at its commit time with its table's name, and each printed restore command run
//! as printed, recovering exactly the rows as they were just before the event. Tables created
//! after the backup, and dropped, are named from the `pg_class` rows the WAL carries (on the
//! oldest and newest PostgreSQL of the matrix too, whose `pg_class` rows differ in layout), and
//! every table gets its `extract` line.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use serde_json::Value;
use walvault_testkit::agents::RESTORE_AGENT;
use walvault_testkit::backup::take_backup;
use walvault_testkit::fixtures::{
    RECOVERY_TIMEOUT, archive_everything, archiving_cluster, archiving_cluster_on,
};
use walvault_testkit::host;
use walvault_testkit::pg::PgInstall;
use walvault_testkit::workload::{TableFingerprint, table_fingerprint};
use walvault_testkit::{Cluster, Repo, agents};

const TABLES: &[&str] = &["victim_delete", "victim_truncate", "victim_drop"];

/// Fingerprints of every victim table that exists.
fn state(cluster: &Cluster) -> Result<Vec<TableFingerprint>> {
    let mut out = Vec::new();
    for t in TABLES {
        let exists = cluster.query_one_string(&format!("SELECT (to_regclass('{t}') IS NOT NULL)::text"))?;
        if exists == "true" {
            out.push(table_fingerprint(cluster, t, "id")?);
        }
    }
    Ok(out)
}

/// What find must say of an event: (kind, object, rows).
type Expected<'a> = (&'a str, &'a str, Option<u64>);

/// A destructive transaction as the test saw it.
struct Event {
    xid: u32,
    /// Server clock just before and just after its commit (unix micros).
    before_us: i64,
    after_us: i64,
    /// The victims as they were just before it.
    before: Vec<TableFingerprint>,
}

fn now_us(client: &mut postgres::Client) -> Result<i64> {
    let row = client.query_one(
        "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint",
        &[],
    )?;
    Ok(row.get(0))
}

/// Run `sql` in one transaction and note its xid and commit time.
fn event(cluster: &Cluster, sql: &str) -> Result<Event> {
    let before = state(cluster)?;
    let mut client = cluster.connect()?;
    let mut tx = client.transaction()?;
    tx.batch_execute(sql)?;
    let xid: i64 = tx
        .query_one("SELECT (pg_current_xact_id()::text::bigint % 4294967296)", &[])?
        .get(0);
    let before_us: i64 = tx
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint",
            &[],
        )?
        .get(0);
    tx.commit()?;
    let after_us = now_us(&mut client)?;
    // Commit times well apart from the next event's.
    std::thread::sleep(Duration::from_millis(50));
    Ok(Event {
        xid: u32::try_from(xid)?,
        before_us,
        after_us,
        before,
    })
}

/// Tables created after the backup: `sales.orders_2026` in a schema created after it too, the
/// first `pg_class` insert after a checkpoint, which carries the page's full image; the next ones
/// carry only their rows.
const CREATED: &[&str] = &["sales.orders_2026", "public.orders_late"];

/// After the backup: the schema `sales`, then `CREATED` and `more` (tables in schemas created
/// before the backup), each with an index and a TOAST table, filled, then dropped together.
fn create_after_the_backup_and_drop(cluster: &Cluster, more: &[&str]) -> Result<Event> {
    cluster.execute("CREATE SCHEMA sales; CHECKPOINT")?;
    let tables: Vec<&str> = CREATED.iter().chain(more).copied().collect();
    for t in &tables {
        cluster.execute(&format!(
            "CREATE TABLE {t} (id integer PRIMARY KEY, body text NOT NULL);
             INSERT INTO {t} SELECT g, md5(g::text) FROM generate_series(1, 300) g"
        ))?;
    }
    event(cluster, &format!("DROP TABLE {}", tables.join(", ")))
}

/// Find names the tables `created` dropped (`CREATED` and `more`), created after the backup,
/// from the WAL, each once (its index and TOAST table folded into it), and prints an extract of
/// each.
fn check_created_after_the_backup(found: &Value, created: &Event, more: &[&str]) -> Result<()> {
    let e = event_with_xid(found, created.xid)?;
    let mut said = actions(e);
    said.sort();
    let tables: Vec<&str> = CREATED.iter().chain(more).copied().collect();
    let mut want: Vec<(String, String, Option<u64>)> = tables
        .iter()
        .map(|t| ("drop".to_string(), t.to_string(), None))
        .collect();
    want.sort();
    ensure!(
        said == want,
        "xid {}: {said:?}, want {want:?}\n{e:#}",
        created.xid
    );
    ensure!(
        e["actions"]
            .as_array()
            .context("actions")?
            .iter()
            .all(|a| a["named_from_wal"].is_string()),
        "{e:#}"
    );
    let extracts = e["extract_commands"].as_array().context("extract_commands")?;
    for t in tables {
        ensure!(
            extracts
                .iter()
                .any(|c| c.as_str().is_some_and(|c| c.contains(&format!("--table {t} ")))),
            "an extract of {t}: {e:#}"
        );
    }
    Ok(())
}

fn find(repo: &Repo, pgdata: &str, extra: &[&str]) -> Result<Value> {
    let mut args = vec!["find".to_string()];
    args.extend(repo.args());
    args.extend(["--json", "--pgdata", pgdata].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    let run = agents().run(RESTORE_AGENT, args).check()?;
    serde_json::from_str(&run.stdout).with_context(|| format!("find JSON: {}", run.stdout))
}

/// The xids of the events find listed, in its order.
fn xids(found: &Value) -> Vec<u64> {
    found["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["xid"].as_u64())
        .collect()
}

fn event_with_xid(found: &Value, xid: u32) -> Result<&Value> {
    found["events"]
        .as_array()
        .context("events")?
        .iter()
        .find(|e| e["xid"] == xid)
        .ok_or_else(|| anyhow!("find lists no event with xid {xid}: {found:#}"))
}

/// The event's actions as (kind, object, rows).
fn actions(e: &Value) -> Vec<(String, String, Option<u64>)> {
    e["actions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    (
                        x["kind"].as_str().unwrap_or_default().to_string(),
                        x["object"].as_str().unwrap_or_default().to_string(),
                        x["rows"].as_u64(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn find_names_a_mass_delete_a_truncate_and_a_drop_and_its_commands_restore_the_moment_before() -> Result<()> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("find-source", &repo, "")?;
    for t in TABLES {
        source.execute(&format!(
            "CREATE TABLE {t} (id integer PRIMARY KEY, body text NOT NULL);
             INSERT INTO {t} SELECT g, md5(g::text) FROM generate_series(1, 3000) g"
        ))?;
    }
    // A schema the backup's relation map knows, for a table created after it.
    source.execute("CREATE SCHEMA billing")?;
    take_backup(&source, &repo)?;
    let created = create_after_the_backup_and_drop(&source, &["billing.invoices"])?;

    let delete = event(&source, "DELETE FROM victim_delete WHERE id <= 2500")?;
    source.execute("INSERT INTO victim_drop SELECT g, 'late' FROM generate_series(3001, 3100) g")?;
    let truncate = event(&source, "TRUNCATE victim_truncate")?;
    source.execute("INSERT INTO victim_delete SELECT g, 'after' FROM generate_series(5001, 5050) g")?;
    let dropped = event(&source, "DROP TABLE victim_drop")?;
    source.execute("INSERT INTO victim_truncate SELECT g, 'refill' FROM generate_series(1, 10) g")?;
    archive_everything(&source)?;
    source.stop()?;

    let found = find(&repo, "PGDATA_PLACEHOLDER", &[])?;
    let listed = xids(&found);
    let order: Vec<u64> = [dropped.xid, truncate.xid, delete.xid].map(u64::from).to_vec();
    ensure!(
        listed
            .iter()
            .filter(|x| order.contains(x))
            .copied()
            .collect::<Vec<_>>()
            == order,
        "newest first: {listed:?}, expected {order:?} among them\n{found:#}"
    );

    let expectations: [(&Event, Expected); 3] = [
        (&delete, ("delete", "public.victim_delete", Some(2500))),
        (&truncate, ("truncate_or_rewrite", "public.victim_truncate", None)),
        (&dropped, ("drop", "public.victim_drop", None)),
    ];
    check_created_after_the_backup(&found, &created, &["billing.invoices"])?;
    for (ev, (kind, object, rows)) in &expectations {
        let e = event_with_xid(&found, ev.xid)?;
        let said = actions(e);
        ensure!(
            said.iter().any(|(k, o, r)| k == kind && o == object && r == rows),
            "xid {}: expected {kind} of {object} ({rows:?}), find said {said:?}",
            ev.xid
        );
        let t = e["time_us"].as_i64().context("time_us")?;
        ensure!(
            (ev.before_us..=ev.after_us).contains(&t),
            "xid {}: commit time {t} outside [{}, {}]",
            ev.xid,
            ev.before_us,
            ev.after_us
        );
        ensure!(e["restorable"] == true, "{e:#}");
        ensure!(e["database"] == "postgres", "{e:#}");
        let extract = format!(
            " --database postgres --table {object} --target-xid {} --target-exclusive --to {object}.dump",
            ev.xid
        );
        ensure!(
            e["extract_commands"]
                .as_array()
                .context("extract_commands")?
                .iter()
                .any(|c| c
                    .as_str()
                    .is_some_and(|c| c.ends_with(&extract) && c.contains(" extract --repo "))),
            "xid {}: an extract of {object} ending {extract:?}: {e:#}",
            ev.xid
        );
    }
    let truncate_notes = event_with_xid(&found, truncate.xid)?["notes"].to_string();
    ensure!(
        truncate_notes.contains("does not tell a TRUNCATE from a rewrite"),
        "find says plainly what it cannot tell: {truncate_notes}"
    );

    // What a DBA reads.
    let human = agents()
        .run(RESTORE_AGENT, ["find".to_string()].into_iter().chain(repo.args()))
        .check()?
        .stdout;
    println!("{human}");
    for line in [
        "DROP table public.victim_drop".to_string(),
        "TRUNCATE or rewrite (VACUUM FULL, CLUSTER, ALTER TABLE) table public.victim_truncate".into(),
        "DELETE of 2500 rows from table public.victim_delete".into(),
        format!(
            "--pgdata NEW_PGDATA --target-xid {} --target-exclusive",
            dropped.xid
        ),
        "DROP table sales.orders_2026".into(),
        "DROP table public.orders_late".into(),
        "named from the pg_class rows the WAL carries (created after backup".into(),
    ] {
        ensure!(human.contains(&line), "find's output must say {line:?}:\n{human}");
    }
    let (head, tail) = (
        format!(
            "    extract just before it:  {} extract --repo ",
            agents().restore_agent().display()
        ),
        format!(
            " --database postgres --table sales.orders_2026 --target-xid {} --target-exclusive --to sales.orders_2026.dump",
            created.xid
        ),
    );
    ensure!(
        human.lines().any(|l| l.starts_with(&head) && l.ends_with(&tail)),
        "find's output must have a line {head:?}...{tail:?}:\n{human}"
    );

    // Filters.
    let only = xids(&find(&repo, "X", &["--table", "victim_truncate"])?);
    ensure!(
        only == vec![u64::from(truncate.xid)],
        "--table victim_truncate: {only:?}"
    );
    let since = walvault::time::format_micros(truncate.after_us);
    let later = xids(&find(&repo, "X", &["--since", &since])?);
    ensure!(
        later == vec![u64::from(dropped.xid)],
        "--since {since}: {later:?}"
    );
    let refused = agents().run(
        RESTORE_AGENT,
        ["find".to_string()]
            .into_iter()
            .chain(repo.args())
            .chain(["--min-rows".into(), "10".into()]),
    );
    ensure!(
        refused.code() == Some(1) && refused.stderr.contains("--min-rows 10"),
        "a threshold below what the index records is refused: {refused}"
    );

    // Each printed command, run as printed, restores the moment before its event.
    for (ev, (kind, ..)) in &expectations {
        let mut restored = Cluster::uninitialized(&format!("find-{kind}"))?;
        let pgdata = restored.data_dir();
        let found = find(&repo, pgdata.to_str().context("utf-8")?, &[])?;
        let command = event_with_xid(&found, ev.xid)?["restore_command"]
            .as_str()
            .context("restore_command")?
            .to_string();
        ensure!(
            command.contains(&format!("--target-xid {} --target-exclusive", ev.xid)),
            "{command}"
        );
        let mut sh = host::pg_user_command("sh");
        sh.args(["-c", &command]);
        host::run(&mut sh, Duration::from_secs(300))?
            .check()
            .with_context(|| format!("the printed command: {command}"))?;
        restored.set_conf(&[("archive_mode", "off")])?;
        restored
            .start_and_wait_recovery_end(RECOVERY_TIMEOUT)
            .with_context(|| format!("recovery after {command}"))?;
        let got = state(&restored)?;
        ensure!(
            got == ev.before,
            "after `{command}` the victims must be as just before xid {} ({kind}):\n got {got:?}\n want {:?}",
            ev.xid,
            ev.before
        );
        restored.stop()?;
    }
    Ok(())
}

/// Tables created after the backup and dropped are named on the oldest and the newest
/// PostgreSQL of the matrix (18 moved `relkind` with `relallfrozen`).
#[test]
fn find_names_tables_created_after_the_backup_on_pg13_and_pg18() -> Result<()> {
    for major in [13, 18] {
        let pg = PgInstall::of_major(major)?;
        let repo = Repo::new()?;
        let mut source = archiving_cluster_on(pg, &format!("find-created-{major}"), &repo, "")?;
        take_backup(&source, &repo)?;
        let created = create_after_the_backup_and_drop(&source, &[])?;
        archive_everything(&source)?;
        source.stop()?;
        let found = find(&repo, "X", &[])?;
        check_created_after_the_backup(&found, &created, &[])
            .with_context(|| format!("PostgreSQL {major}"))?;
    }
    Ok(())
}

/// With `wal_compression` on, the `pg_class` row in the page's full image (the first insert
/// after a checkpoint) is read through each method's decompression.
#[test]
fn find_names_tables_whose_pg_class_rows_are_in_compressed_images() -> Result<()> {
    for method in ["pglz", "lz4", "zstd"] {
        let repo = Repo::new()?;
        let mut source = archiving_cluster(&format!("find-compressed-{method}"), &repo, "")?;
        source.execute(&format!("ALTER SYSTEM SET wal_compression = '{method}'"))?;
        source.execute("SELECT pg_reload_conf()")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while source.query_one_string("SHOW wal_compression")? != method {
            ensure!(std::time::Instant::now() < deadline, "wal_compression stays off");
            std::thread::sleep(Duration::from_millis(50));
        }
        take_backup(&source, &repo)?;
        let created = create_after_the_backup_and_drop(&source, &[])?;
        archive_everything(&source)?;
        source.stop()?;
        let found = find(&repo, "X", &[])?;
        check_created_after_the_backup(&found, &created, &[])
            .with_context(|| format!("wal_compression = {method}"))?;
    }
    Ok(())
}

/// The single text value `sql` returns in database `db` of `cluster`.
fn query_in(cluster: &Cluster, db: &str, sql: &str) -> Result<String> {
    let mut client = postgres::Config::new()
        .host("127.0.0.1")
        .port(cluster.port())
        .user("postgres")
        .dbname(db)
        .connect_timeout(Duration::from_secs(10))
        .connect(postgres::NoTls)
        .with_context(|| format!("connecting to database {db}"))?;
    let row = client
        .query_one(sql, &[])
        .with_context(|| format!("in {db}: {sql}"))?;
    Ok(row.get(0))
}

/// A `DROP DATABASE` comes with a restore of just that database, which, run as printed, brings
/// the database back with its rows as they were just before the drop: on PostgreSQL 15, and on
/// 13 and 18, whose `pg_database` rows differ in layout.
#[test]
fn a_dropped_database_gets_a_restore_of_its_own_that_brings_it_back() -> Result<()> {
    for major in [15, 13, 18] {
        drop_database_and_restore_it(PgInstall::of_major(major)?)
            .with_context(|| format!("PostgreSQL {major}"))?;
    }
    Ok(())
}

fn drop_database_and_restore_it(pg: &'static PgInstall) -> Result<()> {
    const ROWS: &str =
        "SELECT count(*)::text || ' ' || md5(string_agg(id::text || body, ',' ORDER BY id)) FROM orders";
    let repo = Repo::new()?;
    let mut source = archiving_cluster_on(pg, &format!("find-dropdb-{}", pg.major()), &repo, "")?;
    source.execute("CREATE DATABASE shop")?;
    let fill = "CREATE TABLE orders (id integer PRIMARY KEY, body text NOT NULL);
                INSERT INTO orders SELECT g, md5(g::text) FROM generate_series(1, 1000) g";
    postgres::Config::new()
        .host("127.0.0.1")
        .port(source.port())
        .user("postgres")
        .dbname("shop")
        .connect(postgres::NoTls)?
        .batch_execute(fill)?;
    take_backup(&source, &repo)?;
    let mut shop = postgres::Config::new()
        .host("127.0.0.1")
        .port(source.port())
        .user("postgres")
        .dbname("shop")
        .connect(postgres::NoTls)?;
    shop.batch_execute("INSERT INTO orders SELECT g, 'after the backup' FROM generate_series(1001, 1100) g")?;
    drop(shop);
    let before = query_in(&source, "shop", ROWS)?;
    source.execute("DROP DATABASE shop")?;
    archive_everything(&source)?;
    source.stop()?;

    let mut restored = Cluster::uninitialized_on(&format!("find-dropdb-restored-{}", pg.major()), pg)?;
    let pgdata = restored.data_dir();
    let found = find(&repo, pgdata.to_str().context("utf-8")?, &[])?;
    let e = found["events"]
        .as_array()
        .context("events")?
        .iter()
        .find(|e| {
            actions(e)
                .iter()
                .any(|(k, o, _)| k == "drop_database" && o == "shop")
        })
        .ok_or_else(|| anyhow!("find lists no DROP DATABASE shop: {found:#}"))?;
    let command = e["extract_commands"][0]
        .as_str()
        .context("a restore of just shop")?
        .to_string();
    // DROP DATABASE marks the database invalid and removes its files before it commits:
    // the restore stops before that began, not at the transaction.
    ensure!(
        command.contains(" restore --repo ")
            && command.contains(" --database shop --target-lsn ")
            && command.ends_with(" --target-exclusive"),
        "{command}"
    );
    let mut sh = host::pg_user_command("sh");
    sh.args(["-c", &command]);
    host::run(&mut sh, Duration::from_secs(300))?
        .check()
        .with_context(|| format!("the printed command: {command}"))?;
    restored.set_conf(&[("archive_mode", "off")])?;
    restored
        .start_and_wait_recovery_end(RECOVERY_TIMEOUT)
        .with_context(|| format!("recovery after {command}"))?;
    let got = query_in(&restored, "shop", ROWS).with_context(|| format!("after `{command}`: {e:#}"))?;
    ensure!(
        got == before,
        "after `{command}` shop holds {got}, it held {before} before the drop"
    );
    restored.stop()?;
    Ok(())
}
