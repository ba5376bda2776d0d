//! `archive-agent push` on real WAL files, run as PostgreSQL runs it: what is stored, what is
//! refused, and exit codes PostgreSQL's archiver can live with (never above 125).

use std::fs;
use std::path::PathBuf;

use anyhow::Result;
use walvault_testkit::agents::exit;
use walvault_testkit::fixtures::{foreign_wal_samples, wal_samples};
use walvault_testkit::host::write_for_pg;
use walvault_testkit::repo::StoreKind;
use walvault_testkit::{Repo, agents};

/// Fetch `name` from `repo` into a fresh file and return its bytes.
fn fetched(repo: &Repo, name: &str) -> Result<Vec<u8>> {
    let dest = repo.scratch().subdir("fetched")?.join(name);
    let _ = fs::remove_file(&dest);
    agents().fetch(repo, name, &dest, &[]).assert_code(exit::SUCCESS);
    Ok(fs::read(dest)?)
}

#[test]
fn push_stores_a_segment_and_accepts_the_same_bytes_again() -> Result<()> {
    let samples = wal_samples();
    let repo = Repo::new()?;
    let (path, name) = samples.segment(0);

    let first = agents().push(&repo, &path, &[]);
    first.assert_code(exit::SUCCESS);
    assert!(
        repo.has_object(&name),
        "no object for {name} in {:?}",
        repo.files()?
    );
    assert!(
        repo.files()?.contains_key("cluster.json"),
        "the first segment binds a repository created without --pgdata to its cluster"
    );
    assert!(
        first.stderr.contains(&name),
        "one log line naming the file:\n{first}"
    );

    // PostgreSQL may repeat a push whose success it did not see.
    let before = repo.files()?;
    let again = agents().push(&repo, &path, &[]);
    again.assert_code(exit::SUCCESS);
    assert_eq!(
        repo.files()?,
        before,
        "a repeated push must not change the repository"
    );
    assert_eq!(again.stderr.lines().count(), 1, "one log line per push:\n{again}");
    assert_eq!(fetched(&repo, &name)?, samples.bytes(0));
    Ok(())
}

#[test]
fn push_refuses_other_bytes_under_an_archived_name() -> Result<()> {
    let samples = wal_samples();
    let repo = Repo::new()?;
    let (path, name) = samples.segment(1);
    let original = samples.bytes(1);
    agents().push(&repo, &path, &[]).assert_code(exit::SUCCESS);

    // Same name, one byte changed inside a record area (not a page header, so still valid WAL).
    let mut changed = original.clone();
    changed[100_000] ^= 0x01;
    let changed_path = repo.scratch().subdir("changed")?.join(&name);
    write_for_pg(&changed_path, &changed)?;
    let before = repo.files()?;
    let run = agents().push(&repo, &changed_path, &[]);
    run.assert_code(exit::REFUSED);
    assert_eq!(
        run.stderr.lines().count(),
        1,
        "one error line per failure:\n{run}"
    );
    for hash in [blake3::hash(&original), blake3::hash(&changed)] {
        assert!(
            run.stderr.contains(hash.to_hex().as_str()),
            "error must name blake3 {hash}:\n{run}"
        );
    }
    assert_eq!(
        repo.files()?,
        before,
        "a refused push must not change the repository"
    );
    assert_eq!(
        fetched(&repo, &name)?,
        original,
        "the archived copy must stay the original"
    );
    Ok(())
}

#[test]
fn history_files_are_archived_once_and_never_overwritten() -> Result<()> {
    let repo = Repo::new()?;
    let dir = repo.scratch().subdir("history")?;
    let original = b"1\t0/3000060\tno recovery target specified\n";
    let path = dir.join("00000002.history");
    write_for_pg(&path, original)?;

    agents().push(&repo, &path, &[]).assert_code(exit::SUCCESS);
    assert!(
        repo.has_object("00000002.history"),
        "no history object in {:?}",
        repo.files()?
    );
    agents().push(&repo, &path, &[]).assert_code(exit::SUCCESS);

    let other = repo.scratch().subdir("other")?.join("00000002.history");
    write_for_pg(&other, b"1\t0/4000000\tbefore 2025-01-01 00:00:00+00\n")?;
    agents().push(&repo, &other, &[]).assert_code(exit::REFUSED);
    assert_eq!(fetched(&repo, "00000002.history")?, original);
    Ok(())
}

#[test]
fn invalid_file_names_are_usage_errors_and_touch_nothing() -> Result<()> {
    let samples = wal_samples();
    let repo = Repo::new()?;
    agents()
        .push(&repo, &samples.segment(0).0, &[])
        .assert_code(exit::SUCCESS);
    let before = repo.files()?;

    // Valid WAL content under names PostgreSQL never archives.
    let dir = repo.scratch().subdir("bad-names")?;
    let mut paths: Vec<PathBuf> = Vec::new();
    for name in [
        "foo",
        "00000001000000000000000",
        "000000010000000000000001.tmp",
        "00000001000000000000000\u{7}",
        "000000010000000000000002\n",
    ] {
        let p = dir.join(name);
        write_for_pg(&p, &samples.bytes(0))?;
        paths.push(p);
    }
    paths.push(PathBuf::new());
    paths.push(dir.join(".."));

    for path in &paths {
        let run = agents().push(&repo, path, &[]);
        run.assert_code(exit::USAGE);
        assert_eq!(repo.files()?, before, "pushing {path:?} changed the repository");
    }
    Ok(())
}

#[test]
fn wal_of_another_cluster_is_refused() -> Result<()> {
    let ours = wal_samples();
    let theirs = foreign_wal_samples();
    let repo = Repo::new()?;
    agents()
        .push(&repo, &ours.segment(1).0, &[])
        .assert_code(exit::SUCCESS);
    let before = repo.files()?;

    let (path, name) = theirs.segment(0);
    assert!(
        !repo.has_object(&name),
        "test needs a name the repository does not hold yet"
    );
    let run = agents().push(&repo, &path, &[]);
    run.assert_code(exit::REFUSED);
    for id in [&ours.system_identifier, &theirs.system_identifier] {
        assert!(
            run.stderr.contains(id.as_str()),
            "error must name system identifier {id}:\n{run}"
        );
    }
    assert_eq!(
        repo.files()?,
        before,
        "nothing may be stored from another cluster"
    );
    Ok(())
}

#[test]
fn unwritable_repository_is_a_retryable_failure() -> Result<()> {
    let samples = wal_samples();
    let repo = Repo::new()?;
    let (path, _) = samples.segment(0);
    let check = |args: &[String]| {
        let run = agents().push_with(args, &path, &["--retry-timeout", "1s"]);
        // Above 125 would kill PostgreSQL's archiver; 1 makes it retry later.
        run.assert_code(exit::NOT_FOUND_OR_RETRY);
        assert!(
            run.elapsed.as_secs() < 30,
            "--retry-timeout 1s must bound the push:\n{run}"
        );
    };
    match repo.kind() {
        StoreKind::File => {
            let file = repo.scratch().path().join("plain-file");
            write_for_pg(&file, b"not a directory")?;
            check(&repo.args_with_url(&format!("file://{}/repo", file.display())));
            check(&repo.args_with_url("file:///proc/walvault-cannot-exist/repo"));
        }
        StoreKind::S3 | StoreKind::Azure => {
            check(&repo.args_with_url(repo.nowhere_url()));
            repo.set_reachable(false)?;
            check(&repo.args());
        }
    }
    Ok(())
}

#[test]
fn missing_wal_file_is_a_retryable_failure() -> Result<()> {
    let repo = Repo::new()?;
    let missing = repo.scratch().path().join("000000010000000000000009");
    let run = agents().push(&repo, &missing, &["--retry-timeout", "1s"]);
    run.assert_code(exit::NOT_FOUND_OR_RETRY);
    assert!(!repo.has_object("000000010000000000000009"));
    Ok(())
}

/// WAL of a PostgreSQL release walvault does not know yet (a newer page magic) is refused in one
/// line naming the magic and the supported versions, with an exit code PostgreSQL's archiver
/// retries (the segment stays in pg_wal), and nothing is stored.
#[test]
fn push_refuses_wal_of_an_unknown_release_in_one_line() -> Result<()> {
    let samples = wal_samples();
    let repo = Repo::new()?;
    let (_, name) = samples.segment(0);
    let mut future = samples.bytes(0);
    future[0..2].copy_from_slice(&0xD122u16.to_le_bytes());
    let path = repo.scratch().subdir("future")?.join(&name);
    write_for_pg(&path, &future)?;
    let run = agents().push(&repo, &path, &[]);
    run.assert_code(exit::REFUSED);
    assert_eq!(run.stderr.lines().count(), 1, "one error line:\n{run}");
    assert!(
        run.stderr.contains("0xD122") && run.stderr.contains("PostgreSQL 13 to 19"),
        "the refusal names the magic and the supported versions:\n{run}"
    );
    assert!(!repo.has_object(&name), "nothing stored for {name}");
    Ok(())
}

/// A location that holds no repository (a backup volume not mounted, a mistyped prefix) is never
/// turned into one by push: push fails with exit 1 (PostgreSQL keeps the WAL and retries) and
/// one line that says to run `archive-agent init`, and nothing is written there. Once init has
/// run, the same push succeeds; a second init is refused and changes nothing.
#[test]
fn push_never_creates_a_repository_and_init_never_replaces_one() -> Result<()> {
    let samples = wal_samples();
    let (path, name) = samples.segment(0);
    let location = Repo::uninitialized()?;
    let refused = agents().push(&location, &path, &[]);
    refused.assert_code(exit::NOT_FOUND_OR_RETRY);
    assert!(refused.stderr.contains("archive-agent init"), "{refused}");
    assert_eq!(refused.stderr.lines().count(), 1, "one line:\n{refused}");
    assert!(location.files()?.is_empty(), "push wrote {:?}", location.files()?);

    location.init(&[]).check()?;
    let descriptor = location.read("walvault.json")?;
    agents().push(&location, &path, &[]).assert_code(exit::SUCCESS);
    assert!(location.has_object(&name));
    let again = location.init(&[]);
    assert_ne!(again.code(), Some(0), "a second init must fail: {again}");
    assert!(again.stderr.contains("already exists"), "{again}");
    assert_eq!(
        location.read("walvault.json")?,
        descriptor,
        "init replaced the descriptor"
    );
    assert_eq!(fetched(&location, &name)?, samples.bytes(0));
    Ok(())
}

/// A push that cannot work (no repository at the URL, a backup volume not mounted) writes at
/// most two lines into PostgreSQL's log, whose every line it gets: one warning while it waits,
/// if it waits at all, then one error that says what to do. A location without walvault.json is
/// an answer, not retried for the retry timeout. The exit code stays 1: PostgreSQL keeps the WAL.
#[test]
fn push_to_a_missing_repository_says_what_to_do_in_two_lines_at_most() -> Result<()> {
    let samples = wal_samples();
    let (path, _) = samples.segment(0);
    let location = Repo::uninitialized()?;
    let check = |args: &[String], retry: &str| {
        let run = agents().push_with(args, &path, &["--retry-timeout", retry]);
        run.assert_code(exit::NOT_FOUND_OR_RETRY);
        run.assert_quiet_failure("archive-agent init");
        run
    };
    let answered = check(&location.args(), "30s");
    assert!(
        answered.elapsed.as_secs() < 15,
        "a missing walvault.json is not retried for the 30s retry timeout:\n{answered}"
    );
    let nowhere = check(&location.args_with_url(location.nowhere_url()), "3s");
    if location.kind() == StoreKind::File {
        assert!(
            nowhere.stderr.contains("mount the backup volume"),
            "a missing directory may be a volume not mounted:\n{nowhere}"
        );
    }
    assert!(location.files()?.is_empty(), "push wrote {:?}", location.files()?);
    Ok(())
}

/// `init --pgdata` records the cluster from its WAL: another cluster's segment is refused from
/// the very first push (exit 3), and the cluster's own is accepted.
#[test]
fn init_with_pgdata_binds_the_repository_to_that_cluster() -> Result<()> {
    let samples = wal_samples();
    let pgdata = walvault_testkit::host::ScratchDir::new("init-pgdata")?;
    let pg_wal = pgdata.subdir("pg_wal")?;
    let (path, name) = samples.segment(1);
    write_for_pg(&pg_wal.join(&name), &samples.bytes(1))?;
    let repo = Repo::uninitialized()?;
    let created = repo
        .init(&["--pgdata", &pgdata.path().display().to_string(), "--json"])
        .check()?;
    let doc: serde_json::Value = serde_json::from_str(&created.stdout)?;
    assert_eq!(
        doc["cluster"]["system_identifier"].as_str(),
        Some(samples.system_identifier.as_str()),
        "{created}"
    );
    assert_eq!(doc["id"].as_str().map(str::len), Some(32), "{created}");

    let (foreign, _) = foreign_wal_samples().segment(0);
    let refused = agents().push(&repo, &foreign, &[]);
    refused.assert_code(exit::REFUSED);
    assert!(!repo.files()?.keys().any(|k| k.starts_with("wal/")));
    agents().push(&repo, &path, &[]).assert_code(exit::SUCCESS);
    assert!(
        !repo.files()?.contains_key("cluster.json"),
        "the descriptor already names the cluster"
    );
    Ok(())
}
