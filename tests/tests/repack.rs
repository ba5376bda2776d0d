//! Space reclaimed: in a four-backup lifecycle, once `expire` has dropped the two oldest, the
//! chunks only they used are no longer stored, though they shared packs with chunks the kept
//! backups use (`expire` rewrites those packs, `--max-dead`). What a DBA checks: `info` reports
//! the dead bytes before and none after; the repository holds exactly the packs the kept
//! backups list; `verify --deep` passes; each kept backup restores exactly; the next backup
//! still takes unchanged files over unread; and a second copy
//! kept by `archive-agent copy` follows the rewrite and still restores on its own.

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use walvault_testkit::agents::{ARCHIVE_AGENT, RESTORE_AGENT, agents};
use walvault_testkit::backup::{self, Restore, assert_restores_to, next_backup_second, take_backup};
use walvault_testkit::copy::{copy, copy_location, report};
use walvault_testkit::fixtures::{archive_everything, archiving_cluster};
use walvault_testkit::host::Finished;
use walvault_testkit::workload::{self, Ledger};
use walvault_testkit::{Cluster, Repo};

fn expire(repo: &Repo, extra: &[&str]) -> Result<Value> {
    let mut args: Vec<String> = ["expire", "--keep-last", "2", "--json"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(repo.args());
    let run = agents().run(ARCHIVE_AGENT, args).check()?;
    serde_json::from_str(&run.stdout).with_context(|| format!("expire JSON: {}", run.stdout))
}

fn verify_deep(repo: &Repo) -> Finished {
    let mut args = vec!["verify".to_string(), "--deep".to_string()];
    args.extend(repo.args());
    agents().run(RESTORE_AGENT, args)
}

/// Bytes of every pack object in the repository.
fn stored_pack_bytes(repo: &Repo) -> Result<u64> {
    Ok(repo
        .files()?
        .iter()
        .filter(|(k, _)| k.starts_with("packs/") && k.ends_with(".wvp"))
        .map(|(_, size)| size)
        .sum())
}

fn bulk_md5(cluster: &Cluster) -> Result<String> {
    cluster.query_in("postgres", "select md5(string_agg(v, ',' order by g)) from bulk")
}

#[test]
fn expire_reclaims_the_chunks_only_expired_backups_used() -> Result<()> {
    let repo = Repo::new()?;
    let mut source = archiving_cluster("repack-source", &repo, "")?;
    workload::create_ledger(&source)?;
    // About 10 MB in one relation file, so that its chunks share packs with the catalogs'.
    source.execute(
        "create table bulk (g int primary key, v text) with (fillfactor = 100);
         insert into bulk select g, md5(g::text) from generate_series(1, 160000) g;
         checkpoint",
    )?;
    let mut ledger = Ledger::connect(&source)?;
    let mut kept = Vec::new();
    let mut copy_target = None;
    for round in 0..4u32 {
        if round > 0 {
            // A different stretch of the table each round: the chunks of the stretch before
            // are then used by the earlier backups only.
            let from = round * 40_000;
            source.execute(&format!(
                "update bulk set v = md5(v || 'r{round}') where g between {from} and {}; checkpoint",
                from + 30_000
            ))?;
        }
        next_backup_second();
        let b = take_backup(&source, &repo)?;
        let state = ledger.step()?;
        if round >= 2 {
            kept.push((b, state, bulk_md5(&source)?));
        }
        if round == 1 {
            // A second copy, taken while the four backups are not all there yet.
            let target = copy_location(&repo, repo.kind())?;
            copy(&repo, &target, &[]).check()?;
            copy_target = Some(target);
        }
    }
    // One more transaction: the last recorded state then has a commit after it in the archive.
    ledger.step()?;
    archive_everything(&source)?;
    let target = copy_target.context("the copy")?;
    copy(&repo, &target, &[]).check()?;

    // 1. The two oldest expire; their chunks leave dead bytes in packs the kept backups list.
    let dry = expire(&repo, &["--dry-run", "--max-dead", "0"])?;
    ensure!(
        dry["repack"]["packs"].as_u64() > Some(0),
        "the dry run plans a repack: {dry}"
    );
    let first = expire(&repo, &["--max-dead", "0"])?;
    assert_eq!(first["expired"].as_array().map(Vec::len), Some(2), "{first}");
    let repacked = &first["repack"];
    let packs = repacked["packs"].as_u64().context("repack.packs")?;
    ensure!(packs > 0, "packs were rewritten: {first}");
    ensure!(
        repacked["before"]["dead_bytes"].as_u64() > Some(0),
        "the expired backups left dead bytes: {first}"
    );
    assert_eq!(repacked["after"]["dead_bytes"].as_u64(), Some(0), "{first}");
    assert_eq!(
        repacked["manifests"].as_u64(),
        Some(2),
        "both kept manifests name the new packs"
    );
    let info = backup::info(&repo)?;
    assert_eq!(info["packs"]["dead_bytes"].as_u64(), Some(0), "{}", info["packs"]);
    // The old packs stay until the next expire (a restore may be reading them).
    ensure!(stored_pack_bytes(&repo)? > info["packs"]["bytes"].as_u64().unwrap_or(0));

    // 2. The next expire deletes them: what is stored is exactly what the kept backups list.
    let second = expire(&repo, &["--max-dead", "0"])?;
    assert_eq!(second["packs"]["objects"].as_u64(), Some(packs), "{second}");
    assert_eq!(second["repack"]["packs"].as_u64(), Some(0), "{second}");
    let info = backup::info(&repo)?;
    assert_eq!(
        Some(stored_pack_bytes(&repo)?),
        info["packs"]["bytes"].as_u64(),
        "every stored pack byte is listed"
    );
    assert_eq!(info["packs"]["dead_bytes"].as_u64(), Some(0));
    let v = verify_deep(&repo);
    assert_eq!(v.code(), Some(0), "verify --deep after the repack\n{v}");

    // 3. Every kept backup restores exactly, the bulk table with it.
    for (i, (b, state, md5)) in kept.iter().enumerate() {
        let (restored, _) = assert_restores_to(
            &repo,
            &format!("repack-restored-{i}"),
            state,
            Restore::with(&["--backup", &b.id]),
        )?;
        assert_eq!(&bulk_md5(&restored)?, md5, "backup {}: the bulk table", b.id);
    }

    // 4. The next backup still takes the unchanged files over unread: the manifests written
    // again kept each file's stat, which the catalog's copies leave out.
    next_backup_second();
    let next = take_backup(&source, &repo)?;
    ensure!(
        next.reused_files > 0,
        "a backup after the repack reused nothing: {next:?}"
    );

    // 5. The copy follows: the rewritten manifests replace its own, the old packs go with
    // --prune, and it restores on its own.
    let followed = report(&copy(&repo, &target, &["--prune"]).check()?)?;
    assert_eq!(
        followed["conflicts"].as_array().map(Vec::len),
        Some(0),
        "{followed}"
    );
    ensure!(
        followed["pruned"]["objects"].as_u64() >= Some(packs),
        "the old packs go: {followed}"
    );
    let v = verify_deep(&target);
    assert_eq!(v.code(), Some(0), "verify --deep of the copy\n{v}");
    let info = backup::info(&target)?;
    assert_eq!(info["packs"]["dead_bytes"].as_u64(), Some(0), "{}", info["packs"]);
    assert_eq!(Some(stored_pack_bytes(&target)?), info["packs"]["bytes"].as_u64());
    let (b, state, md5) = kept.last().context("a kept backup")?;
    source.stop()?;
    let (restored, _) = assert_restores_to(
        &target,
        "repack-from-copy",
        state,
        Restore::with(&["--backup", &b.id]),
    )?;
    assert_eq!(&bulk_md5(&restored)?, md5);
    Ok(())
}
