//! A corrupt archived segment must stop recovery with FATAL, never end it early: promoting at
//! the corrupt segment would silently lose every transaction after it and fork a new timeline.

use anyhow::Result;
use walvault_testkit::Repo;
use walvault_testkit::fixtures::{
    RECOVERY_TIMEOUT, archive_everything, archiving_cluster, assert_fatal_at, prepare_restore, segment_range,
};
use walvault_testkit::workload::{self, Workload};

#[test]
fn corrupt_segment_stops_recovery_instead_of_promoting() -> Result<()> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("source", &repo, "")?;
    workload::create_payload_table(&source)?;
    let mut restored = source.base_backup("restored")?;
    let first = restored.backup_start_segment()?;
    let work = Workload {
        transactions: 300,
        payload_rows: 1000,
        ..Workload::default()
    };
    workload::run(&source, &work)?;
    let last = archive_everything(&source)?;
    source.stop()?;

    let segments = segment_range(&first, &last)?;
    assert!(
        segments.len() >= 4,
        "the workload should span several segments: {first}..={last}"
    );
    // Past the end of the base backup, with archived segments on both sides.
    let victim = &segments[segments.len() / 2];
    let before_victim = &segments[segments.len() / 2 - 1];
    repo.flip_middle_byte(&repo.object_key(victim))?;

    prepare_restore(&restored, &repo, "--retry-timeout 2s")?;
    let log = restored.start_expect_failure(RECOVERY_TIMEOUT)?;

    assert_fatal_at(&log, victim, "corrupt");
    assert!(
        log.contains(&format!("restored log file \"{before_victim}\" from archive")),
        "recovery should have replayed up to the corrupt segment:\n{log}"
    );
    restored.assert_stopped_in_recovery_on_timeline_1()?;
    Ok(())
}
