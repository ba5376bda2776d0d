//! One damaged object never hides the healthy ones: a corrupt backup manifest and an unreadable
//! timeline history are reported by `list` and `info` with the reason and left out, every other
//! backup stays restorable, and restore never picks (nor accepts) the damaged backup.

use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use walvault_testkit::backup::{self, Restore, next_backup_second, take_backup};
use walvault_testkit::fixtures::{archive_everything, archiving_cluster};
use walvault_testkit::workload::{self, Ledger};
use walvault_testkit::{Repo, agents};

#[test]
fn a_damaged_manifest_or_history_is_reported_and_the_rest_stays_restorable() -> Result<()> {
    let repo = Repo::new()?;
    let source = archiving_cluster("damaged-source", &repo, "")?;
    workload::create_ledger(&source)?;
    let mut ledger = Ledger::connect(&source)?;
    ledger.step()?;
    let first = take_backup(&source, &repo)?;
    next_backup_second();
    ledger.step()?;
    let second = take_backup(&source, &repo)?;
    let mut after = Vec::new();
    for _ in 0..10 {
        after.push(ledger.step()?);
        thread::sleep(Duration::from_millis(20));
    }
    drop(ledger);
    archive_everything(&source)?;

    // The first backup's manifest loses a byte; a history file of timeline 7 is garbage.
    repo.flip_middle_byte(&repo.manifest_key(&first.id))?;
    let history_key = repo.object_key("00000007.history");
    repo.write(&history_key, b"not a walvault object")?;

    let info = backup::info(&repo).context("info with damaged objects")?;
    let ids: Vec<&str> = info["backups"]
        .as_array()
        .context("backups")?
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        [second.id.as_str()],
        "only the healthy backup is listed as usable"
    );
    let damaged = info["damaged"].as_array().context("damaged")?;
    let what: Vec<&str> = damaged.iter().filter_map(|d| d["what"].as_str()).collect();
    assert!(
        what.contains(&format!("backup {}", first.id).as_str()) && what.contains(&"timeline 7 history"),
        "both damaged objects reported: {damaged:#?}"
    );
    ensure!(
        damaged
            .iter()
            .all(|d| !d["reason"].as_str().unwrap_or_default().is_empty()),
        "each with a reason: {damaged:#?}"
    );
    let list = agents().run(
        walvault_testkit::agents::RESTORE_AGENT,
        ["list".to_string()].into_iter().chain(repo.args()),
    );
    list.assert_code(0);
    ensure!(
        list.stdout.contains(&format!("DAMAGED backup {}", first.id)),
        "list names the damaged backup:\n{}",
        list.stdout
    );

    // The healthy backup restores to an instant after it.
    let target = &after[6];
    let (restored, report) = backup::restore_and_recover(
        &repo,
        "damaged-restored",
        Restore::with(&["--target-time", &target.time]),
    )?;
    assert_eq!(workload::ledger_contents(&restored)?, target.contents);
    ensure!(
        report.contains(&format!("restored backup {}", second.id)),
        "served by the healthy backup:\n{report}"
    );
    drop(restored);

    // The damaged one is refused by name, before anything is written.
    let scratch = walvault_testkit::host::ScratchDir::new("damaged-refused")?;
    let pgdata = scratch.path().join("data");
    let run = backup::restore(&repo, &pgdata, &["--backup", &first.id])?;
    assert_ne!(
        run.code(),
        Some(0),
        "restoring the damaged backup must fail: {run}"
    );
    ensure!(run.stderr.contains("is damaged"), "the refusal says why: {run}");
    ensure!(!pgdata.exists(), "nothing written for a refused restore");
    Ok(())
}
