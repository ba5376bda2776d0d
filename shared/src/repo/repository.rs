//! An opened repository: its store and its descriptor, read and validated once.
//!
//! Nothing here creates a repository by accident: [`Repository::open`] and
//! [`Repository::open_writable`] fail with [`RepoError::NotInitialized`] when the location holds
//! no `walvault.json` (a backup disk not mounted, a mistyped bucket prefix), and only
//! [`Repository::init`] (`archive-agent init`) writes one. The type parameter says what the
//! holder may do: a [`Reader`] (restore-agent) has a [`Store`], which has no method that writes.

use bytes::Bytes;

use super::descriptor::{DescriptorError, RepoDescriptor};
use super::identity::{ClusterIdentity, IdentityError, RepoId};
use super::keys::{KeyError, KeySource, RepoKeys};
use super::layout::{CLUSTER_KEY, DESCRIPTOR_KEY};
use super::object::Sealer;
use super::store::{CreateSemantics, PutNew, Store, StoreError, StoreOptions, WritableStore};
use super::stored::{Envelope, Objects, Opened, ReadError, StoredKind};
use super::url::RepoUrl;
use crate::wal::{PageError, WalFileName};

/// A repository opened for reading.
pub type Reader = Repository<Store>;
/// A repository opened for writing (archive-agent only).
pub type Writer = Repository<WritableStore>;

/// Why a repository cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(
        "no walvault repository at {repo} (it has no walvault.json): create it with `archive-agent init --repo {repo}`, or check --repo / WALVAULT_REPO (a backup volume not mounted? a mistyped bucket or prefix?)"
    )]
    NotInitialized { repo: String },
    #[error("a walvault repository already exists at {repo} (id {id}); refusing to create another")]
    AlreadyExists { repo: String, id: RepoId },
    #[error("repository {repo}: {source}")]
    Descriptor { repo: String, source: DescriptorError },
    #[error("repository {repo}: cluster.json is not valid: {message}")]
    ClusterFile { repo: String, message: String },
    #[error(
        "repository {repo} is encrypted and no key is configured: set key_file or key_command in the [encryption] table of the configuration file, or WALVAULT_ENCRYPTION_KEY_FILE / WALVAULT_ENCRYPTION_KEY_COMMAND"
    )]
    KeyMissing { repo: String },
    #[error(
        "repository {repo} is not encrypted, but an encryption key is configured: refusing to use it (was it created without --encrypt, or its walvault.json replaced?)"
    )]
    NotEncrypted { repo: String },
    #[error("repository {repo}: {source}")]
    Key { repo: String, source: KeyError },
    #[error(
        "cannot create an encrypted repository at {repo}: no key is configured (set key_file or key_command in the [encryption] table of the configuration file, or WALVAULT_ENCRYPTION_KEY_FILE / WALVAULT_ENCRYPTION_KEY_COMMAND)"
    )]
    InitEncryptWithoutKey { repo: String },
    #[error(
        "an encryption key is configured, so the repository at {repo} would not be usable unencrypted: create it with `archive-agent init --encrypt`, or remove the key from the configuration"
    )]
    InitKeyWithoutEncrypt { repo: String },
    #[error(
        "repository {repo} is not encrypted: it has no key to rotate (encryption is chosen when the repository is created, by `archive-agent init --encrypt`)"
    )]
    NothingToRekey { repo: String },
    #[error(
        "fallback repository {fallback} is not a copy of repository {repo}: its id is {fallback_id}, not {id} (--fallback-repo / WALVAULT_FALLBACK_REPO / fallback_repo must name a copy made by `archive-agent copy`)"
    )]
    NotACopy {
        repo: String,
        fallback: String,
        id: RepoId,
        fallback_id: RepoId,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RepoError {
    /// Whether trying again later may succeed (the store could not be read), as opposed to an
    /// answer (no repository, or an unusable one).
    pub fn is_transient(&self) -> bool {
        match self {
            RepoError::Store(e) => e.is_transient(),
            // A secret manager that did not answer, a key file not mounted yet: worth another try.
            RepoError::Key {
                source: KeyError::Command(_) | KeyError::Read { .. },
                ..
            } => true,
            _ => false,
        }
    }
}

/// A WAL file that does not belong in this repository.
#[derive(Debug, thiserror::Error)]
pub enum WalCheckError {
    #[error("not a valid WAL segment: {0}")]
    InvalidWal(PageError),
    #[error("it is from {found}, but repository {repo} belongs to {expected}")]
    ForeignCluster {
        repo: String,
        found: ClusterIdentity,
        expected: ClusterIdentity,
    },
}

/// An opened repository.
#[derive(Debug, Clone)]
pub struct Repository<S> {
    store: S,
    descriptor: RepoDescriptor,
    /// The descriptor's cluster, else the one `cluster.json` binds, else none yet.
    cluster: Option<ClusterIdentity>,
    /// Seals and opens objects: with the unwrapped keys in an encrypted repository.
    sealer: Sealer,
}

async fn read_descriptor(store: &Store) -> Result<RepoDescriptor, RepoError> {
    let repo = || store.url().to_string();
    let bytes = store
        .get(DESCRIPTOR_KEY)
        .await?
        .ok_or_else(|| RepoError::NotInitialized { repo: repo() })?;
    RepoDescriptor::parse(&bytes).map_err(|source| RepoError::Descriptor { repo: repo(), source })
}

/// The sealer for `descriptor`'s repository: plain, or with the master key unwrapped by `key`'s
/// KEK. An encrypted repository without a key, and a key without an encrypted repository, are
/// refused: the second would let a replaced descriptor turn encryption off unnoticed.
/// Run key work (reading a key file, a key command, Argon2id) off the async threads; its errors
/// are about the repository `repo`.
async fn key_task<T: Send + 'static>(
    repo: &str,
    work: impl FnOnce() -> Result<T, KeyError> + Send + 'static,
) -> Result<T, RepoError> {
    let key_err = |source| RepoError::Key {
        repo: repo.to_string(),
        source,
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| key_err(KeyError::Command(format!("key task failed: {e}"))))?
        .map_err(key_err)
}

async fn sealer_for(
    store: &Store,
    descriptor: &RepoDescriptor,
    key: Option<&KeySource>,
) -> Result<Sealer, RepoError> {
    let repo = || store.url().to_string();
    match (&descriptor.encryption, key) {
        (None, None) => Ok(Sealer::plain()),
        (None, Some(_)) => Err(RepoError::NotEncrypted { repo: repo() }),
        (Some(_), None) => Err(RepoError::KeyMissing { repo: repo() }),
        (Some(record), Some(source)) => {
            let (record, source, id) = (record.clone(), source.clone(), descriptor.id().clone());
            let keys = key_task(&repo(), move || RepoKeys::open(&record, &source, &id)).await?;
            Ok(Sealer::encrypted(keys))
        }
    }
}

async fn read_cluster_file(store: &Store, sealer: &Sealer) -> Result<Option<ClusterIdentity>, RepoError> {
    match Objects::new(store, sealer)
        .read_if_present::<ClusterFile>(&())
        .await
    {
        Ok(file) => Ok(file.map(|f| f.cluster)),
        Err(ReadError::Store(e)) => Err(e.into()),
        Err(ReadError::Missing { .. }) => Ok(None),
        Err(ReadError::Damaged { reason, .. }) => Err(RepoError::ClusterFile {
            repo: store.url().to_string(),
            message: reason.to_string(),
        }),
    }
}

const CLUSTER_FORMAT: &str = "walvault-cluster";

/// `cluster.json`: the identity the first archived segment bound (see `docs/FORMAT.md`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ClusterFile {
    format: String,
    version: u32,
    cluster: ClusterIdentity,
}

/// Why `cluster.json` is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ClusterFileError {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("unknown format {format:?} version {version}")]
    Unknown { format: String, version: u32 },
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

impl StoredKind for ClusterFile {
    type Id = ();
    type Error = ClusterFileError;
    const ENVELOPE: Envelope = Envelope::Record;

    fn key(_: &()) -> String {
        CLUSTER_KEY.to_string()
    }

    fn parse(opened: Opened, _: &()) -> Result<ClusterFile, ClusterFileError> {
        let file: ClusterFile = serde_json::from_slice(&opened.content)?;
        if file.format != CLUSTER_FORMAT || file.version != 1 {
            return Err(ClusterFileError::Unknown {
                format: file.format,
                version: file.version,
            });
        }
        file.cluster.validate()?;
        Ok(file)
    }
}

impl<S: AsRef<Store>> Repository<S> {
    /// The repository on an opened store: its descriptor read and validated, and, when it is
    /// encrypted, its master key unwrapped with `key`'s.
    pub async fn on_store(store: S, key: Option<&KeySource>) -> Result<Repository<S>, RepoError> {
        let descriptor = read_descriptor(store.as_ref()).await?;
        let sealer = sealer_for(store.as_ref(), &descriptor, key).await?;
        let cluster = match descriptor.cluster {
            Some(c) => Some(c),
            None => read_cluster_file(store.as_ref(), &sealer).await?,
        };
        Ok(Repository {
            store,
            descriptor,
            cluster,
            sealer,
        })
    }

    /// This repository's objects, for reading one of a kind.
    pub fn objects(&self) -> Objects<'_> {
        Objects::new(self.store.as_ref(), &self.sealer)
    }

    /// Object `id` of kind `K` ([`Objects::read`]).
    pub async fn read<K: StoredKind>(&self, id: &K::Id) -> Result<K, ReadError<K::Error>> {
        self.objects().read(id).await
    }

    /// Object `id` of kind `K`, `None` when absent ([`Objects::read_if_present`]).
    pub async fn read_if_present<K: StoredKind>(&self, id: &K::Id) -> Result<Option<K>, ReadError<K::Error>> {
        self.objects().read_if_present(id).await
    }

    /// Seals and opens this repository's objects.
    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// The store, for reading.
    pub fn store(&self) -> &Store {
        self.store.as_ref()
    }

    pub fn url(&self) -> &RepoUrl {
        self.store().url()
    }

    pub fn id(&self) -> &RepoId {
        self.descriptor.id()
    }

    pub fn descriptor(&self) -> &RepoDescriptor {
        &self.descriptor
    }

    /// The cluster whose WAL this repository holds; `None` until the first segment is archived
    /// into a repository created without `--pgdata`.
    pub fn cluster(&self) -> Option<&ClusterIdentity> {
        self.cluster.as_ref()
    }

    /// The same repository, read-only.
    pub fn reader(&self) -> Reader {
        Repository {
            store: self.store().clone(),
            descriptor: self.descriptor.clone(),
            cluster: self.cluster,
            sealer: self.sealer.clone(),
        }
    }

    /// Check a WAL file read from (or about to be written to) this repository: a segment's page
    /// header against its name and against the repository's cluster. Other files carry no
    /// identity and pass.
    pub fn check_wal(&self, name: &WalFileName, content: &[u8]) -> Result<(), WalCheckError> {
        let Some(seg) = name.wal_segment() else {
            return Ok(());
        };
        let info = crate::wal::page::validate_segment(content, &seg).map_err(WalCheckError::InvalidWal)?;
        let found = ClusterIdentity::from(&info);
        match self.cluster {
            Some(expected) if expected != found => Err(WalCheckError::ForeignCluster {
                repo: self.url().to_string(),
                found,
                expected,
            }),
            _ => Ok(()),
        }
    }
}

impl Reader {
    /// Open the repository at `url` for reading: one request for `walvault.json` (and, for a
    /// repository created without `--pgdata`, one for `cluster.json`), each retried as any.
    pub async fn open(url: &RepoUrl, options: &StoreOptions) -> Result<Reader, RepoError> {
        Reader::on_store(Store::open_retrying(url, options).await?, options.key.as_ref()).await
    }

    /// Open the repository at `url` for reading, with the copy at `fallback`, when given,
    /// answering for what it lacks ([`Reader::on_stores`]).
    pub async fn open_with_fallback(
        url: &RepoUrl,
        fallback: Option<&RepoUrl>,
        options: &StoreOptions,
    ) -> Result<Reader, RepoError> {
        let store = Store::open_with_fallback(url, fallback, options).await?;
        Reader::on_stores(store, options.key.as_ref()).await
    }

    /// [`Repository::on_store`], and when `store` has a fallback ([`Store::with_fallback`]), the
    /// fallback repository opened too (its descriptor read, its key unwrapped with `key`) and
    /// refused unless it has the same id. When `store` holds no repository at all (no
    /// `walvault.json`: a deleted or ransomed bucket), the fallback alone is the repository.
    pub async fn on_stores(store: Store, key: Option<&KeySource>) -> Result<Reader, RepoError> {
        let Some(fallback) = store.fallback().cloned() else {
            return Reader::on_store(store, key).await;
        };
        let (first, second) = tokio::join!(
            Reader::on_store(store.without_fallback(), key),
            Reader::on_store(fallback, key)
        );
        let second = second?;
        let mut first = match first {
            Ok(first) => first,
            Err(RepoError::NotInitialized { .. }) => {
                store.report_running_from_fallback();
                return Ok(second);
            }
            Err(e) => return Err(e),
        };
        if first.id() != second.id() {
            return Err(RepoError::NotACopy {
                repo: first.url().to_string(),
                fallback: second.url().to_string(),
                id: first.id().clone(),
                fallback_id: second.id().clone(),
            });
        }
        first.store = store;
        // A repository bound by cluster.json that only the copy still holds.
        first.cluster = first.cluster.or(second.cluster);
        Ok(first)
    }

    /// Read the descriptor again: whether the repository at this URL is still the one opened.
    pub async fn still_there(&self) -> Result<(), RepoError> {
        let now = read_descriptor(&self.store).await?;
        if now.id() != self.id() {
            return Err(RepoError::Descriptor {
                repo: self.url().to_string(),
                source: DescriptorError::Invalid(format!(
                    "the repository was replaced (id {} is now {})",
                    self.id(),
                    now.id()
                )),
            });
        }
        Ok(())
    }
}

impl Writer {
    /// Open the repository at `url` for writing. Never creates one.
    pub async fn open_writable(url: &RepoUrl, options: &StoreOptions) -> Result<Writer, RepoError> {
        Writer::on_writable_store(
            WritableStore::open_retrying(url, options).await?,
            options.key.as_ref(),
        )
        .await
    }

    /// [`Repository::on_store`] for writing: relies on the store refusing a second create-only
    /// write when `archive-agent init` found it does (the descriptor says so).
    pub async fn on_writable_store(
        store: WritableStore,
        key: Option<&KeySource>,
    ) -> Result<Writer, RepoError> {
        let mut writer = Writer::on_store(store, key).await?;
        if writer.descriptor.create_only_honoured == Some(true) {
            writer.store.trust_create_only();
        }
        Ok(writer)
    }

    /// Create a repository at `url` (`archive-agent init`): a new descriptor with a random id and,
    /// when known, the cluster; with `encrypt`, a new master key wrapped by `options.key`'s KEK.
    /// Refuses when `walvault.json` is already there.
    pub async fn init(
        url: &RepoUrl,
        options: &StoreOptions,
        cluster: Option<ClusterIdentity>,
        now_micros: i64,
        encrypt: bool,
    ) -> Result<Writer, RepoError> {
        let store = WritableStore::open_to_create(url, options)?;
        refuse_existing(&store, url).await?;
        let mut descriptor = RepoDescriptor::new(cluster, now_micros);
        probe_create_only(&store, &mut descriptor).await?;
        match (encrypt, &options.key) {
            (false, Some(_)) => {
                return Err(RepoError::InitKeyWithoutEncrypt {
                    repo: url.to_string(),
                });
            }
            (true, None) => {
                return Err(RepoError::InitEncryptWithoutKey {
                    repo: url.to_string(),
                });
            }
            (true, Some(source)) => {
                let (source, id, at) = (
                    source.clone(),
                    descriptor.id().clone(),
                    descriptor.created_at.clone(),
                );
                let (_, record) =
                    key_task(&url.to_string(), move || RepoKeys::generate(&source, &id, at)).await?;
                descriptor.set_encryption(record);
            }
            (false, None) => {}
        }
        write_descriptor(store, &descriptor, options.key.as_ref()).await
    }

    /// Create a second copy of `source` at `url` (`archive-agent init --copy-of`): its
    /// descriptor with the same id, cluster and encryption record, so that `archive-agent copy`
    /// copies objects byte for byte. The configured key must open the source (it was opened
    /// with it), and so opens the copy.
    pub async fn init_copy(
        url: &RepoUrl,
        options: &StoreOptions,
        source: &Reader,
    ) -> Result<Writer, RepoError> {
        let store = WritableStore::open_to_create(url, options)?;
        refuse_existing(&store, url).await?;
        let mut descriptor = source.descriptor().for_copy(&source.url().to_string());
        probe_create_only(&store, &mut descriptor).await?;
        let writer = write_descriptor(store, &descriptor, options.key.as_ref()).await?;
        if let Some(bytes) = source.store().get(CLUSTER_KEY).await? {
            writer.store.put_new(CLUSTER_KEY, bytes).await?;
        }
        Ok(writer)
    }
}

/// Bring a second copy's key wrap up to its source's after `archive-agent rekey` on the source
/// (`archive-agent copy`): the copy at `url` has the source's id, and the same master key wrapped
/// under the old key, which the configuration no longer gives. Its descriptor takes the
/// source's `encryption` record, which the configured key has just opened, and keeps everything
/// else its own. Returns whether it changed; a location that is no copy of `source` is left
/// alone (opening it says why).
pub async fn follow_rekey(url: &RepoUrl, options: &StoreOptions, source: &Reader) -> Result<bool, RepoError> {
    let Some(wrap) = source.descriptor().encryption.clone() else {
        return Ok(false);
    };
    let store = WritableStore::open_retrying(url, options).await?;
    let Some(bytes) = store.get(DESCRIPTOR_KEY).await? else {
        return Ok(false);
    };
    let Ok(mut copy) = RepoDescriptor::parse(&bytes) else {
        return Ok(false);
    };
    if copy.id() != source.id() || copy.encryption.is_none() || copy.encryption.as_ref() == Some(&wrap) {
        return Ok(false);
    }
    copy.encryption = Some(wrap);
    store.put(DESCRIPTOR_KEY, Bytes::from(copy.to_json())).await?;
    tracing::info!(repo = %url, "the source was rekeyed: the copy's key wrap follows it");
    Ok(true)
}

/// Refuse to create a repository where `walvault.json` is already there.
async fn refuse_existing(store: &WritableStore, url: &RepoUrl) -> Result<(), RepoError> {
    let Some(existing) = store.get(DESCRIPTOR_KEY).await? else {
        return Ok(());
    };
    Err(match RepoDescriptor::parse(&existing) {
        Ok(d) => RepoError::AlreadyExists {
            repo: url.to_string(),
            id: d.id().clone(),
        },
        Err(source) => RepoError::Descriptor {
            repo: url.to_string(),
            source,
        },
    })
}

/// Learn whether the store refuses a second create-only write (not asked of a local one, whose
/// writes are exclusive anyway), and record it in `descriptor`.
async fn probe_create_only(store: &WritableStore, descriptor: &mut RepoDescriptor) -> Result<(), RepoError> {
    if store.is_local() {
        return Ok(());
    }
    let probe = format!("{}{}", super::layout::PROBE_PREFIX, descriptor.id());
    let honoured = store.probe_create_only(&probe).await?;
    tracing::info!(repo = %store.url(), honoured, "probed whether the store refuses a second create-only write");
    descriptor.create_only_honoured = Some(honoured);
    Ok(())
}

/// Write a new repository's descriptor create-only, and open what is then there.
async fn write_descriptor(
    store: WritableStore,
    descriptor: &RepoDescriptor,
    key: Option<&KeySource>,
) -> Result<Writer, RepoError> {
    let url = store.url().clone();
    let json = Bytes::from(descriptor.to_json());
    if store.put_new(DESCRIPTOR_KEY, json).await? == PutNew::AlreadyExists {
        let d = read_descriptor(&store).await?;
        return Err(RepoError::AlreadyExists {
            repo: url.to_string(),
            id: d.id().clone(),
        });
    }
    // A store that ignores create-only writes may have let a racing init replace ours. (Opening
    // it also proves the key source gives the key just wrapped: a key command that answers
    // differently each time is caught here, not at the first push.)
    let writer = Writer::on_store(store, key).await?;
    if writer.id() != descriptor.id() {
        return Err(RepoError::AlreadyExists {
            repo: url.to_string(),
            id: writer.id().clone(),
        });
    }
    Ok(writer)
}

impl Writer {
    /// The store, for writing.
    pub fn writable(&self) -> &WritableStore {
        &self.store
    }

    /// `archive-agent rekey`: wrap the master key under `new_key`'s KEK and replace the
    /// descriptor with one that holds only that wrap. Objects are not rewritten. The descriptor is
    /// one object replaced by one write, so a rekey cut off at any point leaves it openable with
    /// the old key or the new one. Reads the result back and opens it with `new_key`.
    pub async fn rekey(&mut self, new_key: &KeySource, now_micros: i64) -> Result<(), RepoError> {
        let repo = self.url().to_string();
        let Some(keys) = self.sealer.keys().cloned() else {
            return Err(RepoError::NothingToRekey { repo });
        };
        let current = read_descriptor(self.store.as_ref()).await?;
        if current != self.descriptor {
            return Err(RepoError::Descriptor {
                repo,
                source: DescriptorError::Invalid(
                    "walvault.json changed since it was opened (another rekey?); run rekey again".into(),
                ),
            });
        }
        let (source, at) = (
            new_key.clone(),
            crate::time::format_micros(now_micros - now_micros % 1_000_000),
        );
        let record = key_task(&repo, move || keys.rewrap(&source, Some(at))).await?;
        let mut descriptor = self.descriptor.clone();
        descriptor.encryption = Some(record);
        self.store
            .put(DESCRIPTOR_KEY, Bytes::from(descriptor.to_json()))
            .await?;
        let reopened = Writer::on_store(self.store.clone(), Some(new_key)).await?;
        if reopened.id() != self.id() {
            return Err(RepoError::Descriptor {
                repo,
                source: DescriptorError::Invalid("the repository was replaced during rekey".into()),
            });
        }
        *self = reopened;
        Ok(())
    }

    /// Bind the repository to `found` (the cluster of the first segment archived into it) if it is
    /// bound to none yet; returns the cluster it is bound to, which the caller compares.
    pub async fn bind_cluster(&mut self, found: ClusterIdentity) -> Result<ClusterIdentity, RepoError> {
        if let Some(c) = self.cluster {
            return Ok(c);
        }
        let file = ClusterFile {
            format: CLUSTER_FORMAT.into(),
            version: 1,
            cluster: found,
        };
        let mut json = serde_json::to_vec_pretty(&file).expect("cluster file serializes");
        json.push(b'\n');
        let put = self
            .store
            .put_new(CLUSTER_KEY, self.sealer.seal_record(CLUSTER_KEY, json))
            .await?;
        if put == PutNew::Created && self.store.create_semantics() == CreateSemantics::Atomic {
            tracing::info!(repo = %self.url(), cluster = %found, "repository bound to its cluster");
            self.cluster = Some(found);
            return Ok(found);
        }
        // Already bound by someone else, or a store that may have let a racing writer win: what
        // is stored is the answer.
        let stored = read_cluster_file(&self.store, &self.sealer)
            .await?
            .ok_or_else(|| {
                RepoError::Store(StoreError {
                    op: "read back",
                    key: CLUSTER_KEY.into(),
                    repo: self.url().to_string(),
                    message: "object missing right after it was written".into(),
                    kind: crate::repo::StoreErrorKind::Failed,
                    attempts: 1,
                })
            })?;
        self.cluster = Some(stored);
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn options() -> StoreOptions {
        StoreOptions {
            retry_timeout: Duration::from_millis(300),
            ..Default::default()
        }
    }

    fn identity(sysid: u64) -> ClusterIdentity {
        ClusterIdentity {
            system_identifier: sysid,
            wal_segment_size: 16 << 20,
            wal_block_size: 8192,
            pg_version: 17,
        }
    }

    #[tokio::test]
    async fn nothing_but_init_creates_a_repository() {
        let dir = tempfile::tempdir().unwrap();
        let url: RepoUrl = format!("file://{}/r", dir.path().display()).parse().unwrap();
        let e = Writer::open_writable(&url, &options()).await.unwrap_err();
        assert!(
            e.is_transient(),
            "a missing directory may be a mount not up yet: {e}"
        );
        std::fs::create_dir(dir.path().join("r")).unwrap();
        let e = Writer::open_writable(&url, &options()).await.unwrap_err();
        assert!(matches!(e, RepoError::NotInitialized { .. }), "{e}");
        assert!(e.to_string().contains("archive-agent init"));
        let e = Reader::open(&url, &options()).await.unwrap_err();
        assert!(matches!(e, RepoError::NotInitialized { .. }), "{e}");

        let created = Writer::init(&url, &options(), None, 0, false).await.unwrap();
        assert_eq!(created.cluster(), None);
        let again = Writer::init(&url, &options(), None, 0, false).await.unwrap_err();
        assert!(
            matches!(again, RepoError::AlreadyExists { ref id, .. } if id == created.id()),
            "{again}"
        );
        let reader = Reader::open(&url, &options()).await.unwrap();
        assert_eq!(reader.id(), created.id());
        reader.still_there().await.unwrap();

        // Recreated at the same URL: a different repository, and the old handle notices.
        std::fs::remove_dir_all(dir.path().join("r")).unwrap();
        let recreated = Writer::init(&url, &options(), None, 0, false).await.unwrap();
        assert_ne!(recreated.id(), created.id());
        assert!(reader.still_there().await.is_err());
    }

    #[tokio::test]
    async fn the_first_cluster_binds_an_unbound_repository() {
        let dir = tempfile::tempdir().unwrap();
        let url: RepoUrl = format!("file://{}/r", dir.path().display()).parse().unwrap();
        let mut w = Writer::init(&url, &options(), None, 0, false).await.unwrap();
        assert_eq!(w.bind_cluster(identity(1)).await.unwrap(), identity(1));
        let mut other = Writer::open_writable(&url, &options()).await.unwrap();
        assert_eq!(other.cluster(), Some(&identity(1)));
        assert_eq!(other.bind_cluster(identity(2)).await.unwrap(), identity(1));
        // A writer opened before the binding learns it from what is stored.
        let dir2 = tempfile::tempdir().unwrap();
        let url2: RepoUrl = format!("file://{}/r", dir2.path().display()).parse().unwrap();
        let mut early = Writer::init(&url2, &options(), None, 0, false).await.unwrap();
        let mut late = Writer::open_writable(&url2, &options()).await.unwrap();
        assert_eq!(early.bind_cluster(identity(3)).await.unwrap(), identity(3));
        assert_eq!(late.bind_cluster(identity(4)).await.unwrap(), identity(3));
        let bound = Writer::init(
            &format!("file://{}/b", dir2.path().display()).parse().unwrap(),
            &options(),
            Some(identity(5)),
            0,
            false,
        )
        .await
        .unwrap();
        assert_eq!(bound.cluster(), Some(&identity(5)));
    }

    #[tokio::test]
    async fn init_says_which_half_of_encryption_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let url: RepoUrl = format!("file://{}", dir.path().display()).parse().unwrap();
        let e = Writer::init(&url, &options(), None, 0, true).await.unwrap_err();
        assert!(matches!(e, RepoError::InitEncryptWithoutKey { .. }), "{e}");
        let key = dir.path().join("k");
        std::fs::write(&key, "ab".repeat(32)).unwrap();
        let keyed = StoreOptions {
            key: Some(KeySource::File(key)),
            ..options()
        };
        let e = Writer::init(&url, &keyed, None, 0, false).await.unwrap_err();
        assert!(e.to_string().contains("init --encrypt"), "{e}");
        // Neither refused init wrote anything: the location is still free. A plain repository
        // has no key to rotate.
        let mut plain = Writer::init(&url, &options(), None, 0, false).await.unwrap();
        let e = plain
            .rekey(&KeySource::File(dir.path().join("k")), 0)
            .await
            .unwrap_err();
        assert!(matches!(e, RepoError::NothingToRekey { .. }), "{e}");
        std::fs::remove_file(dir.path().join("walvault.json")).unwrap();
        assert!(
            Writer::init(&url, &keyed, None, 0, true)
                .await
                .unwrap()
                .sealer()
                .is_encrypted()
        );
    }

    /// A rekey replaces one object: cut off before, during or after that write, the repository
    /// opens with the old key or the new one (never neither, never both), and every object
    /// written before opens with whichever does.
    #[tokio::test]
    async fn a_rekey_cut_off_anywhere_leaves_the_old_key_or_the_new_one() {
        use super::super::fault::{Fault, FaultStore};
        use super::super::object::ObjectKind;
        use std::sync::Arc;

        let dir = tempfile::tempdir().unwrap();
        let key = |name: &str, hex: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, hex).unwrap();
            KeySource::File(p)
        };
        let (k1, k2, k3) = (
            key("k1", &"11".repeat(32)),
            key("k2", &"22".repeat(32)),
            key("k3", &"33".repeat(32)),
        );
        let faults = Arc::new(FaultStore::new(Fault::None));
        let store = FaultStore::s3_like(&faults, Duration::from_millis(200));
        let mut d = RepoDescriptor::new(None, 0);
        let (_, record) = RepoKeys::generate(&k1, d.id(), None).unwrap();
        d.set_encryption(record);
        store.put(DESCRIPTOR_KEY, d.to_json().into()).await.unwrap();
        let mut w = Writer::on_store(store.clone(), Some(&k1)).await.unwrap();
        let sealed = w
            .sealer()
            .seal(ObjectKind::Chunk, "c", b"written before the rotation", 3)
            .unwrap();

        let opens = |k: &KeySource| {
            let (store, k, bytes) = (store.clone(), k.clone(), sealed.bytes.clone());
            async move {
                match Reader::on_store(Store::clone(store.as_ref()), Some(&k)).await {
                    Ok(r) => {
                        let (_, content) = r.sealer().open(&bytes, ObjectKind::Chunk, "c").unwrap();
                        assert_eq!(content, b"written before the rotation");
                        true
                    }
                    Err(RepoError::Key {
                        source: KeyError::Wrong(_),
                        ..
                    }) => false,
                    Err(e) => panic!("{e}"),
                }
            }
        };
        // The write refused: nothing changed.
        faults.set(Fault::Denied);
        assert!(w.rekey(&k2, 0).await.is_err());
        faults.set(Fault::None);
        assert!(opens(&k1).await && !opens(&k2).await);
        // The write landed but its answer was lost: retried, and the new key is the one.
        faults.set(Fault::LoseWriteAnswers);
        let r = w.rekey(&k2, 0).await;
        faults.set(Fault::None);
        assert!(
            opens(&k1).await != opens(&k2).await,
            "exactly one key opens ({r:?})"
        );
        // A clean rotation from whichever key holds it now.
        let holder = if opens(&k1).await { &k1 } else { &k2 };
        let mut w = Writer::on_store(store.clone(), Some(holder)).await.unwrap();
        w.rekey(&k3, 0).await.unwrap();
        assert!(!opens(&k1).await && !opens(&k2).await && opens(&k3).await);
        assert!(w.sealer().is_encrypted());
    }

    /// Frozen fixtures: an unbound v2 descriptor and the `cluster.json` v1 that binds it.
    #[tokio::test]
    async fn frozen_cluster_file_binds_an_unbound_repository() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("walvault.json"),
            include_bytes!("../../tests/fixtures/walvault-v2-unbound.json"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("cluster.json"),
            include_bytes!("../../tests/fixtures/cluster-v1.json"),
        )
        .unwrap();
        let url: RepoUrl = format!("file://{}", dir.path().display()).parse().unwrap();
        let reader = Reader::open(&url, &options()).await.unwrap();
        assert_eq!(reader.id().as_str(), "0123456789abcdef0123456789abcdef");
        let c = reader.cluster().unwrap();
        assert_eq!(c.system_identifier, 7_441_234_567_890_123_456);
        assert_eq!(c.pg_version, 17);
    }
}
