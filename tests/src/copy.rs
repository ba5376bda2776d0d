//! `archive-agent copy` as the tests run it: a second copy of a repository (`init --copy-of`),
//! and copies into it with the credentials each store needs.

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::Repo;
use crate::agents::{ARCHIVE_AGENT, agents};
use crate::host::Finished;
use crate::repo::StoreKind;

/// `archive-agent copy` from `source` to `target`, with the credentials each needs.
pub fn copy_args(source: &Repo, target: &Repo, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["copy".to_string()];
    args.extend(source.args());
    args.extend(["--to".to_string(), target.url()]);
    if let Some(c) = target.config_path() {
        args.extend(["--to-config".to_string(), c.display().to_string()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

pub fn copy(source: &Repo, target: &Repo, extra: &[&str]) -> Finished {
    let mut extra = extra.to_vec();
    extra.push("--json");
    agents().run(ARCHIVE_AGENT, copy_args(source, target, &extra))
}

pub fn report(run: &Finished) -> Result<Value> {
    serde_json::from_str(&run.stdout).with_context(|| format!("copy printed no JSON:\n{run}"))
}

/// A second copy of `source` in store `kind` (`init --copy-of`), empty.
pub fn copy_location(source: &Repo, kind: StoreKind) -> Result<Repo> {
    let target = Repo::uninitialized_in(kind)?;
    let mut args = vec!["init".to_string(), "--repo".into(), target.url()];
    // One configuration file must give both stores' credentials (and an encrypted source's
    // key): the source's when both are on one store, else the object store's.
    let config = match target.kind() == source.kind() {
        true => source.config_path().or(target.config_path()),
        false => target.config_path().or(source.config_path()),
    };
    if let Some(c) = config {
        args.extend(["--config".to_string(), c.display().to_string()]);
    }
    args.extend(["--copy-of".to_string(), source.url()]);
    agents().run(ARCHIVE_AGENT, args).check()?;
    ensure!(target.id()? == source.id()?, "the copy has the source's id");
    Ok(target)
}
