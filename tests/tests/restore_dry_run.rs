//! `restore-agent restore --dry-run`: the plan of a restore (backup, target, timeline, files,
//! recovery settings, replay), printed with nothing written, not even the data directory; then
//! the same restore carries out exactly that plan, writes the settings it named, and the
//! restored cluster reaches the target with the rows recorded then.

use std::fs;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use walvault_testkit::backup::{self, take_backup};
use walvault_testkit::fixtures::{
    BETWEEN_TRANSACTIONS, RECOVERY_TIMEOUT, archive_everything, archiving_cluster,
};
use walvault_testkit::host::snapshot;
use walvault_testkit::workload;
use walvault_testkit::{Cluster, Repo};

fn json(stdout: &str) -> Result<Value> {
    serde_json::from_str(stdout).with_context(|| format!("not JSON:\n{stdout}"))
}

#[test]
fn the_dry_run_prints_the_plan_the_restore_then_carries_out() -> Result<()> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("dry-run-source", &repo, "")?;
    workload::create_ledger(&source)?;
    let (states, taken) = workload::ledger_while(&source, BETWEEN_TRANSACTIONS, || {
        thread::sleep(Duration::from_millis(300));
        let taken = take_backup(&source, &repo)?;
        thread::sleep(Duration::from_millis(1500));
        Ok(taken)
    })?;
    archive_everything(&source)?;
    let stop = source.unix_micros(&taken.stop_time)?;
    let after: Vec<_> = states.iter().filter(|s| s.unix_micros > stop).collect();
    ensure!(
        after.len() >= 4,
        "too few transactions after the backup: {}",
        after.len()
    );
    let target = after[after.len() / 2];
    source.stop()?;

    let mut restored = Cluster::uninitialized("dry-run-restored")?;
    let pgdata = restored.data_dir();
    let parent = pgdata
        .parent()
        .context("the data directory has a parent")?
        .to_path_buf();
    let before = snapshot(&parent)?;
    let args = ["--target-time", target.time.as_str()];
    let with = |extra: &[&'static str]| [&args[..], extra].concat();

    // The plan as text, then as JSON: nothing written either time.
    let text = backup::restore(&repo, &pgdata, &with(&["--dry-run"]))?.check()?;
    for expected in [
        "restore plan",
        taken.id.as_str(),
        "recovery_target_time",
        "restore_command",
    ] {
        assert!(
            text.stdout.contains(expected),
            "the plan must name {expected:?}:\n{text}"
        );
    }
    eprintln!("{}", text.stdout);
    let dry = backup::restore(&repo, &pgdata, &with(&["--dry-run", "--json"]))?.check()?;
    let plan = json(&dry.stdout)?;
    assert!(!pgdata.exists(), "a dry run must not create {}", pgdata.display());
    assert_eq!(
        snapshot(&parent)?,
        before,
        "a dry run must write nothing next to the data directory"
    );

    assert_eq!(plan["backup"]["id"], taken.id.as_str(), "{plan:#}");
    assert_eq!(plan["timeline"]["chosen_by"], "latest", "{plan:#}");
    assert_eq!(plan["timeline"]["id"], 1, "{plan:#}");
    assert_eq!(plan["files"]["directory"], "create", "{plan:#}");
    assert!(plan["files"]["files"].as_u64().unwrap_or(0) > 100, "{plan:#}");
    assert_eq!(
        plan["files"]["bytes"], plan["files"]["bytes_to_write"],
        "{plan:#}"
    );
    assert_eq!(
        plan["recovery"]["target"]["name"], "recovery_target_time",
        "{plan:#}"
    );
    assert_eq!(plan["recovery"]["action"], "promote", "{plan:#}");
    assert_eq!(
        plan["replay"]["last_is_upper_bound"], false,
        "a time the index places: {plan:#}"
    );

    // The restore carries out that plan: the same plan in its report, and the report's figures
    // are the plan's.
    let run = backup::restore(&repo, &pgdata, &with(&["--json"]))?.check()?;
    let report = json(&run.stdout)?;
    assert_eq!(
        report["plan"], plan,
        "the restore must carry out the plan the dry run printed"
    );
    assert_eq!(report["backup"], plan["backup"]["id"]);
    assert_eq!(report["pg_version"], plan["backup"]["pg_version"]);
    assert_eq!(report["files"], plan["files"]["files"]);
    assert_eq!(report["bytes"], plan["files"]["bytes_to_write"]);
    assert_eq!(report["target"], plan["target"]);
    assert_eq!(report["timeline"], plan["timeline"]["description"]);
    assert_eq!(report["replay"], plan["replay"]);

    // What it wrote is what the plan said.
    for file in plan["recovery"]["writes"]
        .as_array()
        .context("the files the plan writes")?
    {
        let file = file.as_str().context("a file name")?;
        assert!(pgdata.join(file).exists(), "the plan said {file} is written");
    }
    let auto = fs::read_to_string(pgdata.join("postgresql.auto.conf"))?;
    let value = plan["recovery"]["target"]["value"]
        .as_str()
        .context("the target's value")?;
    for line in [
        format!("recovery_target_time = '{value}'"),
        format!(
            "recovery_target_timeline = '{}'",
            plan["recovery"]["timeline"].as_str().unwrap_or("?")
        ),
        "recovery_target_action = 'promote'".to_string(),
        "recovery_target_inclusive = 'on'".to_string(),
    ] {
        assert!(
            auto.lines().any(|l| l == line),
            "postgresql.auto.conf must set {line:?}:\n{auto}"
        );
    }
    let replay = json(&fs::read_to_string(pgdata.join("walvault-recovery.json"))?)?;
    assert_eq!(replay["backup"], plan["backup"]["id"]);
    assert_eq!(replay["first_segment"], plan["replay"]["first"]);
    assert_eq!(replay["last_segment"], plan["replay"]["last"]);
    assert_eq!(replay["timeline"], plan["timeline"]["id"]);

    // And the cluster reaches the target with the rows recorded then.
    restored.set_conf(&[("archive_mode", "off")])?;
    restored
        .start_and_wait_recovery_end(RECOVERY_TIMEOUT)
        .with_context(|| format!("recovery of the restore:\n{run}"))?;
    assert_eq!(
        workload::ledger_contents(&restored)?,
        target.contents,
        "restored to {}, the ledger differs from the state recorded then\n{}",
        target.time,
        restored.log_tail()
    );
    Ok(())
}
