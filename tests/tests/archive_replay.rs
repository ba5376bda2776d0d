//! The promise of the product: everything archived through `archive-agent` replays through
//! `restore-agent` into a cluster holding exactly the same rows.

use anyhow::Result;
use walvault_testkit::Repo;
use walvault_testkit::fixtures::{
    RECOVERY_TIMEOUT, archive_everything, archiving_cluster, prepare_restore, segment_range,
};
use walvault_testkit::workload::{self, Workload};

#[test]
fn archived_wal_replays_into_identical_data() -> Result<()> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("source", &repo, "")?;
    workload::create_payload_table(&source)?;
    // No WAL in the backup: recovery can only succeed through restore_command.
    let mut restored = source.base_backup("restored")?;
    let first = restored.backup_start_segment()?;

    workload::run(&source, &Workload::default())?;
    let last = archive_everything(&source)?;

    let segments = segment_range(&first, &last)?;
    assert!(
        segments.len() >= 4,
        "the workload should span several segments: {first}..={last}"
    );
    let missing: Vec<_> = segments.iter().filter(|s| !repo.has_object(s)).collect();
    assert!(missing.is_empty(), "segments not in the repository: {missing:?}");
    for done in source.archive_status("done")? {
        assert!(
            repo.has_object(&done),
            "PostgreSQL marked {done} archived, but the repository lacks it"
        );
    }

    let expected = workload::fingerprints(&source)?;
    source.stop()?;
    let stored = repo.files()?;

    prepare_restore(&restored, &repo, "")?;
    restored.start_and_wait_recovery_end(RECOVERY_TIMEOUT)?;

    assert_eq!(
        workload::fingerprints(&restored)?,
        expected,
        "restored data differs from the source"
    );
    assert_eq!(repo.files()?, stored, "restoring must not change the repository");
    let log = restored.log();
    let fetched = log.matches("restored log file").count();
    assert!(
        fetched >= segments.len(),
        "recovery restored {fetched} files, expected all of {segments:?}"
    );
    Ok(())
}
