//! `restore-agent --fallback-repo`: a second copy of the repository (byte for byte, as
//! `archive-agent copy` makes it) serves whatever the first one lost or holds damaged. A restore
//! that fails from the first repository alone (a WAL segment deleted, a pack and a segment
//! corrupted) restores exactly the rows recorded at the target with the copy behind it, the
//! restored server's own fetches included; a segment missing from both is still "not found".

use std::fs;
use std::sync::OnceLock;

use anyhow::{Context, Result, ensure};
use walvault_testkit::agents::exit;
use walvault_testkit::backup::{self, Restore, take_backup};
use walvault_testkit::fixtures::{RECOVERY_TIMEOUT, archive_everything, archiving_cluster};
use walvault_testkit::host::ScratchDir;
use walvault_testkit::workload::{self, Ledger, LedgerState};
use walvault_testkit::{Repo, agents};

/// A repository with one backup and the archive past it over several segments, and the copy that
/// stays whole.
struct Archived {
    /// Never damaged: each test damages a copy of its own.
    pristine: Repo,
    /// The second copy, never damaged.
    copy: Repo,
    /// A segment archived after the backup, needed to reach the target.
    after_backup: String,
    /// Another one, later.
    later: String,
    /// The instant restores target, past both.
    target: LedgerState,
}

fn archived() -> &'static Archived {
    static ARCHIVED: OnceLock<Archived> = OnceLock::new();
    ARCHIVED.get_or_init(|| archive().unwrap_or_else(|e| panic!("{e:#}")))
}

fn archive() -> Result<Archived> {
    let pristine = Repo::new()?;
    let mut source = archiving_cluster("fallback-source", &pristine, "")?;
    workload::create_ledger(&source)?;
    let mut ledger = Ledger::connect(&source)?;
    ledger.step()?;
    take_backup(&source, &pristine)?;
    ledger.step()?;
    let after_backup = source.switch_wal()?;
    ledger.step()?;
    let later = source.switch_wal()?;
    ledger.step()?;
    let target = ledger.step()?;
    std::thread::sleep(std::time::Duration::from_millis(50));
    // Past the target: must not be replayed.
    ledger.step()?;
    drop(ledger);
    archive_everything(&source)?;
    source.stop()?;
    let copy = pristine.copy()?;
    Ok(Archived {
        pristine,
        copy,
        after_backup,
        later,
        target,
    })
}

/// `--fallback-repo <the copy>` (in the same store: the same `--config` has its credentials).
fn fallback_args(a: &Archived) -> Vec<String> {
    vec!["--fallback-repo".to_string(), a.copy.url()]
}

/// What the restore logs it took from the copy, and what the restored server's fetches do.
struct Served {
    by_restore: Option<String>,
    by_fetch: Option<String>,
}

/// A restore to the target from `damaged` alone fails; with the copy behind it, it restores and
/// recovers to exactly the rows recorded at the target, logging what it took from the copy.
fn fails_alone_and_restores_with_the_copy(damaged: &Repo, name: &str, served: Served) -> Result<()> {
    let a = archived();
    let target = ["--target-time", a.target.time.as_str()];
    let scratch = ScratchDir::new(&format!("{name}-alone"))?;
    let alone = backup::restore(damaged, &scratch.path().join("data"), &target)?;
    let recovered_alone = alone.code() == Some(0) && recovers_to_target(damaged, name, &target).is_ok();
    ensure!(
        !recovered_alone,
        "without the copy the restore must fail:\n{alone}"
    );

    let fallback = fallback_args(a);
    let mut args: Vec<&str> = target.to_vec();
    args.extend(fallback.iter().map(String::as_str));
    let (mut restored, run) = backup::restore_new_cluster(damaged, name, Restore::with(&args))
        .context("restore with --fallback-repo")?;
    if let Some(line) = &served.by_restore {
        ensure!(
            run.stderr.matches(line.as_str()).count() == 1,
            "the restore names what it took from the copy, once ({line}):\n{run}"
        );
    }
    restored.start_and_wait_recovery_end(RECOVERY_TIMEOUT)?;
    assert_eq!(
        workload::ledger_contents(&restored)?,
        a.target.contents,
        "restored with the copy behind it, the ledger is as at the target\n{run}"
    );
    if let Some(line) = &served.by_fetch {
        let log = restored.log();
        ensure!(
            log.contains(line.as_str()),
            "the restored server's fetch names what it took from the copy ({line}):\n{log}"
        );
    }
    Ok(())
}

/// Whether `repo` alone restores to `target` with the ledger as recorded there.
fn recovers_to_target(repo: &Repo, name: &str, target: &[&str]) -> Result<()> {
    let (cluster, _) = backup::restore_and_recover(repo, &format!("{name}-check"), Restore::with(target))?;
    ensure!(workload::ledger_contents(&cluster)? == archived().target.contents);
    Ok(())
}

#[test]
fn a_segment_deleted_from_the_first_repository_is_fetched_from_the_copy() -> Result<()> {
    let a = archived();
    let damaged = a.pristine.copy()?;
    damaged.delete(&damaged.object_key(&a.after_backup))?;
    let by_fetch = format!(
        "read {} from fallback repository {}: missing in {}",
        damaged.object_key(&a.after_backup),
        a.copy.url(),
        damaged.url()
    );
    let served = Served {
        by_restore: None,
        by_fetch: Some(by_fetch),
    };
    fails_alone_and_restores_with_the_copy(&damaged, "fallback-missing", served)
}

#[test]
fn a_corrupt_pack_and_segment_are_read_from_the_copy() -> Result<()> {
    let a = archived();
    let damaged = a.pristine.copy()?;
    let (pack, _) = damaged
        .backup_objects()?
        .into_iter()
        .max_by_key(|(_, size)| *size)
        .context("the backup stored its data")?;
    damaged.flip_middle_byte(&pack)?;
    damaged.flip_middle_byte(&damaged.object_key(&a.later))?;
    let (copy, here) = (a.copy.url(), damaged.url());
    let served = Served {
        by_restore: Some(format!(
            "read {pack} from fallback repository {copy}: damaged in {here}: "
        )),
        by_fetch: Some(format!(
            "read {} from fallback repository {copy}: damaged in {here}: ",
            damaged.object_key(&a.later)
        )),
    };
    fails_alone_and_restores_with_the_copy(&damaged, "fallback-damaged", served)
}

#[test]
fn a_truncated_pack_is_read_from_the_copy() -> Result<()> {
    let a = archived();
    let damaged = a.pristine.copy()?;
    let (pack, size) = damaged
        .backup_objects()?
        .into_iter()
        .max_by_key(|(_, size)| *size)
        .context("the backup stored its data")?;
    damaged.truncate(&pack, usize::try_from(size / 2)?)?;
    let (copy, here) = (a.copy.url(), damaged.url());
    let served = Served {
        by_restore: Some(format!(
            "read {pack} from fallback repository {copy}: damaged in {here}: "
        )),
        by_fetch: None,
    };
    fails_alone_and_restores_with_the_copy(&damaged, "fallback-truncated", served)
}

#[test]
fn fetch_takes_a_segment_only_the_copy_has_and_not_found_stays_not_found() -> Result<()> {
    let a = archived();
    let damaged = a.pristine.copy()?;
    damaged.delete(&damaged.object_key(&a.after_backup))?;
    let pgdata = damaged.scratch().subdir("pgdata")?.display().to_string();
    let dest_dir = damaged.scratch().subdir("pg_wal")?;
    let plain = [
        "--pgdata",
        pgdata.as_str(),
        "--no-prefetch",
        "--retry-timeout",
        "5s",
    ];
    let fallback = fallback_args(a);
    let mut with_copy: Vec<&str> = plain.to_vec();
    with_copy.extend(fallback.iter().map(String::as_str));

    // From the first repository alone: not found.
    let dest = dest_dir.join("alone");
    agents()
        .fetch(&damaged, &a.after_backup, &dest, &plain)
        .assert_code(exit::NOT_FOUND_OR_RETRY);
    ensure!(!dest.exists());

    // With the copy: the segment, byte for byte what the copy holds.
    let dest = dest_dir.join("with-copy");
    let run = agents().fetch(&damaged, &a.after_backup, &dest, &with_copy);
    run.assert_code(exit::SUCCESS);
    let expected = dest_dir.join("from-copy");
    agents()
        .fetch(&a.copy, &a.after_backup, &expected, &plain)
        .assert_code(exit::SUCCESS);
    let (got, want) = (fs::read(&dest)?, fs::read(&expected)?);
    ensure!(
        got.len() == 16 << 20 && got == want,
        "fetched bytes differ from the copy's"
    );
    ensure!(
        run.stderr.matches("from fallback repository").count() == 1,
        "one line for the one object taken from the copy:\n{run}"
    );

    // Missing from both: not found, exactly as without a copy.
    let dest = dest_dir.join("nowhere");
    agents()
        .fetch(&damaged, "0000000100000000000000F0", &dest, &with_copy)
        .assert_code(exit::NOT_FOUND_OR_RETRY);
    ensure!(!dest.exists());

    // The first repository gone entirely (its walvault.json deleted): the copy alone serves.
    let gone = a.pristine.copy()?;
    gone.delete(walvault_testkit::repo::DESCRIPTOR)?;
    let dest = dest_dir.join("gone");
    let run = agents().fetch(&gone, &a.after_backup, &dest, &with_copy);
    run.assert_code(exit::SUCCESS);
    ensure!(fs::read(&dest)? == want, "fetched bytes differ from the copy's");
    ensure!(
        run.stderr.contains("reading everything from fallback repository"),
        "{run}"
    );

    // A copy of another repository is refused, in one line, as any bad repository.
    let other = Repo::new()?;
    let mut wrong: Vec<&str> = plain.to_vec();
    let other_url = other.url();
    wrong.extend(["--fallback-repo", other_url.as_str()]);
    let run = agents().fetch(&damaged, &a.after_backup, &dest_dir.join("wrong"), &wrong);
    run.assert_code(exit::FATAL);
    ensure!(run.stderr.contains("is not a copy of repository"), "{run}");
    Ok(())
}
