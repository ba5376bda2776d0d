//! The harness itself, without the agents: clusters start, answer, back up and always stop.

use std::time::Duration;

use anyhow::Result;
use walvault_testkit::host::process_alive;
use walvault_testkit::{Cluster, InitOptions};

#[test]
fn cluster_runs_sql_backs_up_and_stops_when_dropped() -> Result<()> {
    let mut cluster = Cluster::init("harness", &InitOptions::default())?;
    cluster.start()?;
    cluster.execute("CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 10)")?;
    assert_eq!(cluster.query_one_string("SELECT sum(id)::text FROM t")?, "55");
    assert_eq!(
        cluster.system_identifier()?.len(),
        19,
        "system identifiers are 19-digit numbers"
    );

    let backup = cluster.base_backup("harness-backup")?;
    let start = backup.backup_start_segment()?;
    assert_eq!(start.len(), 24, "backup_label names a segment: {start}");
    assert!(backup.data_dir().join("PG_VERSION").is_file());
    assert!(
        std::fs::read_dir(backup.wal_dir())?
            .flatten()
            .all(|e| e.path().is_dir()),
        "-X none: the backup must hold no WAL"
    );

    cluster.stop()?;
    assert!(!cluster.is_up());
    cluster.start()?;
    assert_eq!(cluster.query_one_string("SELECT count(*)::text FROM t")?, "10");
    let pid = cluster.postmaster_pid().expect("running server has a pid");
    drop(cluster);
    // Drop stops with -m immediate and waits for the postmaster to go.
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !process_alive(pid),
        "postmaster {pid} survived the drop of its Cluster"
    );
    Ok(())
}

#[test]
fn failed_start_returns_the_log() -> Result<()> {
    let mut cluster = Cluster::init("harness-bad", &InitOptions::default())?;
    cluster.set_conf(&[("shared_buffers", "not a size")])?;
    let log = cluster.start_expect_failure(Duration::from_secs(60))?;
    assert!(
        log.contains("shared_buffers"),
        "log should say what is wrong:\n{log}"
    );
    assert!(!cluster.is_up());
    Ok(())
}
