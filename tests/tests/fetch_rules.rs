//! `restore-agent fetch`, run as PostgreSQL runs it. The rule under test: "not found" (exit 1)
//! ends archive recovery and promotes, so it may only mean "confirmed absent"; anything that
//! cannot be confirmed or verified stops recovery (exit above 125), except in standby mode,
//! where PostgreSQL simply retries.

use std::fs;
use std::path::PathBuf;

use anyhow::Result;
use walvault_testkit::agents::exit;
use walvault_testkit::fixtures::wal_samples;
use walvault_testkit::host::write_for_pg;
use walvault_testkit::{Repo, agents};

/// A repository holding the first two sample segments.
fn filled_repo() -> Result<Repo> {
    let repo = Repo::new()?;
    for i in 0..2 {
        agents()
            .push(&repo, &wal_samples().segment(i).0, &[])
            .assert_code(exit::SUCCESS);
    }
    Ok(repo)
}

/// The recovery a data directory is in, which decides what fetch may answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// Archive recovery (no `standby.signal`): a file that cannot be had stops it.
    Archive,
    /// Standby mode (`standby.signal`): PostgreSQL retries, or streams.
    Standby,
}

/// A data directory stand-in for `--pgdata` in `recovery`, as a flag value.
fn pgdata(repo: &Repo, recovery: Recovery) -> Result<String> {
    let dir = repo.scratch().subdir(match recovery {
        Recovery::Archive => "pgdata",
        Recovery::Standby => "pgdata-standby",
    })?;
    if recovery == Recovery::Standby {
        write_for_pg(&dir.join("standby.signal"), b"")?;
    }
    Ok(dir.display().to_string())
}

fn dest_dir(repo: &Repo) -> Result<PathBuf> {
    repo.scratch().subdir("pg_wal")
}

#[test]
fn fetch_restores_the_exact_bytes_and_leaves_no_temp_files() -> Result<()> {
    let samples = wal_samples();
    let repo = filled_repo()?;
    let dest_dir = dest_dir(&repo)?;
    for i in 0..2 {
        let (_, name) = samples.segment(i);
        let dest = dest_dir.join("RECOVERYXLOG");
        let run = agents().fetch(&repo, &name, &dest, &[]);
        run.assert_code(exit::SUCCESS);
        assert_eq!(run.stderr.lines().count(), 1, "one log line per fetch:\n{run}");
        assert!(
            fs::read(&dest)? == samples.bytes(i),
            "fetched {name} differs from the original"
        );
        let left: Vec<_> = fs::read_dir(&dest_dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        assert_eq!(
            left,
            ["RECOVERYXLOG"],
            "only the destination file may be left behind"
        );
        fs::remove_file(&dest)?;
    }
    Ok(())
}

#[test]
fn missing_file_is_not_found_at_once() -> Result<()> {
    let repo = filled_repo()?;
    let dest = dest_dir(&repo)?.join("RECOVERYXLOG");
    let run = agents().fetch(
        &repo,
        "0000000100000000000000AA",
        &dest,
        &["--retry-timeout", "30s"],
    );
    run.assert_code(exit::NOT_FOUND_OR_RETRY);
    // A confirmed absence is not an error worth retrying for the full 30 s.
    assert!(
        run.elapsed.as_secs() < 20,
        "not-found must not be retried:\n{run}"
    );
    assert!(!dest.exists());
    Ok(())
}

/// Fetching from a location with no repository (no walvault.json, a volume not mounted) is not
/// "this file is not in this repository": recovery stops (exit above 125) rather than ending
/// early, with at most two lines in PostgreSQL's log, the last saying what to do.
#[test]
fn fetch_from_a_missing_repository_stops_recovery_in_two_lines_at_most() -> Result<()> {
    let (_, name) = wal_samples().segment(0);
    let location = Repo::uninitialized()?;
    let dest = dest_dir(&location)?.join("RECOVERYXLOG");
    let plain_dir = pgdata(&location, Recovery::Archive)?;
    let plain = ["--retry-timeout", "3s", "--pgdata", &plain_dir];
    for args in [location.args(), location.args_with_url(location.nowhere_url())] {
        let run = agents().fetch_with(&args, &name, &dest, &plain);
        run.assert_code(exit::FATAL);
        run.assert_quiet_failure("archive-agent init");
    }
    assert!(!dest.exists(), "a failed fetch wrote {}", dest.display());
    Ok(())
}

#[test]
fn unreadable_repository_stops_recovery_unless_standby() -> Result<()> {
    let (_, name) = wal_samples().segment(0);
    let repo = filled_repo()?;
    let dest = dest_dir(&repo)?.join("RECOVERYXLOG");
    let (plain_dir, standby_dir) = (
        pgdata(&repo, Recovery::Archive)?,
        pgdata(&repo, Recovery::Standby)?,
    );
    let plain = ["--retry-timeout", "2s", "--pgdata", &plain_dir];
    let standby = ["--retry-timeout", "2s", "--pgdata", &standby_dir];

    // The agent runs as the PostgreSQL user, so mode 000 locks it out even when we are root.
    repo.set_reachable(false)?;
    let runs = [
        agents().fetch(&repo, &name, &dest, &plain),
        agents().fetch(&repo, &name, &dest, &standby),
    ];
    repo.set_reachable(true)?;
    runs[0].assert_code(exit::FATAL);
    runs[1].assert_code(exit::NOT_FOUND_OR_RETRY);
    for run in &runs {
        assert!(
            run.stderr.contains(repo.unreachable_words()),
            "the error must say why:\n{run}"
        );
    }
    assert!(
        !dest.exists(),
        "nothing may be written when the repository cannot be read"
    );

    // A repository URL pointing nowhere is not "file not found" either.
    let nowhere = repo.args_with_url(repo.nowhere_url());
    agents()
        .fetch_with(&nowhere, &name, &dest, &plain)
        .assert_code(exit::FATAL);
    agents()
        .fetch_with(&nowhere, &name, &dest, &standby)
        .assert_code(exit::NOT_FOUND_OR_RETRY);
    assert!(!dest.exists());
    Ok(())
}

#[test]
fn corrupt_or_truncated_object_stops_recovery_unless_standby() -> Result<()> {
    let samples = wal_samples();
    let repo = filled_repo()?;
    let dest = dest_dir(&repo)?.join("RECOVERYXLOG");
    let (plain_dir, standby_dir) = (
        pgdata(&repo, Recovery::Archive)?,
        pgdata(&repo, Recovery::Standby)?,
    );
    let plain = ["--pgdata", &plain_dir];
    let standby = ["--pgdata", &standby_dir];

    let (_, flipped) = samples.segment(0);
    repo.flip_middle_byte(&repo.object_key(&flipped))?;

    let (_, cut) = samples.segment(1);
    let key = repo.object_key(&cut);
    repo.truncate(&key, repo.read(&key)?.len() / 2)?;

    for name in [&flipped, &cut] {
        let run = agents().fetch(&repo, name, &dest, &plain);
        run.assert_code(exit::FATAL);
        assert!(
            run.stderr.contains(name.as_str()),
            "the error must name the object:\n{run}"
        );
        assert!(!dest.exists(), "a corrupt object must never reach PostgreSQL");
        agents()
            .fetch(&repo, name, &dest, &standby)
            .assert_code(exit::NOT_FOUND_OR_RETRY);
        assert!(!dest.exists());
    }
    Ok(())
}

/// A name PostgreSQL never asks for means a misconfigured restore_command: recovery stops
/// (exit above 125) rather than end as if the file were missing; in standby mode "not
/// available". Nothing is written either way.
#[test]
fn invalid_names_stop_recovery_and_never_look_missing() -> Result<()> {
    let repo = filled_repo()?;
    let dest = dest_dir(&repo)?.join("RECOVERYXLOG");
    for name in [
        "../x",
        "/etc/passwd",
        "",
        "00000001000000000000000",
        "000000010000000000000001\n",
    ] {
        agents().fetch(&repo, name, &dest, &[]).assert_code(exit::FATAL);
        let standby = pgdata(&repo, Recovery::Standby)?;
        agents()
            .fetch(&repo, name, &dest, &["--pgdata", &standby])
            .assert_code(exit::NOT_FOUND_OR_RETRY);
        assert!(!dest.exists(), "fetch of {name:?} created the destination");
    }
    Ok(())
}

/// A restore_command line clap cannot parse is no "file not found" either: outside standby mode
/// it stops recovery, in one line; run in a standby's data directory (where PostgreSQL runs it)
/// it is "not available". Other subcommands keep the usual usage status.
#[test]
fn bad_fetch_arguments_stop_recovery() -> Result<()> {
    let repo = filled_repo()?;
    let dest = dest_dir(&repo)?.join("RECOVERYXLOG");
    for bad in [
        &["fetch", "--no-such-flag"][..],
        &["fetch", "000000010000000000000001"][..],
    ] {
        let mut cmd = agents().command(walvault_testkit::agents::RESTORE_AGENT);
        cmd.args(bad)
            .args(repo.args())
            .current_dir(pgdata(&repo, Recovery::Archive)?);
        let run = walvault_testkit::host::run(&mut cmd, std::time::Duration::from_secs(60))?;
        run.assert_code(exit::FATAL);
        assert_eq!(run.stderr.lines().count(), 1, "one line:\n{run}");
        let mut cmd = agents().command(walvault_testkit::agents::RESTORE_AGENT);
        cmd.args(bad)
            .args(repo.args())
            .current_dir(pgdata(&repo, Recovery::Standby)?);
        walvault_testkit::host::run(&mut cmd, std::time::Duration::from_secs(60))?
            .assert_code(exit::NOT_FOUND_OR_RETRY);
    }
    let run = agents().run(
        walvault_testkit::agents::RESTORE_AGENT,
        ["list", "--no-such-flag"],
    );
    run.assert_code(exit::USAGE);
    assert!(!dest.exists());
    Ok(())
}
