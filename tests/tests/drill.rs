//! `restore-agent drill` against a real PostgreSQL and repository: a drill that passes leaves
//! evidence with measured RTO and RPO and every check; a drill fails, naming what failed, when a
//! `--check-sql` query returns false and when a chunk of the backup is missing.

use std::fs;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use walvault_testkit::agents::RESTORE_AGENT;
use walvault_testkit::backup::take_backup;
use walvault_testkit::fixtures::{archive_everything, archiving_cluster};
use walvault_testkit::host::{Finished, ScratchDir, write_for_pg};
use walvault_testkit::{Cluster, Repo, agents};

/// A repository with one backup of a 20 000-row table, more rows archived after it.
fn repository(name: &str) -> Result<(Repo, Cluster)> {
    let repo = Repo::new()?;
    let source = archiving_cluster(name, &repo, "")?;
    source.execute(
        "CREATE TABLE accounts (id integer PRIMARY KEY, balance bigint NOT NULL);
         INSERT INTO accounts SELECT g, g * 10 FROM generate_series(1, 20000) g",
    )?;
    take_backup(&source, &repo)?;
    source.execute("INSERT INTO accounts SELECT g, g * 10 FROM generate_series(20001, 25000) g")?;
    archive_everything(&source)?;
    Ok((repo, source))
}

/// Run a drill with evidence in `scratch/evidence.json`; the run and the evidence.
fn drill(repo: &Repo, scratch: &ScratchDir, extra: &[&str]) -> Result<(Finished, Value)> {
    let evidence = scratch.path().join("evidence.json");
    let mut args = vec!["drill".to_string()];
    args.extend(repo.args());
    args.extend(
        [
            "--scratch",
            scratch.path().to_str().context("utf-8")?,
            "--json",
            evidence.to_str().context("utf-8")?,
            "--timeout",
            "5m",
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let run = agents().run(RESTORE_AGENT, args);
    let text = fs::read_to_string(&evidence).with_context(|| format!("no evidence written: {run}"))?;
    let json: Value = serde_json::from_str(&text).with_context(|| format!("evidence JSON: {text}"))?;
    fs::remove_file(&evidence)?;
    Ok((run, json))
}

fn check<'a>(evidence: &'a Value, name: &str) -> Option<&'a Value> {
    evidence["checks"]
        .as_array()?
        .iter()
        .find(|c| c["name"].as_str().is_some_and(|n| n.contains(name)))
}

/// Nothing but the evidence is left in the scratch directory.
fn assert_cleaned(scratch: &ScratchDir) -> Result<()> {
    let left: Vec<_> = fs::read_dir(scratch.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("walvault-drill-"))
        .collect();
    ensure!(
        left.is_empty(),
        "the drill must remove its scratch directory: {left:?}"
    );
    Ok(())
}

#[test]
fn a_drill_passes_with_measured_rto_and_rpo_and_every_check() -> Result<()> {
    let (repo, mut source) = repository("drill-pass")?;
    source.stop()?;
    let scratch = ScratchDir::new("drill-pass")?;
    let checks = scratch.path().join("checks.sql");
    write_for_pg(
        &checks,
        b"-- the drill's own checks\nSELECT count(*) = 25000 FROM accounts;\nSELECT sum(balance) = 3125125000 FROM accounts;\n",
    )?;
    let (run, ev) = drill(
        &repo,
        &scratch,
        &[
            "--check-sql",
            checks.to_str().context("utf-8")?,
            "--amcheck",
            "--rto-target",
            "30m",
            "--rpo-target",
            "1h",
        ],
    )?;
    ensure!(run.code() == Some(0), "the drill must pass: {run}\n{ev:#}");
    ensure!(ev["outcome"] == "passed" && ev["failure"].is_null(), "{ev:#}");
    let rto = ev["rto"]["measured_seconds"].as_f64().context("RTO measured")?;
    let rpo = ev["rpo"]["measured_seconds"].as_f64().context("RPO measured")?;
    ensure!(
        rto > 0.0 && ev["rto"]["target_seconds"] == 1800.0 && ev["rto"]["met"] == true,
        "{ev:#}"
    );
    ensure!(
        rpo >= 0.0 && ev["rpo"]["target_seconds"] == 3600.0 && ev["rpo"]["met"] == true,
        "{ev:#}"
    );
    ensure!(ev["segments_replayed"].as_u64().is_some_and(|n| n >= 1), "{ev:#}");
    ensure!(
        ev["bytes_restored"].as_u64().is_some_and(|n| n > 1 << 20),
        "{ev:#}"
    );
    for name in [
        "restore",
        "recovery target reached",
        "databases accept connections",
        "checks.sql query 1",
        "checks.sql query 2",
        "amcheck postgres",
    ] {
        let c = check(&ev, name).with_context(|| format!("no check {name:?}: {ev:#}"))?;
        ensure!(c["passed"] == true, "check {name:?} must pass: {c}");
    }
    println!("{}", run.stdout);
    ensure!(run.stdout.contains("PASSED"), "a summary on stdout: {run}");
    assert_cleaned(&scratch)?;

    // A random instant of the window, with an RPO target it cannot meet: the drill restores,
    // and fails on the objective alone.
    let (run, ev) = drill(&repo, &scratch, &["--target", "random", "--rpo-target", "0s"])?;
    ensure!(
        run.code() == Some(1),
        "an RPO target of 0s is never met: {run}\n{ev:#}"
    );
    ensure!(ev["target_time"].is_string(), "{ev:#}");
    ensure!(
        check(&ev, "recovery target reached").is_some_and(|c| c["passed"] == true),
        "{ev:#}"
    );
    ensure!(
        ev["rpo"]["met"] == false && ev["failure"] == "the RPO target was not met",
        "{ev:#}"
    );
    assert_cleaned(&scratch)?;
    Ok(())
}

#[test]
fn a_drill_fails_naming_a_false_check_or_a_missing_chunk() -> Result<()> {
    let (repo, mut source) = repository("drill-fail")?;
    source.stop()?;
    let scratch = ScratchDir::new("drill-fail")?;
    let checks = scratch.path().join("wrong.sql");
    write_for_pg(&checks, b"SELECT true;\nSELECT count(*) = 1 FROM accounts\n")?;
    let (run, ev) = drill(
        &repo,
        &scratch,
        &["--check-sql", checks.to_str().context("utf-8")?],
    )?;
    ensure!(
        run.code() == Some(1),
        "a false check fails the drill: {run}\n{ev:#}"
    );
    ensure!(ev["outcome"] == "failed", "{ev:#}");
    let failure = ev["failure"].as_str().context("failure")?;
    ensure!(
        failure.contains("wrong.sql query 2") && failure.contains("SELECT count(*) = 1 FROM accounts"),
        "the failure names the query: {failure}"
    );
    ensure!(
        check(&ev, "wrong.sql query 1").is_some_and(|c| c["passed"] == true),
        "{ev:#}"
    );
    assert_cleaned(&scratch)?;

    // A chunk of the backup goes missing.
    let chunk = repo
        .files()?
        .into_keys()
        .find(|k| k.starts_with("packs/") || k.starts_with("chunks/"))
        .context("a pack")?;
    repo.delete(&chunk)?;
    let (run, ev) = drill(&repo, &scratch, &[])?;
    ensure!(
        run.code() == Some(1),
        "a missing chunk fails the drill: {run}\n{ev:#}"
    );
    let failure = ev["failure"].as_str().context("failure")?;
    let id = Repo::object_id(&chunk).context("pack id")?;
    let id = id.as_str();
    ensure!(
        failure.starts_with("restore: ") && failure.contains(id),
        "the failure names the restore and the chunk {id}: {failure}"
    );
    ensure!(
        ev["rto"]["measured_seconds"].is_null() && ev["rto"]["met"] == false,
        "{ev:#}"
    );
    assert_cleaned(&scratch)?;
    Ok(())
}
