//! A repository for one test, in the store the suite runs against, seen from outside: where
//! objects should be (written independently of the library, from the documented layout), what is
//! there, and ways to damage it.
//!
//! `WALVAULT_TEST_STORE` picks the store: `file` (the default: a scratch directory), `s3` (a
//! prefix of its own in the bucket of the test process's [`Garage`]) or `azure` (a prefix of its
//! own in the container of the test process's [`Azurite`]). Object store repositories are read
//! and written here with `object_store` directly, not through walvault.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::azurite::{self, Azurite};
use crate::garage::{BUCKET, Garage};
use crate::host::{ScratchDir, give_to_pg_user};

/// The repository descriptor's key.
pub const DESCRIPTOR: &str = "walvault.json";

/// Which store the suite runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    File,
    S3,
    Azure,
}

impl StoreKind {
    /// From `WALVAULT_TEST_STORE` (`file` when unset).
    pub fn from_env() -> StoreKind {
        match std::env::var("WALVAULT_TEST_STORE").as_deref() {
            Ok("s3") => StoreKind::S3,
            Ok("azure") => StoreKind::Azure,
            Ok("file") | Err(_) => StoreKind::File,
            Ok(other) => panic!("WALVAULT_TEST_STORE={other:?}: use file, s3 or azure"),
        }
    }
}

#[derive(Debug)]
enum Backend {
    File {
        root: PathBuf,
    },
    S3 {
        store: Arc<dyn ObjectStore>,
        prefix: String,
        endpoint: String,
    },
    Azure {
        store: Arc<dyn ObjectStore>,
        prefix: String,
        /// The server's `http://127.0.0.1:<port>`, which [`Repo::set_reachable`] swaps out.
        origin: String,
    },
}

/// A repository, created by `archive-agent init` (no cluster bound until the first push), or a
/// location where none is ([`Repo::uninitialized`]).
#[derive(Debug)]
pub struct Repo {
    scratch: ScratchDir,
    backend: Backend,
    /// `--config` file with the store's settings (credentials), owned by the PostgreSQL user.
    config: Option<PathBuf>,
}

impl Repo {
    /// A new repository in the store `WALVAULT_TEST_STORE` names.
    pub fn new() -> Result<Repo> {
        Repo::uninitialized()?.initialized()
    }

    /// A location in the store `WALVAULT_TEST_STORE` names where no repository is yet (an empty
    /// directory, or an unused prefix).
    pub fn uninitialized() -> Result<Repo> {
        match StoreKind::from_env() {
            StoreKind::File => Repo::file_location(),
            StoreKind::S3 => Repo::s3_location(Garage::shared()),
            StoreKind::Azure => Repo::azure_location(Azurite::shared()),
        }
    }

    /// A location in store `kind` where no repository is yet (for a second copy on another store).
    pub fn uninitialized_in(kind: StoreKind) -> Result<Repo> {
        match kind {
            StoreKind::File => Repo::file_location(),
            StoreKind::S3 => Repo::s3_location(Garage::shared()),
            StoreKind::Azure => Repo::azure_location(Azurite::shared()),
        }
    }

    /// The configuration file with the store's credentials, when it has one.
    pub fn config_path(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// `archive-agent init` here (as the PostgreSQL user, like every agent the tests run).
    pub fn init(&self, extra: &[&str]) -> crate::host::Finished {
        let mut args = vec!["init".to_string()];
        args.extend(self.args());
        args.extend(extra.iter().map(|a| a.to_string()));
        crate::agents::agents().run(crate::agents::ARCHIVE_AGENT, args)
    }

    fn initialized(self) -> Result<Repo> {
        self.init(&[]).check().context("archive-agent init")?;
        Ok(self)
    }

    /// A new encrypted repository (`init --encrypt`) in the store `WALVAULT_TEST_STORE` names,
    /// its key file holding `key` (64 hex digits: a raw key; anything else: a passphrase).
    pub fn new_encrypted(key: &str) -> Result<Repo> {
        let mut repo = Repo::uninitialized()?;
        repo.use_key("key", key)?;
        repo.init(&["--encrypt"])
            .check()
            .context("archive-agent init --encrypt")?;
        Ok(repo)
    }

    /// Write `key` into the key file `name` (the PostgreSQL user's, mode 0600) beside the
    /// repository and make it the configuration file's key (`[encryption] key_file`), creating the
    /// configuration file of a `file://` repository. Returns the key file's path.
    pub fn use_key(&mut self, name: &str, key: &str) -> Result<PathBuf> {
        let path = self.scratch.path().join(name);
        fs::write(&path, key).with_context(|| format!("writing {}", path.display()))?;
        crate::host::set_mode(&path, 0o600)?;
        give_to_pg_user(&path).context("chown of the key file")?;
        self.set_encryption_table(Some(&format!(
            "[encryption]\nkey_file = \"{}\"\n",
            path.display()
        )))?;
        Ok(path)
    }

    /// Make `command` the configuration file's key source (`[encryption] key_command`).
    pub fn use_key_command(&mut self, command: &str) -> Result<()> {
        let quoted = command.replace('\\', "\\\\").replace('"', "\\\"");
        self.set_encryption_table(Some(&format!("[encryption]\nkey_command = \"{quoted}\"\n")))
    }

    /// Remove the `[encryption]` table: the agents run with no key.
    pub fn forget_key(&mut self) -> Result<()> {
        self.set_encryption_table(None)
    }

    /// Replace the configuration file's `[encryption]` table (always its last table) with `table`.
    fn set_encryption_table(&mut self, table: Option<&str>) -> Result<()> {
        let config = match &self.config {
            Some(c) => c.clone(),
            None => {
                let c = self.scratch.path().join("walvault.toml");
                self.config = Some(c.clone());
                c
            }
        };
        let text = fs::read_to_string(&config).unwrap_or_default();
        let mut text = match text.find("[encryption]") {
            Some(at) => text[..at].to_string(),
            None => text,
        };
        if let Some(t) = table {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(t);
        }
        fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        crate::host::set_mode(&config, 0o600)?;
        give_to_pg_user(&config).context("chown of the configuration file")
    }

    /// A new `file://` repository, whatever the suite runs against.
    pub fn new_file() -> Result<Repo> {
        Repo::file_location()?.initialized()
    }

    /// A new repository under a prefix of its own in `garage`'s bucket.
    pub fn new_s3(garage: &Garage) -> Result<Repo> {
        Repo::s3_location(garage)?.initialized()
    }

    /// A new repository under a prefix of its own in `azurite`'s container.
    pub fn new_azure(azurite: &Azurite) -> Result<Repo> {
        Repo::azure_location(azurite)?.initialized()
    }

    fn file_location() -> Result<Repo> {
        let scratch = ScratchDir::new("repo")?;
        let root = scratch.subdir("repo")?;
        Ok(Repo {
            scratch,
            backend: Backend::File { root },
            config: None,
        })
    }

    fn s3_location(garage: &Garage) -> Result<Repo> {
        let scratch = ScratchDir::new("repo")?;
        let prefix = unique_prefix();
        let store = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_region(crate::garage::REGION)
            .with_endpoint(garage.endpoint())
            .with_access_key_id(garage.key_id())
            .with_secret_access_key(garage.secret())
            .with_allow_http(true)
            .build()
            .context("S3 client for the test repository")?;
        let config = scratch.path().join("walvault.toml");
        fs::write(&config, garage.config_toml()).context("writing the S3 config")?;
        crate::host::set_mode(&config, 0o600)?;
        give_to_pg_user(&config)?;
        Ok(Repo {
            scratch,
            backend: Backend::S3 {
                store: Arc::new(store),
                prefix,
                endpoint: garage.endpoint(),
            },
            config: Some(config),
        })
    }

    fn azure_location(azurite: &Azurite) -> Result<Repo> {
        let scratch = ScratchDir::new("repo")?;
        let prefix = unique_prefix();
        let store = object_store::azure::MicrosoftAzureBuilder::new()
            .with_container_name(azurite::CONTAINER)
            .with_account(azurite::ACCOUNT)
            .with_access_key(azurite::ACCOUNT_KEY)
            .with_endpoint(azurite.endpoint())
            .with_allow_http(true)
            .build()
            .context("Azure client for the test repository")?;
        let config = scratch.path().join("walvault.toml");
        fs::write(&config, azurite.config_toml()).context("writing the Azure config")?;
        crate::host::set_mode(&config, 0o600)?;
        give_to_pg_user(&config)?;
        Ok(Repo {
            scratch,
            backend: Backend::Azure {
                store: Arc::new(store),
                prefix,
                origin: azurite.origin(),
            },
            config: Some(config),
        })
    }

    pub fn kind(&self) -> StoreKind {
        match self.backend {
            Backend::File { .. } => StoreKind::File,
            Backend::S3 { .. } => StoreKind::S3,
            Backend::Azure { .. } => StoreKind::Azure,
        }
    }

    /// The repository's root directory (`file://` repositories only).
    pub fn root(&self) -> Option<&Path> {
        match &self.backend {
            Backend::File { root } => Some(root),
            Backend::S3 { .. } | Backend::Azure { .. } => None,
        }
    }

    /// A scratch directory next to the repository, for test files (owned by the PostgreSQL user).
    pub fn scratch(&self) -> &ScratchDir {
        &self.scratch
    }

    /// The repository's id, as `walvault.json` records it (read here, not through walvault).
    pub fn id(&self) -> Result<String> {
        let doc: serde_json::Value =
            serde_json::from_slice(&self.read(DESCRIPTOR)?).context("walvault.json")?;
        doc["id"]
            .as_str()
            .map(str::to_string)
            .context("walvault.json has no id")
    }

    /// The repository URL, for `--repo`.
    pub fn url(&self) -> String {
        match &self.backend {
            Backend::File { root } => format!("file://{}", root.display()),
            Backend::S3 { prefix, .. } => format!("s3://{BUCKET}/{prefix}"),
            Backend::Azure { prefix, .. } => format!("az://{}/{prefix}", azurite::CONTAINER),
        }
    }

    /// The flags that point an agent at this repository: `--repo URL`, plus `--config FILE` with
    /// the store's credentials when it has any (never on the command line: PostgreSQL logs a
    /// failed archive_command in full).
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["--repo".to_string(), self.url()];
        if let Some(c) = &self.config {
            args.push("--config".into());
            args.push(c.display().to_string());
        }
        args
    }

    /// [`Repo::args`] with another repository URL (in the same store, with the same credentials).
    pub fn args_with_url(&self, url: &str) -> Vec<String> {
        let mut args = self.args();
        args[1] = url.to_string();
        args
    }

    /// A URL in this repository's store where no repository is: a missing directory, or a
    /// missing bucket or container.
    pub fn nowhere_url(&self) -> &'static str {
        match self.backend {
            Backend::File { .. } => "file:///walvault-no-such-repository",
            Backend::S3 { .. } => "s3://walvault-no-such-bucket/repo",
            Backend::Azure { .. } => "az://walvault-no-such-container/repo",
        }
    }

    /// [`Repo::args`] joined for a shell command line.
    pub fn args_line(&self) -> String {
        self.args().join(" ")
    }

    /// Make the repository unreachable for the agents (`false`) or reachable again (`true`): a
    /// local directory gets mode 000; an S3 or Azure repository's endpoint points at a closed port.
    pub fn set_reachable(&self, reachable: bool) -> Result<()> {
        match &self.backend {
            Backend::File { root } => {
                crate::host::set_mode(root, if reachable { 0o700 } else { 0o000 })?;
            }
            Backend::S3 { endpoint: origin, .. } | Backend::Azure { origin, .. } => {
                let config = self
                    .config
                    .as_ref()
                    .context("object store repositories have a config file")?;
                let text = fs::read_to_string(config)?;
                let dead = "http://127.0.0.1:9";
                let text = if reachable {
                    text.replace(&format!("{dead}/"), &format!("{origin}/"))
                        .replace(&format!("{dead}\""), &format!("{origin}\""))
                } else {
                    text.replace(origin.as_str(), dead)
                };
                fs::write(config, text)?;
            }
        }
        Ok(())
    }

    /// Send the agents' requests to `endpoint` (a [`crate::faultproxy::FaultProxy`] in front of
    /// the store) instead of the store itself (S3 repositories only).
    pub fn route_through(&self, endpoint: &str) -> Result<()> {
        let (Backend::S3 { endpoint: origin, .. }, Some(config)) = (&self.backend, &self.config) else {
            bail!("only S3 repositories can be routed through a proxy");
        };
        let text = fs::read_to_string(config)?;
        fs::write(config, text.replace(origin.as_str(), endpoint))?;
        Ok(())
    }

    /// What an agent's error says when [`Repo::set_reachable`] cut it off.
    pub fn unreachable_words(&self) -> &'static str {
        match self.backend {
            Backend::File { .. } => "ermission denied",
            Backend::S3 { .. } | Backend::Azure { .. } => "127.0.0.1:9",
        }
    }

    /// Where the object for the archived file `name` lives (repository format v1).
    pub fn object_key(&self, name: &str) -> String {
        object_key(name)
    }

    pub fn has_object(&self, name: &str) -> bool {
        self.has(&object_key(name))
    }

    /// Whether an object exists under `key`.
    pub fn has(&self, key: &str) -> bool {
        self.read(key).is_ok()
    }

    /// The object under `key`.
    pub fn read(&self, key: &str) -> Result<Vec<u8>> {
        match &self.backend {
            Backend::File { root } => {
                fs::read(root.join(key)).with_context(|| format!("reading {key} in {}", self.url()))
            }
            Backend::S3 { store, prefix, .. } | Backend::Azure { store, prefix, .. } => {
                let path = ObjectPath::from(format!("{prefix}/{key}"));
                block_on(async { store.get(&path).await?.bytes().await })
                    .map(|b| b.to_vec())
                    .with_context(|| format!("reading {key} in {}", self.url()))
            }
        }
    }

    /// Write (or replace) the object under `key`, behind walvault's back.
    pub fn write(&self, key: &str, bytes: &[u8]) -> Result<()> {
        match &self.backend {
            Backend::File { root } => {
                let path = root.join(key);
                let parent = path.parent().context("a repository file has a parent")?;
                fs::create_dir_all(parent).with_context(|| format!("mkdir {}", parent.display()))?;
                fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
                give_to_pg_user(root).context("chown of the repository")
            }
            Backend::S3 { store, prefix, .. } | Backend::Azure { store, prefix, .. } => {
                let path = ObjectPath::from(format!("{prefix}/{key}"));
                let payload = object_store::PutPayload::from(bytes.to_vec());
                block_on(async { store.put(&path, payload).await })
                    .map(|_| ())
                    .with_context(|| format!("writing {key} in {}", self.url()))
            }
        }
    }

    /// Remove the object under `key`.
    pub fn delete(&self, key: &str) -> Result<()> {
        match &self.backend {
            Backend::File { root } => {
                fs::remove_file(root.join(key)).with_context(|| format!("removing {key}"))
            }
            Backend::S3 { store, prefix, .. } | Backend::Azure { store, prefix, .. } => {
                let path = ObjectPath::from(format!("{prefix}/{key}"));
                block_on(async { store.delete(&path).await }).with_context(|| format!("removing {key}"))
            }
        }
    }

    /// Every object in the repository, by key, with its size.
    pub fn files(&self) -> Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        match &self.backend {
            Backend::File { root } => {
                if root.exists() {
                    walk(root, root, &mut out)?;
                }
            }
            Backend::S3 { store, prefix, .. } | Backend::Azure { store, prefix, .. } => {
                use futures::TryStreamExt;
                let base = ObjectPath::from(prefix.as_str());
                let listed: Vec<_> = block_on(async { store.list(Some(&base)).try_collect().await })
                    .with_context(|| format!("listing {}", self.url()))?;
                for meta in listed {
                    let key = meta.location.as_ref();
                    let rel = key
                        .strip_prefix(prefix.as_str())
                        .unwrap_or(key)
                        .trim_start_matches('/');
                    out.insert(rel.to_string(), meta.size);
                }
            }
        }
        Ok(out)
    }

    /// Names of the archived files (object file names without `.wvo`), sorted.
    pub fn archived_names(&self) -> Result<Vec<String>> {
        Ok(self
            .files()?
            .keys()
            .filter(|k| k.starts_with("wal/"))
            .filter_map(|k| k.rsplit('/').next()?.strip_suffix(".wvo").map(str::to_string))
            .collect())
    }

    /// Total bytes stored.
    pub fn size(&self) -> Result<u64> {
        Ok(self.files()?.values().sum())
    }

    /// The key of the manifest of backup `id`: `backups/<id>/manifest.wvo`.
    pub fn manifest_key(&self, id: &str) -> String {
        format!("backups/{id}/manifest.wvo")
    }

    /// Every object holding backup data, by key, with its size: packs (`packs/<ab>/<id>.wvp`,
    /// what backups write) and chunks stored on their own (`chunks/<ab>/<id>.wvo`).
    pub fn backup_objects(&self) -> Result<BTreeMap<String, u64>> {
        let mut all = self.files()?;
        all.retain(|k, _| k.starts_with("chunks/") || k.starts_with("packs/"));
        Ok(all)
    }

    /// The id a backup data object's key names: its file name without its suffix.
    pub fn object_id(key: &str) -> Option<String> {
        let name = key.rsplit('/').next()?;
        let id = name.strip_suffix(".wvp").or_else(|| name.strip_suffix(".wvo"))?;
        Some(id.to_string())
    }

    /// A new repository in the same store holding a copy of every object of this one, for tests
    /// that damage objects without disturbing others that share `self`.
    pub fn copy(&self) -> Result<Repo> {
        let copy = match &self.backend {
            Backend::File { .. } => Repo::new_file()?,
            Backend::S3 { .. } => Repo::new_s3(Garage::shared())?,
            Backend::Azure { .. } => Repo::new_azure(Azurite::shared())?,
        };
        for key in self.files()?.keys() {
            copy.write(key, &self.read(key)?)?;
        }
        Ok(copy)
    }

    /// Flip every bit of the byte at `offset` (counted from the end when negative) of the object
    /// under `key`.
    pub fn flip_byte(&self, key: &str, offset: i64) -> Result<()> {
        let mut bytes = self.read(key)?;
        let at = if offset < 0 {
            bytes.len() as i64 + offset
        } else {
            offset
        };
        let at = usize::try_from(at).context("offset before the start of the object")?;
        let Some(b) = bytes.get_mut(at) else {
            bail!("{key} has no byte {at}");
        };
        *b ^= 0xFF;
        self.write(key, &bytes)
    }

    /// Flip the byte in the middle of the object under `key`.
    pub fn flip_middle_byte(&self, key: &str) -> Result<()> {
        let len = self.read(key)?.len() as i64;
        self.flip_byte(key, len / 2)
    }

    /// Cut the object under `key` down to `len` bytes.
    pub fn truncate(&self, key: &str, len: usize) -> Result<()> {
        let mut bytes = self.read(key)?;
        bytes.truncate(len);
        self.write(key, &bytes)
    }
}

/// A prefix no other repository of any test process uses.
fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{}/repo",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The documented key of `name`'s object:
/// `wal/history/<name>.wvo` for history files, else `wal/<timeline><log>/<name>.wvo`.
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

/// Run one storage call from a synchronous test on the one runtime every store client of the
/// process uses. A client's pooled connections live on the runtime that opened them: calling it
/// from a runtime built per call fails, now and then, with "dispatch task is gone: runtime
/// dropped the dispatch task" once the first runtime is gone.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("testkit-store")
                .enable_all()
                .build()
                .expect("a tokio runtime")
        })
        .handle()
        .block_on(f)
}
