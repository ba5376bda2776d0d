//! walvault's WAL decoder against PostgreSQL's own reader: the segments a real cluster archives,
//! decoded by `walvault::wal` and by `pg_waldump`, must agree record for record, and the
//! per-segment summaries (with carries) must count every commit, abort and restore point once.
//!
//! The cluster uses 1 MiB segments so that an ordinary workload spans many of them, including a
//! logical message longer than two segments, full-page images (plain and compressed),
//! two-phase commits, subtransactions, replication origins and WAL switches.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail, ensure};
use walvault::wal::decode::{RM_XACT_ID, RM_XLOG_ID, RecordKind, WalDecoder, WalRecord};
use walvault::wal::pgtime::PgTime;
use walvault::wal::summary::{Carry, SegmentSummary, summarize_segment};
use walvault::wal::{Lsn, SegmentName, WalFileName};
use walvault_testkit::host::{self, ScratchDir, pg_bin};
use walvault_testkit::{Cluster, InitOptions};

const ARCHIVE_WAIT: Duration = Duration::from_secs(120);
const WALDUMP_LIMIT: Duration = Duration::from_secs(300);

/// Resource manager names as `pg_waldump` prints them, by id (`rmgrlist.h`, 13 to 17).
const RMGR_NAMES: [&str; 22] = [
    "XLOG",
    "Transaction",
    "Storage",
    "CLOG",
    "Database",
    "Tablespace",
    "MultiXact",
    "RelMap",
    "Standby",
    "Heap2",
    "Heap",
    "Btree",
    "Hash",
    "Gin",
    "Gist",
    "Sequence",
    "SPGist",
    "BRIN",
    "CommitTs",
    "ReplicationOrigin",
    "Generic",
    "LogicalMessage",
];

/// Restore point names the workload creates, in order (one is as long as PostgreSQL allows).
fn restore_point_names() -> Vec<String> {
    vec![
        "rp-start".to_string(),
        "rp with spaces, and ünïcode".to_string(),
        "r".repeat(63),
        "rp-end".to_string(),
    ]
}

/// What a `pg_waldump` line says about one record.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dumped {
    lsn: Lsn,
    prev: Lsn,
    xid: u32,
    rmid: u8,
    total_len: u32,
    desc: String,
}

/// The same facts, from our decoder.
fn as_dumped(r: &WalRecord) -> (Lsn, Lsn, u32, u8, u32) {
    (r.lsn, r.prev, r.xid, r.rmid, r.total_len)
}

/// Parse `rmgr: Transaction len (rec/tot):     34/    34, tx:        735, lsn: 0/01000110,
/// prev 0/010000D8, desc: COMMIT 2024-05-01 10:00:00.123456 UTC`.
fn parse_waldump_line(line: &str) -> Result<Dumped> {
    let bad = || anyhow!("unexpected pg_waldump line: {line}");
    let rest = line.strip_prefix("rmgr: ").ok_or_else(bad)?;
    let (rmgr, rest) = rest.split_once(" len (rec/tot):").ok_or_else(bad)?;
    let (lens, rest) = rest.split_once(", tx:").ok_or_else(bad)?;
    let (xid, rest) = rest.split_once(", lsn:").ok_or_else(bad)?;
    let (lsn, rest) = rest.split_once(", prev ").ok_or_else(bad)?;
    let (prev, desc) = rest.split_once(", desc: ").ok_or_else(bad)?;
    let rmid = RMGR_NAMES
        .iter()
        .position(|n| *n == rmgr.trim())
        .ok_or_else(|| anyhow!("unknown resource manager {rmgr:?} in: {line}"))?;
    Ok(Dumped {
        lsn: lsn.trim().parse()?,
        prev: prev.trim().parse()?,
        xid: xid.trim().parse()?,
        rmid: rmid as u8,
        total_len: lens.split('/').nth(1).ok_or_else(bad)?.trim().parse()?,
        desc: desc.to_string(),
    })
}

/// The transaction end a `pg_waldump` description shows: `COMMIT <time>`, `ABORT <time>`,
/// `COMMIT_PREPARED <xid>: <time>`, `ABORT_PREPARED <xid>: <time>`, each maybe followed by `; ...`.
fn waldump_xact(desc: &str) -> Result<Option<(&'static str, PgTime)>> {
    let (op, rest) = desc.split_once(' ').unwrap_or((desc, ""));
    let (kind, time) = match op {
        "COMMIT" => ("commit", rest),
        "ABORT" => ("abort", rest),
        "COMMIT_PREPARED" => ("commit prepared", rest.split_once(": ").map_or("", |p| p.1)),
        "ABORT_PREPARED" => ("abort prepared", rest.split_once(": ").map_or("", |p| p.1)),
        _ => return Ok(None),
    };
    let time = time.split(';').next().unwrap_or_default().trim();
    let time = time
        .parse()
        .with_context(|| format!("timestamp of pg_waldump description {desc:?}"))?;
    Ok(Some((kind, time)))
}

fn our_xact(kind: &RecordKind) -> Option<(&'static str, PgTime)> {
    match kind {
        RecordKind::Commit { time } => Some(("commit", *time)),
        RecordKind::Abort { time } => Some(("abort", *time)),
        RecordKind::CommitPrepared { time } => Some(("commit prepared", *time)),
        RecordKind::AbortPrepared { time } => Some(("abort prepared", *time)),
        _ => None,
    }
}

/// Many small commits, aborts, two-phase commits, subtransactions, restore points, records
/// spanning pages and segments, FPIs (compressed or not), concurrent pgbench clients and
/// WAL switches.
fn workload(cluster: &Cluster, phase: u32) -> Result<()> {
    let names = restore_point_names();
    let mut db = cluster.connect()?;
    let run = |db: &mut postgres::Client, sql: &str| {
        db.batch_execute(sql)
            .with_context(|| format!("workload phase {phase}: {sql}"))
    };
    let base = phase * 1_000_000;
    if phase == 1 {
        run(&mut db, "CREATE TABLE t (id int PRIMARY KEY, v text)")?;
        run(
            &mut db,
            &format!("SELECT pg_create_restore_point('{}')", names[0]),
        )?;
    }
    for i in 0..200 {
        run(&mut db, &format!("INSERT INTO t VALUES ({}, 'c')", base + i))?;
    }
    for i in 0..30 {
        run(
            &mut db,
            &format!("BEGIN; INSERT INTO t VALUES ({}, 'a'); ROLLBACK", base + 500 + i),
        )?;
    }
    for i in 0..5 {
        let gid = format!("p{phase}-{i}");
        // COMMIT / ROLLBACK PREPARED refuse to run in a multi-statement string.
        run(
            &mut db,
            &format!(
                "BEGIN; INSERT INTO t VALUES ({}, 'p'); PREPARE TRANSACTION '{gid}'",
                base + 600 + i
            ),
        )?;
        run(&mut db, &format!("COMMIT PREPARED '{gid}'"))?;
        run(
            &mut db,
            &format!(
                "BEGIN; INSERT INTO t VALUES ({}, 'q'); PREPARE TRANSACTION '{gid}r'",
                base + 700 + i
            ),
        )?;
        run(&mut db, &format!("ROLLBACK PREPARED '{gid}r'"))?;
    }
    // Subtransactions: a few savepoints, then more than PGPROC_MAX_CACHED_SUBXIDS (64), which
    // makes XLOG_XACT_ASSIGNMENT records (and, at wal_level=logical, top-level xid blocks).
    run(
        &mut db,
        &format!(
            "BEGIN; INSERT INTO t VALUES ({b}, 's'); SAVEPOINT a; INSERT INTO t VALUES ({b1}, 's'); \
             ROLLBACK TO a; INSERT INTO t VALUES ({b2}, 's'); COMMIT",
            b = base + 800,
            b1 = base + 801,
            b2 = base + 802
        ),
    )?;
    run(
        &mut db,
        &format!(
            "DO $$ BEGIN FOR i IN 1..100 LOOP BEGIN INSERT INTO t VALUES ({} + i, 'x'); \
             EXCEPTION WHEN others THEN NULL; END; END LOOP; END $$",
            base + 900
        ),
    )?;
    // One record over many pages, and one over more than two 1 MiB segments.
    run(
        &mut db,
        "SELECT pg_logical_emit_message(false, 'walvault', repeat('m', 100000))",
    )?;
    run(
        &mut db,
        "SELECT pg_logical_emit_message(true, 'walvault', repeat('n', 2500000))",
    )?;
    // Full-page images after a checkpoint, then compressed ones (with holes).
    run(&mut db, "CHECKPOINT; UPDATE t SET v = v || 'u'")?;
    run(&mut db, "ALTER SYSTEM SET wal_compression = 'pglz'")?;
    run(&mut db, "SELECT pg_reload_conf()")?;
    std::thread::sleep(Duration::from_millis(300));
    run(&mut db, "CHECKPOINT; UPDATE t SET v = v || 'z'")?;
    run(&mut db, "ALTER SYSTEM RESET wal_compression")?;
    run(&mut db, "SELECT pg_reload_conf()")?;
    run(
        &mut db,
        &format!("SELECT pg_create_restore_point('{}')", names[phase as usize]),
    )?;
    if phase == 2 {
        // Commits carrying a replication origin (XLR_BLOCK_ID_ORIGIN).
        run(
            &mut db,
            "SELECT pg_replication_origin_create('walvault_test'); \
             SELECT pg_replication_origin_session_setup('walvault_test')",
        )?;
        for i in 0..20 {
            run(
                &mut db,
                &format!("INSERT INTO t VALUES ({}, 'o')", base + 1100 + i),
            )?;
        }
        run(&mut db, "SELECT pg_replication_origin_session_reset()")?;
    }
    run(&mut db, "SELECT pg_switch_wal()")?;
    // Concurrent clients: commit times need not follow WAL order.
    if phase == 1 {
        cluster.pgbench(&["-i", "-s", "1", "-q"])?;
    }
    cluster.pgbench(&["-c", "2", "-j", "2", "-t", "300"])?;
    Ok(())
}

/// Archived segment names, in order, up to and including `last`.
fn archived_segments(dir: &Path, last: &str) -> Result<Vec<SegmentName>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Ok(WalFileName::Segment(s)) = name.parse::<WalFileName>()
            && name.as_str() <= last
        {
            names.push(s);
        }
    }
    names.sort();
    Ok(names)
}

/// What `pg_waldump -b -p <dir> <first> <last>` (in UTC) shows: every record line, and how many
/// compressed full-page images the block details mention.
fn waldump(dir: &Path, first: &SegmentName, last: &SegmentName) -> Result<(Vec<Dumped>, usize)> {
    let mut cmd = Command::new(pg_bin("pg_waldump"));
    cmd.arg("-b")
        .arg("-p")
        .arg(dir)
        .arg(first.to_string())
        .arg(last.to_string())
        .env("TZ", "UTC");
    let out = host::run(&mut cmd, WALDUMP_LIMIT)?.check()?;
    let records = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("rmgr: "))
        .map(parse_waldump_line)
        .collect::<Result<Vec<_>>>()?;
    let compressed = out.stdout.lines().filter(|l| l.contains("method: pglz")).count();
    Ok((records, compressed))
}

#[test]
fn decoder_agrees_with_pg_waldump_on_a_real_archive() -> Result<()> {
    let t0 = PgTime::from_system_time(SystemTime::now()).expect("clock in range");
    let scratch = ScratchDir::new("waldump-archive")?;
    let archive = scratch.subdir("archive")?;
    let mut cluster = Cluster::init(
        "waldump",
        &InitOptions {
            wal_segsize_mb: Some(1),
            ..InitOptions::default()
        },
    )?;
    let archive_command = format!("test ! -f {dir}/%f && cp %p {dir}/%f", dir = archive.display());
    cluster.set_conf(&[
        ("wal_level", "replica"),
        ("archive_mode", "on"),
        ("archive_command", &archive_command),
        ("max_prepared_transactions", "5"),
        ("max_wal_size", "64MB"),
    ])?;
    cluster.start()?;
    workload(&cluster, 1)?;
    // A restart at another wal_level: shutdown checkpoint, parameter change, logical-only info.
    cluster.stop()?;
    cluster.set_conf(&[("wal_level", "logical")])?;
    cluster.start()?;
    workload(&cluster, 2)?;
    cluster.execute(&format!(
        "SELECT pg_create_restore_point('{}')",
        restore_point_names()[3]
    ))?;
    let last = cluster.switch_wal()?;
    cluster.wait_archived(&last, ARCHIVE_WAIT)?;
    let t1 = PgTime::from_system_time(SystemTime::now()).expect("clock in range");

    let segments = archived_segments(&archive, &last)?;
    let first = *segments.first().context("nothing archived")?;
    let last = *segments.last().context("nothing archived")?;
    let mut files = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        let bytes = fs::read(archive.join(seg.to_string()))?;
        let seg_size = u32::from_le_bytes(bytes[32..36].try_into()?);
        ensure!(
            seg.segment_no(seg_size) == first.segment_no(seg_size).map(|n| n.plus(i as u64)),
            "archive has a gap before {seg}"
        );
        files.push((seg.start_lsn(seg_size).context("segment number")?, bytes));
    }
    let seg_size = files[0].1.len() as u64;
    let block_size = u32::from_le_bytes(files[0].1[36..40].try_into()?);
    eprintln!(
        "{} segments {first}..{last} of {seg_size} bytes, {block_size}-byte pages",
        files.len()
    );
    ensure!(files.len() >= 15, "the workload should span many segments");

    // 1. Record for record, against pg_waldump over the same files.
    let (dumped, compressed_images) = waldump(&archive, &first, &last)?;
    let mut decoder = WalDecoder::new(files[0].0, seg_size as u32, block_size);
    let mut ours = Vec::new();
    for (_, bytes) in &files {
        decoder.feed(bytes);
        while let Some(rec) = decoder.poll()? {
            ours.push(rec);
        }
    }
    if let Some(i) = (0..dumped.len().min(ours.len())).find(|&i| {
        let d = &dumped[i];
        as_dumped(&ours[i]) != (d.lsn, d.prev, d.xid, d.rmid, d.total_len)
    }) {
        bail!(
            "record {i} differs:\n pg_waldump: {:?}\n walvault:   {:?}",
            dumped[i],
            ours[i]
        );
    }
    assert_eq!(
        ours.len(),
        dumped.len(),
        "number of records (pg_waldump's last: {:?}, ours: {:?})",
        dumped.last(),
        ours.last()
    );

    // Transaction ends and restore points, with their times, exactly as pg_waldump shows them.
    let mut dumped_xacts = BTreeMap::new();
    let mut dumped_rps = Vec::new();
    for d in &dumped {
        if usize::from(d.rmid) == usize::from(RM_XACT_ID)
            && let Some(x) = waldump_xact(&d.desc)?
        {
            dumped_xacts.insert(d.lsn, x);
        }
        if usize::from(d.rmid) == usize::from(RM_XLOG_ID)
            && let Some(name) = d.desc.strip_prefix("RESTORE_POINT ")
        {
            dumped_rps.push((d.lsn, name.to_string()));
        }
    }
    let our_xacts: BTreeMap<Lsn, (&str, PgTime)> = ours
        .iter()
        .filter_map(|r| our_xact(&r.kind).map(|x| (r.lsn, x)))
        .collect();
    assert_eq!(
        our_xacts, dumped_xacts,
        "commit and abort records and their times"
    );
    let our_rps: Vec<(Lsn, String)> = ours
        .iter()
        .filter_map(|r| match &r.kind {
            RecordKind::RestorePoint { name, .. } => Some((r.lsn, name.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(our_rps, dumped_rps, "restore points");
    assert_eq!(
        our_rps.iter().map(|r| r.1.clone()).collect::<Vec<_>>(),
        restore_point_names()
    );

    // The workload did what it says (counted from pg_waldump's view).
    let count = |kind: &str| dumped_xacts.values().filter(|x| x.0 == kind).count();
    eprintln!(
        "{} records: {} commits, {} aborts, {} commit prepared, {} abort prepared",
        dumped.len(),
        count("commit"),
        count("abort"),
        count("commit prepared"),
        count("abort prepared")
    );
    assert!(count("commit") >= 2 * 200 + 600, "commits");
    assert!(
        compressed_images > 0,
        "compressed full-page images (bimg hole_length field)"
    );
    assert!(
        dumped.iter().any(|d| d.desc.contains("; origin: node")),
        "commits with a replication origin (XLR_BLOCK_ID_ORIGIN)"
    );
    assert!(count("abort") >= 2 * 30, "aborts");
    assert_eq!(count("commit prepared"), 10);
    assert_eq!(count("abort prepared"), 10);
    for (_, time) in dumped_xacts.values() {
        // initdb's own transactions are older than t0; they are in the first segments at most.
        assert!(*time <= t1, "transaction time {time} after the test ended ({t1})");
    }
    let in_test = dumped_xacts.values().filter(|x| x.1 >= t0).count();
    assert!(in_test >= 1000, "only {in_test} transactions during the test");
    let out_of_order = our_xacts
        .values()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[1].1 < w[0].1)
        .count();
    eprintln!("{out_of_order} transaction ends with a time earlier than the one before");

    let segment_of = |lsn: u64| lsn / seg_size;
    let crossing: Vec<&WalRecord> = ours
        .iter()
        .filter(|r| segment_of(r.lsn.0) != segment_of(r.end.0 - 1))
        .collect();
    let longest_span = crossing
        .iter()
        .map(|r| segment_of(r.end.0 - 1) - segment_of(r.lsn.0))
        .max()
        .unwrap_or(0);
    assert!(longest_span >= 2, "a record should span more than two segments");
    assert!(
        ours.iter().filter(|r| r.kind == RecordKind::Switch).count() >= 3,
        "WAL switches"
    );

    // 2. Segment summaries in archive order, with carries: every record, commit and restore
    // point counted once, in the segment where the record ends.
    let mut carry: Option<Carry> = None;
    let mut summaries: Vec<SegmentSummary> = Vec::new();
    for (start, bytes) in &files {
        let (summary, next) = summarize_segment(bytes, *start, carry.take())?;
        // (Its trip through serde between archive_command runs is covered by unit tests.)
        carry = next;
        summaries.push(summary);
    }
    assert_eq!(
        summaries.iter().map(|s| s.records).sum::<u64>(),
        ours.len() as u64
    );
    for (s, (start, _)) in summaries.iter().zip(&files) {
        let here: Vec<&WalRecord> = ours
            .iter()
            .filter(|r| segment_of(r.end.0 - 1) == segment_of(start.0))
            .collect();
        let times: Vec<PgTime> = here.iter().filter_map(|r| r.kind.xact_time()).collect();
        assert_eq!(s.records, here.len() as u64, "records of {start}");
        assert_eq!(s.first_record, here.first().map(|r| r.lsn), "{start}");
        assert_eq!(s.last_record, here.last().map(|r| r.lsn), "{start}");
        assert_eq!(s.first_commit, times.first().copied(), "{start}");
        assert_eq!(s.last_commit, times.last().copied(), "{start}");
        assert_eq!(s.min_commit, times.iter().min().copied(), "{start}");
        assert_eq!(s.max_commit, times.iter().max().copied(), "{start}");
        assert_eq!(
            s.ends_with_switch,
            here.last().is_some_and(|r| r.kind == RecordKind::Switch)
        );
        assert_eq!(s.pg_version, 15);
        assert!(!s.skipped_continuation || *start == files[0].0);
    }
    assert_eq!(
        summaries
            .iter()
            .flat_map(|s| s.restore_points.iter().map(|r| (r.lsn, r.name.clone())))
            .collect::<Vec<_>>(),
        our_rps
    );
    for rp in summaries.iter().flat_map(|s| &s.restore_points) {
        assert!(t0 <= rp.time && rp.time <= t1, "restore point time {}", rp.time);
    }
    let commits: u64 = summaries.iter().map(|s| s.commits + s.aborts).sum();
    assert_eq!(commits, dumped_xacts.len() as u64);
    assert!(
        summaries
            .iter()
            .zip(&files)
            .any(|(s, (start, _))| s.first_record.is_some_and(|f| f < *start)),
        "some record was carried across a segment boundary"
    );

    // 3. Without carries each segment stands alone: records crossing into it are skipped, never
    // counted twice.
    let mut alone_total = 0;
    let mut skipped = BTreeSet::new();
    for (start, bytes) in &files {
        let (s, _) = summarize_segment(bytes, *start, None)?;
        alone_total += s.records;
        if s.skipped_continuation {
            skipped.insert(*start);
        }
    }
    let crossing_within = crossing.iter().filter(|r| r.lsn >= files[0].0).count() as u64;
    assert_eq!(alone_total + crossing_within, ours.len() as u64);
    assert!(!skipped.is_empty());
    Ok(())
}
