//! Object storage behind the repository, through `object_store`, with errors classified for the
//! one retry policy (see [`crate::retry`]).
//!
//! Retries happen in one place only, here, so no caller can forget them: `object_store`'s own
//! retry loop is switched off (`max_retries = 0`) and every method of [`Store`] and
//! [`WritableStore`] runs its request under the store's [`crate::retry::RetryPolicy`], which
//! retries only errors classified transient (never "not found", "already exists" or a failed
//! precondition, which are answers, nor a refused credential), within the policy's total time.
//! Each HTTP request is bounded by [`CONNECT_TIMEOUT`] and [`REQUEST_TIMEOUT`].
//!
//! Read-only is a type: [`Store`] has no method that writes; only [`WritableStore`] (which
//! archive-agent alone opens) does.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::AmazonS3ConfigKey;
use object_store::azure::AzureConfigKey;
use object_store::gcp::GoogleConfigKey;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::http::{ClassifyingConnector, RefusedStatus};
use super::reads::{ReadStats, Request, answered};
use super::settings::{AzureSettings, GcsSettings, S3Settings, Secret};
use super::url::{RepoLocation, RepoUrl};
use crate::retry::{RetryPolicy, Retryable};

mod fallback;
mod staged;
pub use staged::Staged;

/// Longest wait for a TCP (and TLS) connection to the object store.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a single request may take, body included. The largest object a push or fetch moves
/// in one request is one sealed WAL segment (16 MiB by default, compressed), which needs under
/// 1 MB/s to finish in time; larger objects go up in parts of [`PART_SIZE`].
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Objects larger than this are uploaded to object stores in parts.
pub const MULTIPART_THRESHOLD: usize = 32 << 20;
/// Size of each part of a multipart upload.
pub const PART_SIZE: usize = 16 << 20;

/// What opening a store needs besides its URL.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// The total time one call keeps retrying transient errors.
    pub retry_timeout: Duration,
    /// S3 settings from the configuration file; `AWS_*` environment variables win.
    pub s3: S3Settings,
    /// Azure settings from the configuration file; `AZURE_*` environment variables win.
    pub azure: AzureSettings,
    /// GCS settings from the configuration file; `GOOGLE_*` environment variables win.
    pub gcs: GcsSettings,
    /// Where an encrypted repository's key comes from. Read by [`super::Repository`] only,
    /// never by the store.
    pub key: Option<super::keys::KeySource>,
    /// The cap on what this process writes (`--max-rate`), shared by every store opened with
    /// these options.
    pub rate_limit: Option<Arc<super::rate::RateLimit>>,
}

/// A storage failure, classified.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "cannot {op} {key}{}repository {repo}: {message}{}{}",
    if key.is_empty() { "" } else { " in " },
    if *attempts > 1 { format!(" (gave up after {attempts} attempts)") } else { String::new() },
    kind.remedy()
)]
pub struct StoreError {
    pub op: &'static str,
    pub key: String,
    pub repo: String,
    pub message: String,
    pub kind: StoreErrorKind,
    /// Requests made before giving up (0 when none could be made).
    pub attempts: u32,
}

/// What kind of failure a [`StoreError`] is, from `object_store`'s error variants and the
/// HTTP status or transport failure under them (never from message text): whether another
/// attempt may succeed, and what to tell the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// An answer, not a failure: not found, already exists, a failed precondition, not modified.
    Answer,
    /// The credentials were refused (401, 403).
    Denied,
    /// The request cannot succeed as made: a 4xx status, an operation the store does not
    /// support, an invalid path or setting.
    Refused,
    /// The store could not be reached: no connection, or none in time.
    Unreachable,
    /// A local repository's directory is not there (a backup volume not mounted yet?).
    NoDirectory,
    /// Anything else (a 5xx, a reset connection, an I/O error): worth another attempt.
    Failed,
}

impl StoreErrorKind {
    /// Whether another attempt may succeed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            StoreErrorKind::Unreachable | StoreErrorKind::NoDirectory | StoreErrorKind::Failed
        )
    }

    /// What to do about it, for the end of the message.
    fn remedy(self) -> &'static str {
        match self {
            StoreErrorKind::Unreachable => {
                "; check that the store is running and that its endpoint in the configuration is right"
            }
            StoreErrorKind::NoDirectory => {
                "; mount the backup volume, or create the repository with `archive-agent init`"
            }
            _ => "",
        }
    }

    /// The kind of an `object_store` error.
    pub fn of(e: &object_store::Error) -> StoreErrorKind {
        use object_store::Error as E;
        match e {
            E::NotFound { .. } | E::AlreadyExists { .. } | E::Precondition { .. } | E::NotModified { .. } => {
                StoreErrorKind::Answer
            }
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => StoreErrorKind::Denied,
            E::NotSupported { .. }
            | E::NotImplemented { .. }
            | E::InvalidPath { .. }
            | E::UnknownConfigurationKey { .. } => StoreErrorKind::Refused,
            E::Generic { source, .. } => StoreErrorKind::of_cause(source.as_ref()),
            _ => StoreErrorKind::Failed,
        }
    }

    /// The kind of a generic error, from its source chain: a status retrying cannot change
    /// ([`super::http::RefusedStatus`]) or a transport failure (`HttpError`'s kind).
    fn of_cause(source: &(dyn std::error::Error + 'static)) -> StoreErrorKind {
        use object_store::client::{HttpError, HttpErrorKind};
        let chain = || std::iter::successors(Some(source), |e| e.source());
        // The refusal is the transport error's own cause: look for it first.
        if chain().any(|e| e.is::<RefusedStatus>()) {
            return StoreErrorKind::Refused;
        }
        if let Some(http) = chain().find_map(|e| e.downcast_ref::<HttpError>()) {
            return match http.kind() {
                HttpErrorKind::Connect | HttpErrorKind::Timeout => StoreErrorKind::Unreachable,
                _ => StoreErrorKind::Failed,
            };
        }
        StoreErrorKind::Failed
    }
}

impl StoreError {
    /// Whether another attempt may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }
}

impl Retryable for StoreError {
    fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }
}

/// How a store treats "create only if absent" writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateSemantics {
    /// The store refuses to replace an existing object (local file system: link(2) fails with EEXIST).
    Atomic,
    /// The store may silently overwrite (S3-compatible stores that ignore `If-None-Match`): callers
    /// check before writing and read back after.
    CheckThenWrite,
}

/// Outcome of [`Store::put_new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutNew {
    Created,
    AlreadyExists,
}

/// The repository's object store, rooted at the repository prefix, for reading only.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: Path,
    url: RepoUrl,
    create: CreateSemantics,
    retry: RetryPolicy,
    /// A local repository's directory (objects are files under it).
    local_root: Option<std::path::PathBuf>,
    /// Where this handle's requests are recorded ([`Store::recording`]).
    reads: Option<ReadStats>,
    /// The process's cap on writes, if any.
    rate: Option<Arc<super::rate::RateLimit>>,
    /// A copy of the repository that answers for what this one lacks (`--fallback-repo`).
    fallback: Option<Arc<Store>>,
}

/// The repository's object store, for archive-agent: a [`Store`] that can also write.
#[derive(Clone, Debug)]
pub struct WritableStore(Store);

impl std::ops::Deref for WritableStore {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.0
    }
}

impl AsRef<Store> for Store {
    fn as_ref(&self) -> &Store {
        self
    }
}

impl AsRef<Store> for WritableStore {
    fn as_ref(&self) -> &Store {
        &self.0
    }
}

// By hand: the clients' own `Debug` shows their credentials (the Azure account key's bytes).
impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .field("create", &self.create)
            .field("retry", &self.retry)
            .field("fallback", &self.fallback().map(Store::url))
            .finish_non_exhaustive()
    }
}

/// Client settings, lowest precedence first: the configuration file's table (`file`), then every
/// `env_prefix*` environment variable `object_store` knows (the environment wins, as for every
/// other setting), then walvault's fixed connect and request timeouts.
fn layered_settings<K: std::str::FromStr>(
    file: Vec<(K, Option<String>)>,
    env_prefix: &str,
    client: fn(ClientConfigKey) -> K,
) -> Vec<(K, String)> {
    let mut out: Vec<(K, String)> = file.into_iter().filter_map(|(k, v)| Some((k, v?))).collect();
    for (name, value) in std::env::vars_os() {
        if let (Some(name), Some(value)) = (name.to_str(), value.to_str())
            && name.starts_with(env_prefix)
            && let Ok(key) = name.to_ascii_lowercase().parse::<K>()
        {
            out.push((key, value.to_string()));
        }
    }
    out.push((
        client(ClientConfigKey::ConnectTimeout),
        format!("{}s", CONNECT_TIMEOUT.as_secs()),
    ));
    out.push((
        client(ClientConfigKey::Timeout),
        format!("{}s", REQUEST_TIMEOUT.as_secs()),
    ));
    out
}

fn secret(s: &Option<Secret>) -> Option<String> {
    s.as_ref().map(|s| s.expose().to_string())
}

/// An S3 client: the `[s3]` table, then the usual `AWS_*` environment (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
/// `AWS_ALLOW_HTTP`, ...), then the bucket from the URL and walvault's timeouts and retry settings.
fn s3_builder(url: &RepoUrl, file: &S3Settings) -> object_store::aws::AmazonS3Builder {
    use AmazonS3ConfigKey as K;
    let from_file = vec![
        (K::Endpoint, file.endpoint.clone()),
        (K::Region, file.region.clone()),
        (K::AccessKeyId, file.access_key_id.clone()),
        (K::SecretAccessKey, secret(&file.secret_access_key)),
        (K::Token, secret(&file.session_token)),
        (
            K::Client(ClientConfigKey::AllowHttp),
            file.allow_http.map(|v| v.to_string()),
        ),
        (
            K::VirtualHostedStyleRequest,
            file.virtual_hosted_style.map(|v| v.to_string()),
        ),
    ];
    layered_settings(from_file, "AWS_", K::Client)
        .into_iter()
        .fold(object_store::aws::AmazonS3Builder::new(), |b, (k, v)| {
            b.with_config(k, v)
        })
        .with_url(url.as_str())
        .with_retry(retry_config())
        .with_http_connector(ClassifyingConnector)
}

/// One retry layer: ours. object_store's retries would multiply attempts and stretch the time
/// bound PostgreSQL's archiver and recovery rely on.
fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 0,
        retry_timeout: REQUEST_TIMEOUT,
        ..Default::default()
    }
}

/// An Azure Blob client: the `[azure]` table, then the `AZURE_*` environment
/// (`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_ENDPOINT`,
/// `AZURE_STORAGE_USE_EMULATOR`, `AZURE_ALLOW_HTTP`, ... any name `object_store` knows), then the
/// container from the URL and walvault's timeouts and retry settings.
fn azure_builder(url: &RepoUrl, file: &AzureSettings) -> object_store::azure::MicrosoftAzureBuilder {
    use AzureConfigKey as K;
    let from_file = vec![
        (K::AccountName, file.account.clone()),
        (K::AccessKey, secret(&file.access_key)),
        (K::Endpoint, file.endpoint.clone()),
        (K::UseEmulator, file.use_emulator.map(|v| v.to_string())),
        (
            K::Client(ClientConfigKey::AllowHttp),
            file.allow_http.map(|v| v.to_string()),
        ),
    ];
    layered_settings(from_file, "AZURE_", K::Client)
        .into_iter()
        .fold(object_store::azure::MicrosoftAzureBuilder::new(), |b, (k, v)| {
            b.with_config(k, v)
        })
        .with_url(url.as_str())
        .with_retry(retry_config())
        .with_http_connector(ClassifyingConnector)
}

/// Where `url` leads with these settings, as one line: the URL, and for an object store the
/// endpoint (and Azure account) its client would talk to, after the environment's overrides. Two
/// processes that compute the same line use the same store: the daemon's record of the
/// repository it found there is only trusted by a push that computes the same line.
pub fn store_identity(url: &RepoUrl, options: &StoreOptions) -> String {
    match url.location() {
        RepoLocation::Local(dir) => {
            let dir = dir.canonicalize().unwrap_or(dir);
            format!("{url} dir={}", dir.display())
        }
        RepoLocation::S3 { .. } => {
            let b = s3_builder(url, &options.s3);
            let endpoint = b.get_config_value(&AmazonS3ConfigKey::Endpoint);
            format!("{url} endpoint={}", endpoint.unwrap_or_default())
        }
        RepoLocation::Azure { .. } => {
            let b = azure_builder(url, &options.azure);
            let get = |k| b.get_config_value(&k).unwrap_or_default();
            format!(
                "{url} account={} endpoint={} emulator={}",
                get(AzureConfigKey::AccountName),
                get(AzureConfigKey::Endpoint),
                get(AzureConfigKey::UseEmulator)
            )
        }
        RepoLocation::Gcs { .. } => url.to_string(),
    }
}

/// Open the store `url` names; with `create_local`, a local repository's directory is created
/// (by `archive-agent init` only).
fn open(url: &RepoUrl, options: &StoreOptions, create_local: bool) -> Result<Store, StoreError> {
    let fail = |message: String, kind: StoreErrorKind| StoreError {
        op: "open",
        key: String::new(),
        repo: url.to_string(),
        message,
        kind,
        attempts: 0,
    };
    let retry = RetryPolicy::with_total(options.retry_timeout);
    let mut local_root = None;
    let (inner, prefix, create): (Arc<dyn ObjectStore>, Path, CreateSemantics) = match url.location() {
        RepoLocation::Local(dir) => {
            if create_local {
                std::fs::create_dir_all(&dir).map_err(|e| {
                    fail(
                        format!("cannot create {}: {e}", dir.display()),
                        StoreErrorKind::Failed,
                    )
                })?;
            } else if !dir.is_dir() {
                return Err(fail(
                    format!("{} does not exist or is not a directory", dir.display()),
                    StoreErrorKind::NoDirectory,
                ));
            }
            // fsync on: a put returns only once file and directory entry are on disk, which is
            // what lets push acknowledge a segment to PostgreSQL.
            let fs = LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| fail(e.to_string(), StoreErrorKind::Failed))?
                .with_fsync(true)
                // expire deletes segments and chunks: their emptied directories go with them.
                .with_automatic_cleanup(true);
            local_root = Some(dir);
            (Arc::new(fs), Path::default(), CreateSemantics::Atomic)
        }
        RepoLocation::S3 { prefix, .. } => {
            let s3 = s3_builder(url, &options.s3)
                .build()
                .map_err(|e| fail(e.to_string(), StoreErrorKind::Refused))?;
            (Arc::new(s3), Path::from(prefix), CreateSemantics::CheckThenWrite)
        }
        RepoLocation::Azure { prefix, .. } => {
            let azure = azure_builder(url, &options.azure)
                .build()
                .map_err(|e| fail(e.to_string(), StoreErrorKind::Refused))?;
            (
                Arc::new(azure),
                Path::from(prefix),
                CreateSemantics::CheckThenWrite,
            )
        }
        RepoLocation::Gcs { prefix, .. } => {
            let gcs = gcs_builder(url, &options.gcs)
                .build()
                .map_err(|e| fail(e.to_string(), StoreErrorKind::Refused))?;
            (Arc::new(gcs), Path::from(prefix), CreateSemantics::CheckThenWrite)
        }
    };
    Ok(Store {
        inner,
        prefix,
        url: url.clone(),
        create,
        retry,
        local_root,
        reads: None,
        rate: options.rate_limit.clone(),
        fallback: None,
    })
}

/// A Google Cloud Storage client: the `[gcs]` table, then the `GOOGLE_*` environment
/// (`GOOGLE_SERVICE_ACCOUNT`, `GOOGLE_SERVICE_ACCOUNT_KEY`, `GOOGLE_APPLICATION_CREDENTIALS`, ...
/// any name `object_store` knows), then the bucket from the URL and walvault's timeouts and
/// retry settings.
fn gcs_builder(url: &RepoUrl, file: &GcsSettings) -> object_store::gcp::GoogleCloudStorageBuilder {
    use GoogleConfigKey as K;
    let from_file = vec![
        (K::ServiceAccount, file.service_account.clone()),
        (K::ServiceAccountKey, secret(&file.service_account_key)),
        (K::ApplicationCredentials, file.application_credentials.clone()),
        (
            K::Client(ClientConfigKey::AllowHttp),
            file.allow_http.map(|v| v.to_string()),
        ),
    ];
    layered_settings(from_file, "GOOGLE_", K::Client)
        .into_iter()
        .fold(
            object_store::gcp::GoogleCloudStorageBuilder::new(),
            |b, (k, v)| b.with_config(k, v),
        )
        .with_url(url.as_str())
        .with_retry(retry_config())
        .with_http_connector(ClassifyingConnector)
}

async fn open_retrying<T>(
    options: &StoreOptions,
    open: impl Fn() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    RetryPolicy::with_total(options.retry_timeout)
        .run("opening the repository", || async { open() })
        .await
        .map_err(|(e, attempts)| StoreError { attempts, ..e })
}

impl Store {
    /// Open the store a URL names, for reading. No request is made; a local repository's
    /// directory must exist (a missing one is reported as transient: it may be a mount that is not
    /// up yet), and is never created.
    pub fn open(url: &RepoUrl, options: &StoreOptions) -> Result<Store, StoreError> {
        open(url, options, false)
    }

    /// [`Store::open`], retried within the options' retry budget: a local repository's directory
    /// may be a mount that is not up yet.
    pub async fn open_retrying(url: &RepoUrl, options: &StoreOptions) -> Result<Store, StoreError> {
        open_retrying(options, || Store::open(url, options)).await
    }

    /// A store over any `object_store` backend, with the given creation semantics and retry
    /// policy: for tests (an in-memory or fault-injecting backend) and embedding.
    pub fn with_backend(
        inner: Arc<dyn ObjectStore>,
        url: RepoUrl,
        create: CreateSemantics,
        retry: RetryPolicy,
    ) -> Store {
        Store {
            inner,
            prefix: Path::default(),
            url,
            create,
            retry,
            local_root: None,
            reads: None,
            rate: None,
            fallback: None,
        }
    }

    /// The policy every request of this store runs under.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    pub fn url(&self) -> &RepoUrl {
        &self.url
    }

    pub fn create_semantics(&self) -> CreateSemantics {
        self.create
    }

    /// How a create-only write of a `len`-byte object behaves: objects that go up in parts
    /// carry no create-only condition (`object_store`'s multipart completion has none), so they
    /// are checked before and read back after even on a store that honours the condition.
    pub fn create_semantics_for(&self, len: usize) -> CreateSemantics {
        if self.uses_parts(len) {
            CreateSemantics::CheckThenWrite
        } else {
            self.create
        }
    }

    /// This store, recording each request it makes (every attempt) into `stats`.
    pub fn recording(&self, stats: &ReadStats) -> Store {
        Store {
            reads: Some(stats.clone()),
            fallback: self.fallback.as_ref().map(|f| Arc::new(f.recording(stats))),
            ..self.clone()
        }
    }

    /// A request begins, recorded when this handle records.
    fn begin(&self, op: &'static str) -> Option<Request> {
        self.reads.as_ref().map(|r| r.begin(op))
    }

    /// Whether this is a local repository.
    pub fn is_local(&self) -> bool {
        self.local_root.is_some()
    }

    /// Size and entity tag of an object here, `None` when it does not exist (one HEAD request).
    async fn head_here(&self, key: &str) -> Result<Option<(u64, Option<String>)>, StoreError> {
        let path = self.path(key);
        self.retried("check", key, || async {
            let req = self.begin("check");
            match self.inner.head(&path).await {
                Ok(meta) => {
                    answered(req, 0);
                    Ok(Some((meta.size, meta.e_tag)))
                }
                Err(object_store::Error::NotFound { .. }) => {
                    answered(req, 0);
                    Ok(None)
                }
                Err(e) => Err(self.error("check", key, e)),
            }
        })
        .await
    }

    fn path(&self, key: &str) -> Path {
        // Keys come from `layout`, built from validated names; each part is a plain segment.
        key.split('/')
            .fold(self.prefix.clone(), |p, part| p.clone().join(part))
    }

    /// A local file system error: transient (a full disk or a failing mount may recover, and
    /// PostgreSQL keeps the WAL meanwhile).
    fn error_io(&self, op: &'static str, key: &str, e: std::io::Error) -> StoreError {
        StoreError {
            op,
            key: key.to_string(),
            repo: self.url.to_string(),
            message: e.to_string(),
            kind: StoreErrorKind::Failed,
            attempts: 1,
        }
    }

    fn error(&self, op: &'static str, key: &str, e: object_store::Error) -> StoreError {
        StoreError {
            op,
            key: key.to_string(),
            repo: self.url.to_string(),
            message: e.to_string(),
            // Answers and refusals are final; anything else (5xx, resets, timeouts, I/O) may pass.
            kind: StoreErrorKind::of(&e),
            attempts: 1,
        }
    }

    /// Run one request under the retry policy; the error returned says how many were made.
    async fn retried<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.retry
            .run(&format!("{op} {key}"), f)
            .await
            .map_err(|(e, attempts)| StoreError { attempts, ..e })
    }

    /// Read a whole object here; `None` when it does not exist.
    async fn get_here(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let path = self.path(key);
        self.retried("read", key, || async {
            let mut req = self.begin("read");
            match self.inner.get(&path).await {
                Ok(r) => {
                    req.as_mut().map(Request::first_byte);
                    let bytes = r.bytes().await.map_err(|e| self.error("read", key, e))?;
                    answered(req, bytes.len());
                    Ok(Some(bytes))
                }
                Err(object_store::Error::NotFound { .. }) => {
                    answered(req, 0);
                    Ok(None)
                }
                Err(e) => Err(self.error("read", key, e)),
            }
        })
        .await
    }

    /// Read bytes `range` of an object here (one ranged GET); `None` when it does not exist. A
    /// range past the object's end gives the bytes there are (a HEAD tells, once the read
    /// failed), so that a short object is reported by the caller at once rather than retried.
    async fn get_range_here(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Option<Bytes>, StoreError> {
        let path = self.path(key);
        self.retried("read", key, || async {
            let e = match self.get_range_once(&path, range.clone()).await {
                Ok(b) => return Ok(Some(b)),
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => e,
            };
            match self.inner.head(&path).await {
                Ok(meta) if meta.size < range.end => match meta.size > range.start {
                    true => self
                        .inner
                        .get_range(&path, range.start..meta.size)
                        .await
                        .map(Some)
                        .map_err(|e| self.error("read", key, e)),
                    false => Ok(Some(Bytes::new())),
                },
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                _ => Err(self.error("read", key, e)),
            }
        })
        .await
    }

    /// One ranged read, recorded: a remote store's answer's head is seen apart from its body, so
    /// its time to first byte is known.
    async fn get_range_once(&self, path: &Path, range: std::ops::Range<u64>) -> object_store::Result<Bytes> {
        let mut req = self.begin("read");
        let read = async {
            if req.is_none() || self.local_root.is_some() {
                return self.inner.get_range(path, range).await;
            }
            let options = object_store::GetOptions {
                range: Some(object_store::GetRange::Bounded(range)),
                ..Default::default()
            };
            let answer = self.inner.get_opts(path, options).await?;
            req.as_mut().map(Request::first_byte);
            answer.bytes().await
        };
        let result = read.await;
        match &result {
            Ok(bytes) => answered(req, bytes.len()),
            Err(object_store::Error::NotFound { .. }) => answered(req, 0),
            Err(_) => {}
        }
        result
    }

    /// The size of an object, `None` when it does not exist (one HEAD request).
    pub async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.head(key).await?.map(|(size, _)| size))
    }

    /// Every object here under `prefix` (a key prefix ending at a `/` boundary), as keys relative
    /// to the repository with their sizes, sorted by key. A listing that fails midway is made
    /// again whole.
    async fn list_here(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        use futures::TryStreamExt;
        let base = self.path(prefix.trim_end_matches('/'));
        let strip = self.prefix.as_ref().len() + usize::from(!self.prefix.as_ref().is_empty());
        self.retried("list", prefix, || async {
            let req = self.begin("list");
            let mut out: Vec<(String, u64)> = self
                .inner
                .list(Some(&base))
                .map_ok(|m| {
                    (
                        m.location.as_ref().get(strip..).unwrap_or_default().to_string(),
                        m.size,
                    )
                })
                .try_collect()
                .await
                .map_err(|e| self.error("list", prefix, e))?;
            answered(req, 0);
            out.sort();
            Ok(out)
        })
        .await
    }

    fn uses_parts(&self, len: usize) -> bool {
        self.local_root.is_none() && len > MULTIPART_THRESHOLD
    }
}

impl WritableStore {
    /// Open the store a URL names, for writing. Like [`Store::open`], a local repository's
    /// directory must exist: only [`WritableStore::open_to_create`] creates one.
    pub fn open(url: &RepoUrl, options: &StoreOptions) -> Result<WritableStore, StoreError> {
        open(url, options, false).map(WritableStore)
    }

    /// [`WritableStore::open`], retried like [`Store::open_retrying`].
    pub async fn open_retrying(url: &RepoUrl, options: &StoreOptions) -> Result<WritableStore, StoreError> {
        open_retrying(options, || WritableStore::open(url, options)).await
    }

    /// Open for `archive-agent init`, creating a local repository's directory.
    pub fn open_to_create(url: &RepoUrl, options: &StoreOptions) -> Result<WritableStore, StoreError> {
        open(url, options, true).map(WritableStore)
    }

    /// [`Store::with_backend`], writable.
    pub fn with_backend(
        inner: Arc<dyn ObjectStore>,
        url: RepoUrl,
        create: CreateSemantics,
        retry: RetryPolicy,
    ) -> WritableStore {
        WritableStore(Store::with_backend(inner, url, create, retry))
    }

    /// The same store, read-only.
    pub fn reader(&self) -> Store {
        self.0.clone()
    }

    /// Write an object, replacing any existing one. Only for content-addressed objects (the key
    /// is the hash of the content, so a replacement carries the same bytes) and derived data
    /// whose writer knows what it replaces (a just-archived segment's time-index summary).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.retried("write", key, || self.put_once(key, bytes.clone()))
            .await
    }

    /// Wait until the process's cap lets `bytes` more be sent.
    async fn throttle(&self, bytes: usize) {
        if let Some(rate) = &self.rate {
            rate.acquire(bytes as u64).await;
        }
    }

    async fn put_once(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        if self.uses_parts(bytes.len()) {
            return self.put_in_parts(key, bytes).await;
        }
        self.throttle(bytes.len()).await;
        self.inner
            .put(&self.path(key), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.error("write", key, e))
    }

    /// A multipart upload, one part of [`PART_SIZE`] at a time (each its own bounded request);
    /// the object appears whole on completion or not at all, and a failed upload is aborted.
    async fn put_in_parts(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let mut upload = self
            .inner
            .put_multipart(&self.path(key))
            .await
            .map_err(|e| self.error("write", key, e))?;
        let mut at = 0;
        while at < bytes.len() {
            let end = (at + PART_SIZE).min(bytes.len());
            self.throttle(end - at).await;
            if let Err(e) = upload.put_part(PutPayload::from(bytes.slice(at..end))).await {
                let _ = upload.abort().await;
                return Err(self.error("write", key, e));
            }
            at = end;
        }
        match upload.complete().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = upload.abort().await;
                Err(self.error("write", key, e))
            }
        }
    }

    /// Delete objects (an object already gone counts as deleted). Stores with a bulk delete
    /// (S3's DeleteObjects, Azure's blob batch) take up to 1,000 (S3) or 256 (Azure) keys per
    /// request; a failed batch is retried whole, which deletes are safe to be.
    pub async fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        use futures::StreamExt;
        for batch in keys.chunks(1000) {
            let first = batch.first().map(String::as_str).unwrap_or_default();
            self.retried("delete", first, || async {
                let paths: Vec<object_store::Result<Path>> = batch.iter().map(|k| Ok(self.path(k))).collect();
                let mut results = self.inner.delete_stream(futures::stream::iter(paths).boxed());
                while let Some(r) = results.next().await {
                    match r {
                        Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(self.error("delete", first, e)),
                    }
                }
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    /// Delete one object (gone already counts as deleted).
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.delete_many(&[key.to_string()]).await
    }

    /// Write an object only if none exists under `key`. The write is atomic (all or nothing) and,
    /// on a local repository, durable when this returns. On [`CreateSemantics::CheckThenWrite`]
    /// stores `AlreadyExists` is only reported when the store itself detects it; callers check
    /// before and verify after. A retried write whose first attempt did land reports
    /// `AlreadyExists`: callers compare what is stored, as for any existing object.
    pub async fn put_new(&self, key: &str, bytes: Bytes) -> Result<PutNew, StoreError> {
        self.put_new_parts(key, vec![bytes]).await.map(|(p, _)| p)
    }

    /// [`WritableStore::put_new`] of an object given in pieces (sent as they are, never joined
    /// into one buffer), returning the entity tag the store gave the new object, when it gives
    /// one (a later HEAD showing the same tag proves the object is still these bytes).
    pub async fn put_new_parts(
        &self,
        key: &str,
        parts: Vec<Bytes>,
    ) -> Result<(PutNew, Option<String>), StoreError> {
        let payload: PutPayload = parts.into_iter().collect();
        self.retried("write", key, || self.put_new_once(key, payload.clone()))
            .await
    }

    async fn put_new_once(
        &self,
        key: &str,
        payload: PutPayload,
    ) -> Result<(PutNew, Option<String>), StoreError> {
        if self.uses_parts(payload.content_length()) {
            // Multipart uploads carry no create-only condition; these objects are checked before
            // and read back after by the caller ([`Store::create_semantics_for`]).
            let mut whole = Vec::with_capacity(payload.content_length());
            for part in payload.iter() {
                whole.extend_from_slice(part);
            }
            return self
                .put_in_parts(key, Bytes::from(whole))
                .await
                .map(|()| (PutNew::Created, None));
        }
        self.throttle(payload.content_length()).await;
        let path = self.path(key);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self.inner.put_opts(&path, payload.clone(), opts).await {
            Ok(r) => Ok((PutNew::Created, r.e_tag)),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                Ok((PutNew::AlreadyExists, None))
            }
            // A server that rejects the condition outright (501) instead of ignoring it: write
            // without it; on these stores the caller checked before and reads back after.
            Err(object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. })
                if self.create == CreateSemantics::CheckThenWrite =>
            {
                self.inner
                    .put(&path, payload)
                    .await
                    .map(|r| (PutNew::Created, r.e_tag))
                    .map_err(|e| self.error("write", key, e))
            }
            Err(e) => Err(self.error("write", key, e)),
        }
    }

    /// Rely on the store's refusal of a second create-only write (`archive-agent init` found
    /// it honoured and recorded so in the descriptor): single-request writes become
    /// [`CreateSemantics::Atomic`]. Local repositories are atomic already.
    pub(crate) fn trust_create_only(&mut self) {
        self.0.create = CreateSemantics::Atomic;
    }

    /// Whether this store refuses a second create-only write of a name: writes one probe
    /// object under `key` twice with different bytes and reads what stayed, then deletes it.
    /// `true` only when the second write was refused and the first bytes stayed.
    pub async fn probe_create_only(&self, key: &str) -> Result<bool, StoreError> {
        let first = Bytes::from(format!(
            "walvault create-only probe {}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        let result = async {
            if self.put_new(key, first.clone()).await? != PutNew::Created {
                return Ok(false);
            }
            let second = self.put_new(key, Bytes::from_static(b"second")).await?;
            Ok(second == PutNew::AlreadyExists && self.get(key).await?.as_ref() == Some(&first))
        }
        .await;
        let cleanup = self.delete(key).await;
        let honoured = result?;
        cleanup?;
        Ok(honoured)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_kind_never_by_message() {
        use object_store::Error as E;
        use object_store::client::{HttpError, HttpErrorKind};
        let generic = |source: Box<dyn std::error::Error + Send + Sync>| E::Generic { store: "S3", source };
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer");
        let transport = |kind| generic(Box::new(HttpError::new(kind, std::io::Error::other("x"))));
        assert!(StoreErrorKind::of(&transport(HttpErrorKind::Connect)).is_transient());
        assert!(StoreErrorKind::of(&transport(HttpErrorKind::Timeout)).is_transient());
        assert!(
            StoreErrorKind::of(&generic(Box::new(HttpError::new(
                HttpErrorKind::Interrupted,
                reset
            ))))
            .is_transient()
        );
        // A message naming a client status is not a refusal: only the typed status is.
        assert!(StoreErrorKind::of(&generic("status code: 400 Bad Request".into())).is_transient());
        let refused = RefusedStatus {
            status: 400,
            reason: "Bad Request",
            body: String::new(),
        };
        let e = generic(Box::new(HttpError::new(HttpErrorKind::Unknown, refused)));
        assert_eq!(StoreErrorKind::of(&e), StoreErrorKind::Refused);
        let path = String::from("k");
        for answer in [
            E::NotFound {
                path: path.clone(),
                source: "x".into(),
            },
            E::AlreadyExists {
                path: path.clone(),
                source: "x".into(),
            },
            E::Precondition {
                path: path.clone(),
                source: "x".into(),
            },
            E::PermissionDenied {
                path: path.clone(),
                source: "x".into(),
            },
            E::Unauthenticated {
                path,
                source: "x".into(),
            },
        ] {
            assert!(!StoreErrorKind::of(&answer).is_transient(), "{answer}");
        }
    }

    #[tokio::test]
    async fn staged_objects_are_published_once_durably_and_never_listed_before() {
        let dir = tempfile::tempdir().unwrap();
        let url: RepoUrl = format!("file://{}/repo", dir.path().display()).parse().unwrap();
        let options = StoreOptions {
            retry_timeout: Duration::from_secs(1),
            ..Default::default()
        };
        let store = WritableStore::open_to_create(&url, &options).unwrap();
        let write = |bytes: &'static [u8]| {
            let mut staged = store.stage("wal/x/a.wvo").unwrap().expect("local stores stage");
            use std::io::Write;
            staged.file.as_mut().unwrap().write_all(bytes).unwrap();
            staged
        };
        let first = write(b"one");
        // Written, not published: invisible to readers and listings.
        assert_eq!(store.get("wal/x/a.wvo").await.unwrap(), None);
        assert!(store.list("wal/").await.unwrap().is_empty());
        let second = write(b"two");
        assert_eq!(store.publish_new(first).await.unwrap(), PutNew::Created);
        assert_eq!(store.publish_new(second).await.unwrap(), PutNew::AlreadyExists);
        assert_eq!(
            store.get("wal/x/a.wvo").await.unwrap().as_deref(),
            Some(&b"one"[..])
        );
        // Nothing left behind: neither staging file, nor one dropped unpublished.
        drop(write(b"three"));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("repo/wal/x"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["a.wvo"]);
        assert_eq!(
            store.list("wal/").await.unwrap(),
            vec![("wal/x/a.wvo".to_string(), 3)]
        );
    }

    #[tokio::test]
    async fn local_store_is_never_created_by_opening_it() {
        let dir = tempfile::tempdir().unwrap();
        let url: RepoUrl = format!("file://{}/repo", dir.path().display()).parse().unwrap();
        let options = StoreOptions {
            retry_timeout: Duration::from_secs(1),
            ..Default::default()
        };
        assert!(Store::open(&url, &options).unwrap_err().is_transient());
        assert!(WritableStore::open(&url, &options).is_err());
        assert!(!dir.path().join("repo").exists());
        let store = WritableStore::open_to_create(&url, &options).unwrap();
        assert_eq!(store.get("wal/x/a.wvo").await.unwrap(), None);
        let put = store
            .put_new("wal/x/a.wvo", Bytes::from_static(b"one"))
            .await
            .unwrap();
        assert_eq!(put, PutNew::Created);
        let again = store
            .put_new("wal/x/a.wvo", Bytes::from_static(b"two"))
            .await
            .unwrap();
        assert_eq!(again, PutNew::AlreadyExists);
        assert_eq!(
            store.get("wal/x/a.wvo").await.unwrap().as_deref(),
            Some(&b"one"[..])
        );
        let reader = Store::open(&url, &options).unwrap();
        assert_eq!(
            reader.list("wal/").await.unwrap(),
            vec![("wal/x/a.wvo".to_string(), 3)]
        );
    }
}
