//! The push/fetch rules PostgreSQL relies on, exercised through the library on synthetic but
//! well-formed segments (the end-to-end tests in `tests/` repeat them with a real PostgreSQL).

use std::path::{Path, PathBuf};
use std::time::Duration;

use walvault::commands::fetch::{self, FetchError, FetchOutcome};
use walvault::commands::push::{self, PushError};
use walvault::config::Settings;
use walvault::exit;
use walvault::wal::WalFileName;
use walvault::wal::page::synthetic_segment;

const SEG: u32 = 1 << 20; // 1 MiB segments keep these tests small
const SYSID: u64 = 7_441_000_000_000_000_001;

struct Env {
    dir: tempfile::TempDir,
    settings: Settings,
}

impl Env {
    /// A location with a repository created by `init` (not bound to any cluster yet).
    async fn new() -> Env {
        let env = Env::uninitialized();
        walvault::repo::Writer::init(&env.settings.repo, &env.settings.store_options(), None, 0, false)
            .await
            .unwrap();
        env
    }

    /// A location with no repository.
    fn uninitialized() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            repo: format!("file://{}/repo", dir.path().display()).parse().unwrap(),
            fallback_repo: None,
            compress_level: 3,
            retry_timeout: Duration::from_millis(300),
            s3: Default::default(),
            azure: Default::default(),
            gcs: Default::default(),
            retention: Default::default(),
            key: None,
            key_from_env: false,
            page_checksums: true,
            max_rate: None,
            rate_limit: None,
        };
        Env { dir, settings }
    }
    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }
    fn write(&self, name: &str, content: &[u8]) -> PathBuf {
        let path = self.dir.path().join("pg_wal").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
        path
    }
    /// Every file in the repository but its descriptor.
    fn files_in_repo(&self) -> Vec<PathBuf> {
        fn walk(p: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(p).unwrap() {
                let e = e.unwrap().path();
                if e.is_dir() { walk(&e, out) } else { out.push(e) }
            }
        }
        let mut out = vec![];
        if self.repo().exists() {
            walk(&self.repo(), &mut out);
        }
        out.retain(|p| *p != self.repo().join("walvault.json"));
        out.sort();
        out
    }
}

fn segment(name: &str, sysid: u64) -> Vec<u8> {
    let WalFileName::Segment(s) = name.parse::<WalFileName>().unwrap() else {
        panic!()
    };
    let mut bytes = synthetic_segment(&s, sysid, SEG);
    // Some content beyond the header, so a change there is a real content change.
    for (i, b) in bytes[8192..16384].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    bytes
}

const S1: &str = "000000010000000000000001";

#[tokio::test]
async fn push_then_fetch_returns_the_same_bytes() {
    let env = Env::new().await;
    let content = segment(S1, SYSID);
    let out = push::push(&env.settings, &env.write(S1, &content)).await.unwrap();
    assert!(out.newly_stored);
    assert!(out.stored_size < content.len() as u64 / 10, "zeros compress");
    let dest = env.dir.path().join("RECOVERYXLOG");
    let fetched = fetch::fetch(&env.settings, S1, &dest, None).await.unwrap();
    assert!(matches!(fetched, FetchOutcome::Restored { size, .. } if size == content.len() as u64));
    assert_eq!(std::fs::read(&dest).unwrap(), content);
}

#[tokio::test]
async fn same_name_same_bytes_is_success_different_bytes_is_refused_and_kept() {
    let env = Env::new().await;
    let original = segment(S1, SYSID);
    push::push(&env.settings, &env.write(S1, &original))
        .await
        .unwrap();
    let again = push::push(&env.settings, &env.write(S1, &original))
        .await
        .unwrap();
    assert!(!again.newly_stored);

    let mut changed = original.clone();
    changed[10_000] ^= 0xFF;
    let err = push::push(&env.settings, &env.write(S1, &changed))
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), exit::REFUSED);
    let msg = err.to_string();
    assert!(
        msg.contains(&blake3::hash(&original).to_hex().to_string()),
        "{msg}"
    );
    assert!(
        msg.contains(&blake3::hash(&changed).to_hex().to_string()),
        "{msg}"
    );

    let dest = env.dir.path().join("out");
    fetch::fetch(&env.settings, S1, &dest, None).await.unwrap();
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        original,
        "the archived copy was not overwritten"
    );
}

#[tokio::test]
async fn history_files_are_never_overwritten() {
    let env = Env::new().await;
    let first = b"1\t0/3000060\tno recovery target specified\n";
    push::push(&env.settings, &env.write("00000002.history", first))
        .await
        .unwrap();
    let other = b"1\t0/4000060\tno recovery target specified\n";
    let err = push::push(&env.settings, &env.write("00000002.history", other))
        .await
        .unwrap_err();
    assert!(matches!(err, PushError::Conflict { .. }), "{err}");
    let dest = env.dir.path().join("h");
    fetch::fetch(&env.settings, "00000002.history", &dest, None)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), first);
}

#[tokio::test]
async fn wal_from_another_cluster_is_refused() {
    let env = Env::new().await;
    push::push(&env.settings, &env.write(S1, &segment(S1, SYSID)))
        .await
        .unwrap();
    let before = env.files_in_repo();
    let s2 = "000000010000000000000002";
    let err = push::push(&env.settings, &env.write(s2, &segment(s2, SYSID + 1)))
        .await
        .unwrap_err();
    assert!(matches!(err, PushError::ForeignCluster { .. }), "{err}");
    assert_eq!(err.exit_code(), exit::REFUSED);
    assert!(
        err.to_string().contains(&SYSID.to_string()) && err.to_string().contains(&(SYSID + 1).to_string())
    );
    assert_eq!(env.files_in_repo(), before);
}

#[tokio::test]
async fn content_that_does_not_match_its_name_is_refused() {
    let env = Env::new().await;
    let err = push::push(
        &env.settings,
        &env.write("000000010000000000000002", &segment(S1, SYSID)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, PushError::InvalidWal { .. }), "{err}");
    let err = push::push(&env.settings, &env.write(S1, &vec![0u8; SEG as usize]))
        .await
        .unwrap_err();
    assert!(matches!(err, PushError::InvalidWal { .. }), "{err}");
    assert!(env.files_in_repo().is_empty());
}

#[tokio::test]
async fn invalid_names_touch_nothing() {
    let env = Env::new().await;
    for bad in [
        "foo",
        "00000001000000000000000",
        "000000010000000000000001.tmp",
        "x\u{1}",
    ] {
        let err = push::push(&env.settings, &env.write(bad, b"x"))
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), exit::USAGE, "{bad}");
        let err = fetch::fetch(&env.settings, bad, &env.dir.path().join("d"), None)
            .await
            .unwrap_err();
        // A name PostgreSQL never asks for: a misconfigured restore_command, never "missing".
        assert_eq!(err.exit_code(false), exit::FATAL, "{bad}");
        assert_eq!(err.exit_code(true), exit::NOT_FOUND_OR_RETRY, "{bad}");
    }
    for bad in ["../x", "/etc/passwd", ""] {
        let err = fetch::fetch(&env.settings, bad, &env.dir.path().join("d"), None)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Name(_)), "{bad}");
    }
    assert!(env.files_in_repo().is_empty());
    assert!(!env.dir.path().join("d").exists());
}

#[tokio::test]
async fn missing_file_is_not_found_only_in_a_real_repository() {
    let env = Env::uninitialized();
    // No repository at all: must not look like "end of archive".
    let err = fetch::fetch(&env.settings, S1, &env.dir.path().join("d"), None)
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(false), exit::FATAL);
    assert_eq!(err.exit_code(true), exit::NOT_FOUND_OR_RETRY);
    // Nor is push allowed to create one: it fails, PostgreSQL keeps the file and retries.
    let err = push::push(&env.settings, &env.write(S1, &segment(S1, SYSID)))
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), exit::NOT_FOUND_OR_RETRY, "{err}");
    assert!(env.files_in_repo().is_empty());
    std::fs::create_dir_all(env.repo()).unwrap();
    let err = push::push(&env.settings, &env.write(S1, &segment(S1, SYSID)))
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), exit::NOT_FOUND_OR_RETRY, "{err}");
    assert!(err.to_string().contains("archive-agent init"), "{err}");
    assert!(
        env.files_in_repo().is_empty(),
        "push wrote into a location that holds no repository"
    );
    let err = fetch::fetch(&env.settings, S1, &env.dir.path().join("d"), None)
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(false), exit::FATAL, "{err}");
    walvault::repo::Writer::init(&env.settings.repo, &env.settings.store_options(), None, 0, false)
        .await
        .unwrap();
    push::push(&env.settings, &env.write(S1, &segment(S1, SYSID)))
        .await
        .unwrap();
    let out = fetch::fetch(
        &env.settings,
        "000000010000000000000002",
        &env.dir.path().join("d"),
        None,
    )
    .await;
    assert!(matches!(out, Ok(FetchOutcome::NotFound { .. })));
    assert!(!env.dir.path().join("d").exists());
}

#[tokio::test]
async fn corrupt_or_truncated_objects_are_fatal_and_never_written_out() {
    let env = Env::new().await;
    push::push(&env.settings, &env.write(S1, &segment(S1, SYSID)))
        .await
        .unwrap();
    let object = env.repo().join("wal/0000000100000000").join(format!("{S1}.wvo"));
    let good = std::fs::read(&object).unwrap();
    let dest = env.dir.path().join("d");

    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    std::fs::write(&object, &flipped).unwrap();
    let err = fetch::fetch(&env.settings, S1, &dest, None).await.unwrap_err();
    assert!(matches!(err, FetchError::Corrupt { .. }), "{err}");
    assert_eq!(err.exit_code(false), exit::FATAL);
    assert!(err.to_string().contains(S1));

    std::fs::write(&object, &good[..good.len() - 7]).unwrap();
    let err = fetch::fetch(&env.settings, S1, &dest, None).await.unwrap_err();
    assert!(matches!(err, FetchError::Corrupt { .. }), "{err}");
    assert!(!dest.exists());

    // A corrupt stored copy is not "already archived" either: push refuses and keeps it for a human.
    let err = push::push(&env.settings, &env.write(S1, &segment(S1, SYSID)))
        .await
        .unwrap_err();
    assert!(matches!(err, PushError::StoredCorrupt { .. }), "{err}");
}

/// A repository whose volume is mounted late (the directory appears within the retry budget) is
/// waited for by fetch rather than reported as an error at once (push opens the same way; a
/// missing directory is never created, see `missing_file_is_not_found_only_in_a_real_repository`).
#[tokio::test]
async fn a_repository_mounted_late_is_waited_for() {
    let mut env = Env::new().await;
    env.settings.retry_timeout = Duration::from_secs(10);
    push::push(&env.settings, &env.write(S1, &segment(S1, SYSID)))
        .await
        .unwrap();
    let aside = env.dir.path().join("unmounted");
    std::fs::rename(env.repo(), &aside).unwrap();
    let (repo, back) = (env.repo(), aside.clone());
    let mount = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        std::fs::rename(back, repo).unwrap();
    });
    let dest = env.dir.path().join("d");
    let out = fetch::fetch(&env.settings, S1, &dest, None).await.unwrap();
    assert!(matches!(out, FetchOutcome::Restored { .. }), "{out:?}");
    mount.await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), segment(S1, SYSID));
}

/// For the replay progress line, a fetch of a segment also reads the newest transaction end its
/// summary records; a summary that is missing or corrupt is left out, never a failed fetch.
#[tokio::test]
async fn a_fetch_for_replay_reads_the_newest_commit_and_never_fails_on_it() {
    use walvault::repo::object::{ObjectKind, SealedObject};
    let env = Env::new().await;
    let content = segment(S1, SYSID);
    push::push(&env.settings, &env.write(S1, &content)).await.unwrap();
    let dest = env.dir.path().join("RECOVERYXLOG");
    let seg = S1.parse::<WalFileName>().unwrap().wal_segment().unwrap();
    let summary_path = env.repo().join(walvault::timeindex::summary_key(&seg));
    std::fs::create_dir_all(summary_path.parent().unwrap()).unwrap();
    let fetch = || fetch::fetch_for_replay(&env.settings, S1, &dest, None, true);
    #[track_caller]
    fn assert_restored_without_commit_time(out: &FetchOutcome) {
        assert!(
            matches!(
                out,
                FetchOutcome::Restored {
                    latest_commit: None,
                    ..
                }
            ),
            "{out:?}"
        );
    }

    // 2026-11-22 12:00:00 UTC, as a TimestampTz (microseconds since 2000-01-01).
    let unix = 1_795_348_800_000_000i64;
    let pg = unix - walvault::time::PG_EPOCH_OFFSET_MICROS;
    let stored = serde_json::json!({
        "format": "walvault-segment-summary", "version": 1, "segment": S1,
        "summary": {
            "start": "0/1000000", "pg_version": 15, "end_of_records": "0/1000000", "records": 1,
            "first_record": null, "last_record": null, "commits": 1, "aborts": 0,
            "first_commit": pg, "last_commit": pg, "min_commit": pg, "max_commit": pg,
            "restore_points": [], "ends_with_switch": false, "skipped_continuation": false,
            "end_of_wal": null
        }
    });
    let sealed = SealedObject::seal(ObjectKind::Summary, S1, stored.to_string().as_bytes(), 3).unwrap();
    std::fs::write(&summary_path, &sealed.bytes).unwrap();
    let out = fetch().await.unwrap();
    assert!(
        matches!(out, FetchOutcome::Restored { latest_commit: Some(t), .. } if t == unix),
        "{out:?}"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), content);

    std::fs::write(&summary_path, b"not a sealed object").unwrap();
    let out = fetch().await.unwrap();
    assert_restored_without_commit_time(&out);
    std::fs::remove_file(&summary_path).unwrap();
    let out = fetch().await.unwrap();
    assert_restored_without_commit_time(&out);
    // A plain fetch does not ask.
    std::fs::write(&summary_path, &sealed.bytes).unwrap();
    let out = fetch::fetch(&env.settings, S1, &dest, None).await.unwrap();
    assert_restored_without_commit_time(&out);
}
