//! Faults a DBA meets on one machine and its object store: a full local disk under the spools,
//! wrong S3 credentials, the usual `AWS_*` conventions, damaged objects in the bucket. What must
//! hold through all of them: no WAL is lost, recovery never ends early on something it could
//! not read, errors say what is wrong in one line, and secrets never reach a log.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use walvault_testkit::agents::{ARCHIVE_AGENT, RESTORE_AGENT, exit};
use walvault_testkit::backup::{self, Restore, take_backup};
use walvault_testkit::daemon::{self, Daemon};
use walvault_testkit::fixtures::{
    RECOVERY_TIMEOUT, archive_everything, archiving_cluster, prepare_restore, segment_range, wal_samples,
};
use walvault_testkit::garage::Garage;
use walvault_testkit::host::{self, Finished};
use walvault_testkit::workload::{self, Workload};
use walvault_testkit::{Cluster, Repo, agents};

/// What the kernel says when a file system is full (ENOSPC).
const ENOSPC: &str = "No space left on device";

/// A small tmpfs mounted over a directory, unmounted when dropped (panics included), so that a
/// failing test never leaves a mount behind in a scratch directory.
#[derive(Debug)]
struct TinyFs {
    dir: PathBuf,
}

impl TinyFs {
    /// Mount a 64 KiB tmpfs on `dir` (created if needed), hand it to the PostgreSQL user, and
    /// fill it with zeros until no more than `room` bytes are left. Fails with a clear message
    /// when the test cannot mount (not root, no CAP_SYS_ADMIN).
    fn mount(dir: &Path, room: u64) -> Result<TinyFs> {
        ensure!(
            host::is_root(),
            "this test fills a file system by mounting a tiny tmpfs, which needs root: run it as root \
             (CI does), it cannot pass otherwise"
        );
        fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(dir)
            .output()
            .context("running mount")?;
        ensure!(
            out.status.success(),
            "cannot mount a tmpfs on {} (this test needs root with CAP_SYS_ADMIN): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let guard = TinyFs {
            dir: dir.to_path_buf(),
        };
        host::give_to_pg_user(dir).with_context(|| format!("chown {}", dir.display()))?;
        host::set_mode(dir, 0o700)?;
        guard.fill(room)?;
        Ok(guard)
    }

    /// Write zeros into `<dir>/zeros` until the file system is full, or `room` bytes are left.
    fn fill(&self, room: u64) -> Result<()> {
        let path = self.dir.join("zeros");
        let mut f = fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let limit = (64 << 10) - room;
        let block = [0u8; 4096];
        let mut written = 0;
        while written < limit {
            match f.write(&block[..(limit - written).min(4096) as usize]) {
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => bail!("filling {}: {e}", path.display()),
            }
        }
        let _ = f.sync_all();
        // Root may write past what the PostgreSQL user may: check from the outside what is left.
        ensure!(
            self.free_bytes()? <= room,
            "{} still has {} bytes free after filling it",
            self.dir.display(),
            self.free_bytes()?
        );
        Ok(())
    }

    /// Free bytes on the mounted file system (`df`).
    fn free_bytes(&self) -> Result<u64> {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.dir)
            .output()
            .context("running df")?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("df printed {text:?}"))
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Something still has a file open there: detach it now, the kernel frees it later.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Lines of `log` that name `what` and say the disk is full.
fn enospc_lines<'a>(log: &'a str, what: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains(what) && l.contains(ENOSPC))
        .collect()
}

/// The daemon's spool and the prefetcher's spool on a full file system: archiving and recovery
/// go on without them, and say why they cannot use them.
#[test]
fn fault_spool_disk_full() -> Result<()> {
    let repo = Repo::new_file()?;
    let mut source = archiving_cluster("spool-full", &repo, "")?;
    let spool = daemon::spool_dir(&source.data_dir());
    // Declared after the cluster: unmounted before the cluster's scratch directory is removed.
    let full = TinyFs::mount(&spool, 0)?;
    let d = Daemon::start(&source, &repo, &[])?;

    workload::create_payload_table(&source)?;
    let base = take_backup(&source, &repo)?;
    let work = Workload {
        scale: 1,
        clients: 2,
        transactions: 300,
        payload_rows: 1500,
    };
    workload::run(&source, &work)?;
    source.execute("SELECT pg_create_restore_point('spool-full')")?;
    let expected = workload::fingerprints(&source)?;
    // After the restore point, in segments of their own: must not be in the restored cluster,
    // yet archived WAL lies ahead of recovery when it stops there.
    source.switch_wal()?;
    workload::insert_payload(&source, 100_001, 100_500)?;
    source.switch_wal()?;
    workload::insert_payload(&source, 100_501, 101_000)?;
    let last = archive_everything(&source)?;

    // No data lost: every segment from the backup on is in the repository, and PostgreSQL's
    // own pushes never failed for want of a spool.
    let segments = segment_range(&base.start_wal, &last)?;
    let missing: Vec<_> = segments.iter().filter(|s| !repo.has_object(s)).collect();
    assert!(
        missing.is_empty(),
        "with the spool full, segments {}..={last} should still all be archived; missing {missing:?}\n{}",
        base.start_wal,
        source.log_tail()
    );
    let failed = source.query_one_string("SELECT failed_count::text FROM pg_stat_archiver")?;
    assert_eq!(
        failed,
        "0",
        "archive_command must not fail because the spool is full:\n{}",
        source.log_tail()
    );
    assert!(
        daemon::archived_markers(&source.data_dir())?.is_empty(),
        "no marker can have been written on a full file system: was the fault applied?"
    );

    // The daemon says why, and keeps running (no crash, no restart loop).
    let daemon_log = d.log();
    let spool_text = spool.display().to_string();
    assert!(
        enospc_lines(&daemon_log, &spool_text)
            .iter()
            .any(|l| l.contains("ERROR")),
        "the daemon should log an error naming its spool {spool_text} and \"{ENOSPC}\":\n{}",
        host::tail(&daemon_log, 40)
    );
    assert_eq!(
        d.http_get("/health")?.trim(),
        "ok",
        "the daemon should still be up"
    );
    let stopped = d.stop()?;
    assert_eq!(
        stopped.code(),
        Some(0),
        "the daemon should stop cleanly:\n{}",
        host::tail(&stopped.log, 30)
    );
    assert_eq!(
        stopped.log.matches("daemon started").count(),
        1,
        "the daemon should have started once:\n{}",
        host::tail(&stopped.log, 30)
    );
    eprintln!(
        "daemon with a full spool, {} ENOSPC lines, e.g.: {}",
        enospc_lines(&stopped.log, &spool_text).len(),
        enospc_lines(&stopped.log, &spool_text)[0]
    );
    source.stop()?;
    drop(full);

    // A point-in-time restore whose prefetch spool has room for its bookkeeping but not for a
    // segment: every fetch falls back to the repository, and recovery reaches the target.
    let mut restored = Cluster::uninitialized("spool-full-restored")?;
    backup::restore(
        &repo,
        &restored.data_dir(),
        &["--target-name", "spool-full", "--target-action", "pause"],
    )?
    .check()
    .context("restore to the restore point")?;
    restored.set_conf(&[("archive_mode", "off")])?;
    let restored_spool = daemon::spool_dir(&restored.data_dir());
    fs::create_dir_all(&restored_spool)?;
    host::give_to_pg_user(&restored_spool)?;
    let prefetch_spool = restored_spool.join("prefetch");
    let nearly_full = TinyFs::mount(&prefetch_spool, 16 << 10)?;
    restored.start()?;
    host::wait_for(
        "recovery to pause at the restore point",
        RECOVERY_TIMEOUT,
        Duration::from_millis(200),
        || {
            let state = restored.query_one_string("SELECT pg_get_wal_replay_pause_state()")?;
            Ok(match state.as_str() {
                "paused" => host::Poll::Done(()),
                _ => host::Poll::Waiting(state),
            })
        },
    )
    .with_context(|| restored.log_tail())?;
    assert_eq!(
        workload::fingerprints(&restored)?,
        expected,
        "paused at the restore point, the data differs from the source's then\n{}",
        restored.log_tail()
    );
    // Paused, with archived WAL ahead of it: a prefetcher that cannot write its spool must not
    // keep downloading and failing (and flooding the server log) while recovery waits.
    let prefetch_text = prefetch_spool.display().to_string();
    let before = enospc_lines(&restored.log(), &prefetch_text).len();
    std::thread::sleep(Duration::from_secs(5));
    let log = restored.log();
    let during_pause = enospc_lines(&log, &prefetch_text).len() - before;
    assert!(
        !enospc_lines(&log, &prefetch_text).is_empty(),
        "the server log should say the prefetch spool {prefetch_text} is full:\n{}",
        host::tail(&log, 60)
    );
    assert!(
        during_pause <= 2,
        "in 5 s of paused recovery the prefetcher logged {during_pause} more ENOSPC lines: it \
         should back off from a full spool\n{}",
        host::tail(&log, 30)
    );
    let prefetched: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(": restored,") && l.contains("prefetched"))
        .collect();
    assert!(
        prefetched.is_empty(),
        "with its spool full, no segment can have come from the prefetcher: {prefetched:#?}"
    );
    restored.execute("SELECT pg_promote()")?;
    host::wait_for(
        "the restored cluster to promote",
        RECOVERY_TIMEOUT,
        Duration::from_millis(200),
        || {
            Ok(
                match restored
                    .query_one_string("SELECT pg_is_in_recovery()::text")?
                    .as_str()
                {
                    "false" => host::Poll::Done(()),
                    other => host::Poll::Waiting(format!("pg_is_in_recovery() = {other}")),
                },
            )
        },
    )
    .with_context(|| restored.log_tail())?;
    assert_eq!(
        workload::fingerprints(&restored)?,
        expected,
        "promoted at the restore point, the data differs from the source's then\n{}",
        restored.log_tail()
    );
    eprintln!(
        "recovery with a full prefetch spool: {} files restored, {} ENOSPC lines ({during_pause} while \
         paused 5 s), e.g.: {}",
        restored.restored_from_archive().len(),
        enospc_lines(&log, &prefetch_text).len(),
        enospc_lines(&log, &prefetch_text)[0]
    );
    restored.stop()?;
    drop(nearly_full);
    Ok(())
}

/// Agent runs in the S3 tests: a little above any `--retry-timeout` they pass.
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// The `--retry-timeout` of the credential tests: a permanent error must not spend it.
const RETRY_TIMEOUT: &str = "30s";

/// How an agent reaches the store: extra flags, and `AWS_*` variables set for it (every other
/// `AWS_*` variable of the test process is removed, so that only what the test gives counts).
#[derive(Debug, Clone)]
struct Access {
    label: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// A command for `agent` as PostgreSQL runs it, with `access`, at log level `level`.
fn agent_command(agent: &str, access: &Access, level: &str) -> Command {
    let mut cmd = agents().command(agent);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("WALVAULT_LOG", level).env("RUST_LOG", level);
    for (k, v) in &access.env {
        cmd.env(k, v);
    }
    cmd
}

/// Run `agent <subcommand> <access flags> <args...>`.
fn run_agent(agent: &str, subcommand: &str, access: &Access, args: &[&str], level: &str) -> Finished {
    let mut cmd = agent_command(agent, access, level);
    cmd.arg(subcommand).args(&access.args).args(args);
    host::run(&mut cmd, RUN_LIMIT).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A random lowercase hex string of `bytes` bytes.
fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Write a config file for the PostgreSQL user.
fn write_config(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    host::write_for_pg(&path, text.as_bytes())?;
    host::set_mode(&path, 0o600)?;
    Ok(path)
}

/// Words by which S3 servers say a request was refused for its credentials.
const AUTH_WORDS: &[&str] = &[
    "forbidden",
    "access denied",
    "accessdenied",
    "invalidaccesskeyid",
    "signaturedoesnotmatch",
    "invalid signature",
    "no such key",
    "invalid key",
    "privileges",
];

/// Whether `line` says the request was refused for its credentials.
fn names_auth_failure(line: &str) -> bool {
    let lower = line.to_lowercase();
    AUTH_WORDS.iter().any(|w| lower.contains(w))
}

/// Panic unless none of `secrets` appears in `text` (from `source`), quoting the lines that
/// hold one (with the secret masked, so that the failure report does not leak it further).
#[track_caller]
fn assert_no_secret(text: &str, secrets: &[String], source: &str) {
    let leaks: Vec<String> = text
        .lines()
        .filter(|l| secrets.iter().any(|s| l.contains(s.as_str())))
        .map(|l| {
            secrets
                .iter()
                .fold(l.to_string(), |l, s| l.replace(s.as_str(), "<SECRET>"))
        })
        .collect();
    assert!(
        leaks.is_empty(),
        "{source} shows a secret (masked here as <SECRET>) in {} line(s):\n{}",
        leaks.len(),
        leaks.join("\n")
    );
}

/// `archive-agent daemon --pgdata <pgdata>` with `access`, logging into a file, until its log
/// satisfies `done` or `limit` has passed (then killed), or until it exits by itself. Returns
/// its log, and its exit code when it exited by itself.
fn daemon_briefly(
    access: &Access,
    pgdata: &Path,
    level: &str,
    limit: Duration,
    done: impl Fn(&str) -> bool,
) -> Result<(String, Option<i32>)> {
    use std::os::unix::process::CommandExt;
    let dir = host::ScratchDir::new("daemon-creds")?;
    let log_path = dir.path().join("daemon.log");
    let log_file = fs::File::create(&log_path)?;
    let mut cmd = agent_command(ARCHIVE_AGENT, access, level);
    cmd.arg("daemon")
        .args(&access.args)
        .arg("--pgdata")
        .arg(pgdata)
        .args(["--rescan-every", "1s"])
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0);
    let mut child = cmd.spawn().context("starting archive-agent daemon")?;
    let read_log = || {
        fs::read(&log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let start = std::time::Instant::now();
    let exited = loop {
        if let Some(status) = child.try_wait()? {
            break status.code();
        }
        if done(&read_log()) || start.elapsed() > limit {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok((read_log(), exited))
}

/// Wrong credentials are a permanent error: every agent says so in one line, at once, with the
/// exit code PostgreSQL needs, and no secret (wrong, right, or session token) ever reaches a
/// log, not even at trace level, not even PostgreSQL's server log.
#[test]
fn fault_wrong_credentials_one_line_no_secret() -> Result<()> {
    let garage = Garage::start(1)?;
    let repo = Repo::new_s3(&garage)?;
    let dir = repo.scratch().subdir("creds")?;
    let right_config = write_config(&dir, "right.toml", &garage.config_toml())?;
    let wrong_secret = random_hex(32);
    let unknown_key = format!("GK{}", random_hex(12));
    let token = format!("wvtoken{}", random_hex(20));
    let wrong_secret_config = write_config(
        &dir,
        "wrong-secret.toml",
        &format!(
            "{}session_token = \"{token}\"\n",
            garage.config_toml().replace(garage.secret(), &wrong_secret)
        ),
    )?;
    let unknown_key_config = write_config(
        &dir,
        "unknown-key.toml",
        &garage.config_toml().replace(garage.key_id(), &unknown_key),
    )?;
    let url = repo.url();
    let with_config = |label: &str, config: &Path| Access {
        label: label.to_string(),
        args: vec![
            "--repo".into(),
            url.clone(),
            "--config".into(),
            config.display().to_string(),
        ],
        env: vec![],
    };
    // Through the environment, which wins over a config file holding the right credentials:
    // so the right secret is in play too, and must not show either.
    let with_env = |label: &str, key: &str, secret: &str, token: Option<&str>| Access {
        label: label.to_string(),
        args: vec![
            "--repo".into(),
            url.clone(),
            "--config".into(),
            right_config.display().to_string(),
        ],
        env: garage
            .env()
            .into_iter()
            .map(|(k, v)| match k {
                "AWS_ACCESS_KEY_ID" => (k.to_string(), key.to_string()),
                "AWS_SECRET_ACCESS_KEY" => (k.to_string(), secret.to_string()),
                _ => (k.to_string(), v),
            })
            .chain(token.map(|t| ("AWS_SESSION_TOKEN".to_string(), t.to_string())))
            .collect(),
    };
    let accesses = [
        with_config("wrong secret in the config file", &wrong_secret_config),
        with_config("unknown access key in the config file", &unknown_key_config),
        with_env(
            "wrong secret in AWS_*",
            garage.key_id(),
            &wrong_secret,
            Some(&token),
        ),
        with_env("unknown access key in AWS_*", &unknown_key, garage.secret(), None),
    ];
    let secrets = [garage.secret().to_string(), wrong_secret.clone(), token.clone()];

    let source = archiving_cluster("creds", &repo, "")?;
    workload::create_payload_table(&source)?;
    let first = source.query_one_string("SELECT pg_walfile_name(pg_current_wal_lsn())")?;
    workload::insert_payload(&source, 1, 200)?;
    let archived = archive_everything(&source)?;
    // A real segment to push, and places to fetch into.
    let wal_path = repo.scratch().subdir("wal")?.join(&archived);
    agents()
        .fetch(&repo, &archived, &wal_path, &[])
        .assert_code(exit::SUCCESS);
    let plain = repo.scratch().subdir("pgdata")?;
    let standby = repo.scratch().subdir("pgdata-standby")?;
    host::write_for_pg(&standby.join("standby.signal"), b"")?;
    let dest = repo.scratch().subdir("pg_wal")?.join("RECOVERYXLOG");
    let (plain, standby) = (plain.display().to_string(), standby.display().to_string());
    let (wal, dest_s) = (wal_path.display().to_string(), dest.display().to_string());
    let data_dir = source.data_dir().display().to_string();
    let conn = source.conn_string();
    let retry = ["--retry-timeout", RETRY_TIMEOUT];

    for access in &accesses {
        for level in ["info", "trace"] {
            let runs = [
                (
                    "push",
                    exit::NOT_FOUND_OR_RETRY,
                    ARCHIVE_AGENT,
                    "push",
                    vec![wal.as_str()],
                ),
                (
                    "fetch",
                    exit::FATAL,
                    RESTORE_AGENT,
                    "fetch",
                    vec!["--pgdata", &plain, &archived, &dest_s],
                ),
                (
                    "fetch in standby mode",
                    exit::NOT_FOUND_OR_RETRY,
                    RESTORE_AGENT,
                    "fetch",
                    vec!["--pgdata", &standby, &archived, &dest_s],
                ),
                ("list", 1, RESTORE_AGENT, "list", vec![]),
                (
                    "backup",
                    1,
                    ARCHIVE_AGENT,
                    "backup",
                    vec!["--pgdata", &data_dir, "--pg-url", &conn],
                ),
            ];
            for (what, code, agent, subcommand, args) in runs {
                let args: Vec<&str> = retry.iter().copied().chain(args).collect();
                let run = run_agent(agent, subcommand, access, &args, level);
                let context = format!("{what} with {} (WALVAULT_LOG={level})", access.label);
                assert_no_secret(&format!("{}\n{}", run.stdout, run.stderr), &secrets, &context);
                assert_eq!(run.code(), Some(code), "{context}: {run}");
                assert!(
                    run.elapsed < Duration::from_secs(15),
                    "{context}: a permanent error must not be retried for the {RETRY_TIMEOUT} \
                     retry timeout, yet it took {:.1?}",
                    run.elapsed
                );
                if level == "info" {
                    let lines: Vec<&str> = run.stderr.lines().collect();
                    assert!(
                        lines.len() == 1 && names_auth_failure(lines[0]),
                        "{context}: expected exactly one line on stderr saying the credentials \
                         were refused (one of {AUTH_WORDS:?}): {run}"
                    );
                }
            }
            assert!(!dest.exists(), "a failed fetch wrote {}", dest.display());
        }
    }

    // PostgreSQL archiving with a wrong secret, the agent at trace level: the server log says
    // why each attempt failed, and holds no secret.
    let bad_command = format!(
        "WALVAULT_LOG=trace RUST_LOG=trace {} push --repo {url} --config {} %p",
        agents().archive_agent().display(),
        wrong_secret_config.display()
    );
    source.set_conf(&[("archive_command", &bad_command)])?;
    source.execute("SELECT pg_reload_conf()")?;
    workload::insert_payload(&source, 201, 400)?;
    let stuck = source.switch_wal()?;
    host::wait_for(
        "PostgreSQL's archiver to fail with the wrong secret",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let failed =
                source.query_one_string("SELECT coalesce(last_failed_wal, '') FROM pg_stat_archiver")?;
            let logged = source
                .log()
                .lines()
                .any(|l| l.contains(&format!("push pg_wal/{stuck}")) && names_auth_failure(l));
            Ok(match failed == stuck && logged {
                true => host::Poll::Done(()),
                false => {
                    host::Poll::Waiting(format!("last_failed_wal {failed:?}, push error logged: {logged}"))
                }
            })
        },
    )
    .with_context(|| source.log_tail())?;
    assert_no_secret(&source.log(), &secrets, "PostgreSQL's server log");
    eprintln!(
        "PostgreSQL's server log, archiving with a wrong secret: {}",
        source
            .log()
            .lines()
            .find(|l| l.contains(&format!("push pg_wal/{stuck}")) && names_auth_failure(l))
            .unwrap_or_default()
    );

    // The daemon, with the .ready file PostgreSQL could not archive.
    for access in &accesses {
        for level in ["info", "trace"] {
            let context = format!("the daemon with {} (WALVAULT_LOG={level})", access.label);
            let failed_upload = |log: &str| {
                log.lines()
                    .any(|l| l.contains(&format!("daemon {stuck}:")) && names_auth_failure(l))
            };
            let (log, exited) = daemon_briefly(
                access,
                &source.data_dir(),
                level,
                Duration::from_secs(20),
                |log| failed_upload(log),
            )?;
            assert_no_secret(&log, &secrets, &context);
            eprintln!(
                "{context}: {} lines, exited: {exited:?}, e.g. {}",
                log.lines().count(),
                log.lines().find(|l| failed_upload(l)).unwrap_or_default()
            );
            if let Some(code) = exited {
                // Giving up at once on a permanent error is fine too: with one clear line.
                let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
                assert!(
                    code != 0 && errors.len() == 1 && names_auth_failure(errors[0]),
                    "{context}: exited with {code}, expected one error line saying the credentials \
                     were refused:\n{log}"
                );
            } else {
                assert!(
                    failed_upload(&log),
                    "{context}: within 20 s it should have said why it cannot upload {stuck}:\n{}",
                    host::tail(&log, 30)
                );
            }
            if level == "info" {
                let noisy: Vec<&str> = log
                    .lines()
                    .filter(|l| (l.contains("WARN") || l.contains("ERROR")) && !names_auth_failure(l))
                    .collect();
                assert!(
                    noisy.is_empty(),
                    "{context}: every warning should name the cause:\n{}",
                    noisy.join("\n")
                );
            }
        }
    }
    assert!(
        !repo.has_object(&stuck),
        "{stuck} reached the repository with wrong credentials?"
    );

    // Credentials fixed: PostgreSQL's retries archive everything, nothing was lost meanwhile.
    source.set_conf(&[("archive_command", &agents().archive_command(&repo, ""))])?;
    source.execute("SELECT pg_reload_conf()")?;
    let last = archive_everything(&source)?;
    let missing: Vec<String> = segment_range(&first, &last)?
        .into_iter()
        .filter(|s| !repo.has_object(s))
        .collect();
    assert!(
        missing.is_empty(),
        "once the credentials are right again, every segment should be archived; missing {missing:?}"
    );
    Ok(())
}

/// A config file with a slip on the secret's line: the agents refuse it in one line that names
/// the file, and never quote the secret (their errors go to PostgreSQL's server log); `--help`
/// never shows it either. No server is needed: the file is refused before any request.
#[test]
fn fault_malformed_config_never_shows_secret() -> Result<()> {
    let scratch = host::ScratchDir::new("malformed")?;
    let dir = scratch.path();
    let url = "s3://walvault-test/malformed";
    let right = random_hex(32);
    let good = format!(
        "[s3]\nendpoint = \"http://127.0.0.1:9\"\nregion = \"garage\"\naccess_key_id = \"GK{}\"\n\
         secret_access_key = \"{right}\"\nallow_http = true\n",
        random_hex(12)
    );
    let wal = "pg_wal/000000010000000000000001";
    let dest = dir.join("RECOVERYXLOG").display().to_string();
    let dest = dest.as_str();
    let hex = random_hex(20);
    // An all-digit secret that TOML reads as an integer when unquoted (16 digits, no leading 0).
    let digits = format!(
        "{}{:015}",
        rand::random_range(1..10u8),
        rand::random_range(0..10u64.pow(15))
    );
    let slips = [
        ("an unterminated string", format!("secret_access_key = \"{hex}\n")),
        (
            "a missing opening quote",
            format!("secret_access_key = {hex}\"\n"),
        ),
        ("no quotes", format!("secret_access_key = {hex}\n")),
        (
            "no quotes around an all-digit secret",
            format!("secret_access_key = {digits}\n"),
        ),
        (
            "text after the value",
            format!("secret_access_key = \"{hex}\" {hex}\n"),
        ),
        ("a misspelt key", format!("secret_acess_key = \"{hex}\"\n")),
    ];
    let secrets = [hex.clone(), digits.clone(), right.clone()];
    let mut problems = Vec::new();
    for (i, (slip, line)) in slips.iter().enumerate() {
        let text: String = good
            .lines()
            .map(|l| match l.starts_with("secret_access_key") {
                true => line.clone(),
                false => format!("{l}\n"),
            })
            .collect();
        let config = write_config(dir, &format!("slip{i}.toml"), &text)?;
        let access = Access {
            label: slip.to_string(),
            args: vec![
                "--repo".into(),
                url.into(),
                "--config".into(),
                config.display().to_string(),
            ],
            env: vec![],
        };
        let runs = [
            ("push", run_agent(ARCHIVE_AGENT, "push", &access, &[wal], "info")),
            (
                "fetch",
                run_agent(
                    RESTORE_AGENT,
                    "fetch",
                    &access,
                    &["00000001000000000000000A", dest],
                    "info",
                ),
            ),
            ("list", run_agent(RESTORE_AGENT, "list", &access, &[], "info")),
        ];
        for (what, run) in runs {
            let shown = format!("{}\n{}", run.stdout, run.stderr);
            let lines: Vec<&str> = run.stderr.lines().collect();
            if secrets.iter().any(|s| shown.contains(s.as_str())) {
                let masked = secrets
                    .iter()
                    .fold(shown.clone(), |t, s| t.replace(s.as_str(), "<SECRET>"));
                problems.push(format!(
                    "{what} with {slip}: the output quotes the secret: {}",
                    masked.trim()
                ));
            } else if run.status.success()
                || lines.len() != 1
                || !lines[0].contains(&config.display().to_string())
            {
                problems.push(format!(
                    "{what} with {slip}: expected a failure in one line naming {}: {run}",
                    config.display()
                ));
            }
        }
        // --help reads no config file, whatever WALVAULT_CONFIG and AWS_* say.
        for (agent, sub) in [
            (ARCHIVE_AGENT, "push"),
            (RESTORE_AGENT, "fetch"),
            (ARCHIVE_AGENT, "daemon"),
        ] {
            let mut cmd = agent_command(agent, &access, "trace");
            cmd.env("WALVAULT_CONFIG", &config)
                .env("AWS_SECRET_ACCESS_KEY", &hex)
                .args([sub, "--help"]);
            let run = host::run(&mut cmd, RUN_LIMIT)?;
            let shown = format!("{}\n{}", run.stdout, run.stderr);
            if !run.status.success() || secrets.iter().any(|s| shown.contains(s.as_str())) {
                problems.push(format!("{agent} {sub} --help with {slip}: {run}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "malformed config files (the secret masked as <SECRET>):\n{}",
        problems.join("\n")
    );
    Ok(())
}

/// The usual conventions: with only `AWS_*` variables (no config file) push and fetch work, and
/// when both are set, the environment wins over the config file's `[s3]` table.
#[test]
fn fault_aws_env_conventions() -> Result<()> {
    let garage = Garage::start(1)?;
    let repo = Repo::new_s3(&garage)?;
    let samples = wal_samples();
    let url = repo.url();
    let env: Vec<(String, String)> = garage
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let env_only = Access {
        label: "only AWS_* variables".into(),
        args: vec!["--repo".into(), url.clone()],
        env: env.clone(),
    };
    // A config file that would fail on every count: dead endpoint, unknown key, wrong secret.
    let dir = repo.scratch().subdir("env")?;
    let wrong = write_config(
        &dir,
        "wrong.toml",
        &format!(
            "[s3]\nendpoint = \"http://127.0.0.1:9\"\nregion = \"nowhere\"\naccess_key_id = \"GK{}\"\n\
             secret_access_key = \"{}\"\nallow_http = true\n",
            random_hex(12),
            random_hex(32)
        ),
    )?;
    let env_over_file = Access {
        label: "AWS_* variables over a wrong config file".into(),
        args: vec![
            "--repo".into(),
            url.clone(),
            "--config".into(),
            wrong.display().to_string(),
        ],
        env,
    };
    let dest_dir = repo.scratch().subdir("pg_wal")?;
    for (i, access) in [&env_only, &env_over_file].into_iter().enumerate() {
        let (path, name) = samples.segment(i);
        let path = path.display().to_string();
        let push = run_agent(
            ARCHIVE_AGENT,
            "push",
            access,
            &["--retry-timeout", "10s", &path],
            "info",
        );
        assert_eq!(
            push.code(),
            Some(exit::SUCCESS),
            "push with {}: {push}",
            access.label
        );
        assert!(
            repo.has_object(&name),
            "push with {} said it archived {name}, the bucket has no {}",
            access.label,
            repo.object_key(&name)
        );
        let dest = dest_dir.join("RECOVERYXLOG");
        let dest_s = dest.display().to_string();
        let fetch = run_agent(
            RESTORE_AGENT,
            "fetch",
            access,
            &["--retry-timeout", "10s", &name, &dest_s],
            "info",
        );
        assert_eq!(
            fetch.code(),
            Some(exit::SUCCESS),
            "fetch with {}: {fetch}",
            access.label
        );
        assert!(
            fs::read(&dest)? == samples.bytes(i),
            "fetch with {} restored other bytes than {name} holds",
            access.label
        );
        fs::remove_file(&dest)?;
        let list = run_agent(RESTORE_AGENT, "list", access, &[], "info");
        assert!(
            list.status.success() && list.stdout.contains(&url),
            "list with {}: {list}",
            access.label
        );
    }
    // The file still counts for what the environment leaves unset: only the secret from AWS_*,
    // wrong, over an otherwise right file, fails.
    let right = write_config(&dir, "right.toml", &garage.config_toml())?;
    let wrong_secret_env = Access {
        label: "a wrong AWS_SECRET_ACCESS_KEY over a right config file".into(),
        args: vec![
            "--repo".into(),
            url.clone(),
            "--config".into(),
            right.display().to_string(),
        ],
        env: vec![("AWS_SECRET_ACCESS_KEY".into(), random_hex(32))],
    };
    let (path, _) = samples.segment(2);
    let push = run_agent(
        ARCHIVE_AGENT,
        "push",
        &wrong_secret_env,
        &[&path.display().to_string()],
        "info",
    );
    assert_eq!(
        push.code(),
        Some(exit::NOT_FOUND_OR_RETRY),
        "push with {}: {push}",
        wrong_secret_env.label
    );
    Ok(())
}

/// Damaged objects in the bucket stop recovery, never end it: a truncated WAL object makes
/// PostgreSQL stop with FATAL naming it, without promoting (once the object is repaired, the same
/// recovery completes with the right data); a damaged chunk makes `restore-agent restore` fail,
/// naming it, without leaving a data directory behind.
#[test]
fn fault_truncated_and_corrupt_objects_on_s3_stop_recovery() -> Result<()> {
    let garage = Garage::start(1)?;
    let repo = Repo::new_s3(&garage)?;
    let mut source = archiving_cluster("s3-damage", &repo, "")?;
    workload::create_payload_table(&source)?;
    take_backup(&source, &repo)?;
    let mut restored = source.base_backup("s3-damage-replay")?;
    let first = restored.backup_start_segment()?;
    let work = Workload {
        scale: 1,
        clients: 2,
        transactions: 300,
        payload_rows: 1500,
    };
    workload::run(&source, &work)?;
    // More segments, each with rows of its own, so the damaged one sits in the middle of replay.
    for i in 0..3 {
        workload::insert_payload(&source, 10_001 + i * 300, 10_300 + i * 300)?;
        source.switch_wal()?;
    }
    let last = archive_everything(&source)?;
    let expected = workload::fingerprints(&source)?;
    source.stop()?;

    let segments = segment_range(&first, &last)?;
    assert!(
        segments.len() >= 4,
        "the workload should span several segments: {first}..={last}"
    );
    let victim = &segments[segments.len() / 2];
    let before_victim = &segments[segments.len() / 2 - 1];
    let key = repo.object_key(victim);
    let original = repo.read(&key)?;
    repo.truncate(&key, original.len() / 2)?;

    prepare_restore(&restored, &repo, "--retry-timeout 2s")?;
    let log = restored.start_expect_failure(RECOVERY_TIMEOUT)?;
    assert!(
        log.lines()
            .any(|l| l.contains("FATAL") && l.contains(victim.as_str())),
        "recovery must stop with a FATAL naming {victim}:\n{}",
        host::tail(&log, 40)
    );
    assert!(
        log.lines()
            .any(|l| l.contains(victim.as_str()) && l.contains(&key) && l.contains("corrupt")),
        "restore-agent must say the object {key} is corrupt:\n{}",
        host::tail(&log, 40)
    );
    assert!(
        log.contains(&format!("restored log file \"{before_victim}\" from archive")),
        "recovery should have replayed up to the damaged segment:\n{}",
        host::tail(&log, 40)
    );
    for promoted in [
        "archive recovery complete",
        "selected new timeline",
        "database system is ready to accept connections",
    ] {
        assert!(
            !log.contains(promoted),
            "recovery ended early at a damaged object (\"{promoted}\"):\n{}",
            host::tail(&log, 40)
        );
    }
    eprintln!(
        "recovery at a truncated object: {}",
        log.lines()
            .find(|l| l.contains("FATAL") && l.contains(victim.as_str()))
            .unwrap_or_default()
    );
    restored.assert_stopped_in_recovery_on_timeline_1()?;

    // The object repaired, the same recovery resumes and completes with the source's data.
    repo.write(&key, &original)?;
    restored.start_and_wait_recovery_end(RECOVERY_TIMEOUT)?;
    assert_eq!(
        workload::fingerprints(&restored)?,
        expected,
        "after the repair, recovery should rebuild the source's data\n{}",
        restored.log_tail()
    );
    restored.stop()?;

    // A damaged chunk, flipped or cut short: the restore fails, names it, leaves nothing.
    let (chunk_key, _) = repo
        .backup_objects()?
        .into_iter()
        .max_by_key(|(_, size)| *size)
        .context("the backup stored no chunk")?;
    let chunk_id = Repo::object_id(&chunk_key).context("chunk key")?;
    let chunk = repo.read(&chunk_key)?;
    for damage in ["a flipped byte", "truncation"] {
        match damage {
            "truncation" => repo.truncate(&chunk_key, chunk.len() / 2)?,
            _ => repo.flip_middle_byte(&chunk_key)?,
        }
        let target = Cluster::uninitialized("s3-damage-restore")?;
        let run = backup::restore(&repo, &target.data_dir(), &[])?;
        assert!(
            !run.status.success(),
            "restore with {damage} in chunk {chunk_id} should fail: {run}"
        );
        assert!(
            run.stderr.contains(&chunk_id),
            "restore with {damage} should name the chunk {chunk_id}: {run}"
        );
        assert!(
            !target.data_dir().exists(),
            "a failed restore ({damage}) should leave no data directory, found {:?}",
            host::snapshot(&target.data_dir())?.map(|s| s.len())
        );
        eprintln!("restore with {damage} in a chunk: {}", run.stderr.trim());
        repo.write(&chunk_key, &chunk)?;
    }
    // Repaired: the same restore succeeds, and recovery rebuilds the source's data.
    let (mut target, _) = backup::restore_new_cluster(&repo, "s3-damage-repaired", Restore::default())?;
    target.start_and_wait_recovery_end(RECOVERY_TIMEOUT)?;
    assert_eq!(
        workload::fingerprints(&target)?,
        expected,
        "restored once the chunk was repaired, the data differs from the source's\n{}",
        target.log_tail()
    );
    target.stop()?;
    Ok(())
}
