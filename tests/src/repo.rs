//! A `file://` repository in a scratch directory, seen from outside: where objects should be
//! (written independently of the library, from the documented layout) and what is there.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::host::{ScratchDir, give_to_pg_user};

/// The repository descriptor's key.
pub const DESCRIPTOR: &str = "walvault.json";

/// A repository: an empty directory owned by the PostgreSQL user until the first push.
#[derive(Debug)]
pub struct Repo {
    scratch: ScratchDir,
    root: PathBuf,
}

impl Repo {
    pub fn new() -> Result<Repo> {
        let scratch = ScratchDir::new("repo")?;
        let root = scratch.subdir("repo")?;
        Ok(Repo { scratch, root })
    }

    /// The repository's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A scratch directory next to the repository, for test files (owned by the PostgreSQL user).
    pub fn scratch(&self) -> &ScratchDir {
        &self.scratch
    }

    /// `file:///…`, for `--repo`.
    pub fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    /// Where the object for the archived file `name` lives (repository format v1):
    /// `wal/history/<name>.wvo` for history files, else `wal/<timeline><log>/<name>.wvo`.
    pub fn object_path(&self, name: &str) -> PathBuf {
        self.root.join(object_key(name))
    }

    pub fn has_object(&self, name: &str) -> bool {
        self.object_path(name).is_file()
    }

    /// Every file in the repository, by relative path, with its size.
    pub fn files(&self) -> Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        if self.root.exists() {
            walk(&self.root, &self.root, &mut out)?;
        }
        Ok(out)
    }

    /// Names of the archived files (object file names without `.wvo`), sorted.
    pub fn archived_names(&self) -> Result<Vec<String>> {
        Ok(self
            .files()?
            .keys()
            .filter_map(|k| k.rsplit('/').next()?.strip_suffix(".wvo").map(str::to_string))
            .collect())
    }

    /// Total bytes stored.
    pub fn size(&self) -> Result<u64> {
        Ok(self.files()?.values().sum())
    }

    /// Where the manifest of backup `id` lives: `backups/<id>/manifest.wvo`.
    pub fn manifest_path(&self, id: &str) -> PathBuf {
        self.root.join("backups").join(id).join("manifest.wvo")
    }

    /// Every backup chunk object (`chunks/<ab>/<id>.wvo`), by relative path, with its size.
    pub fn chunks(&self) -> Result<BTreeMap<String, u64>> {
        let mut all = self.files()?;
        all.retain(|k, _| k.starts_with("chunks/"));
        Ok(all)
    }

    /// A new repository holding a copy of every file of this one (owned by the PostgreSQL
    /// user), for tests that damage objects without disturbing others that share `self`.
    pub fn copy(&self) -> Result<Repo> {
        let copy = Repo::new()?;
        for rel in self.files()?.keys() {
            let to = copy.root.join(rel);
            let parent = to.parent().context("a repository file has a parent")?;
            fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
            fs::copy(self.root.join(rel), &to).with_context(|| format!("copying {rel}"))?;
        }
        give_to_pg_user(&copy.root).context("chown of the copied repository")?;
        Ok(copy)
    }
}

/// The documented key of `name`'s object.
pub fn object_key(name: &str) -> String {
    if name.ends_with(".history") {
        format!("wal/history/{name}.wvo")
    } else {
        format!("wal/{}/{name}.wvo", name.get(..16).unwrap_or(name))
    }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u64>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            walk(root, &entry.path(), out)?;
        } else {
            let rel = entry.path().strip_prefix(root)?.to_string_lossy().into_owned();
            out.insert(rel, meta.len());
        }
    }
    Ok(())
}

/// Flip every bit of the byte at `offset` (counted from the end when negative) of `path`.
pub fn flip_byte(path: &Path, offset: i64) -> Result<()> {
    let mut bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let at = if offset < 0 {
        bytes.len() as i64 + offset
    } else {
        offset
    };
    let at = usize::try_from(at).context("offset before the start of the file")?;
    let b = bytes
        .get_mut(at)
        .with_context(|| format!("{} has no byte {at}", path.display()))?;
    *b ^= 0xFF;
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Cut `path` down to `len` bytes.
pub fn truncate(path: &Path, len: u64) -> Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .with_context(|| format!("truncating {}", path.display()))
}
