//! A second copy of the repository that answers for what the first lacks (restore-agent's
//! `--fallback-repo`): the same repository id and keys, the same objects under the same keys
//! (what `archive-agent copy` makes).
//!
//! Every read of a [`Store`] that has one goes through here, so no command re-implements it:
//! an object the first store does not have (`get`, `get_range`, `head`) is asked of the
//! fallback, and listings are the union of both, so that a restore plans with WAL only the copy
//! holds. An object the first store has but that does not open (a damaged envelope, a wrong
//! hash) is read again from the fallback by whoever opened it, through
//! [`Store::reread_from_fallback`], since only the opener can tell damage.
//!
//! A store error on the first store (unreachable, access denied) is not answered from the
//! fallback: the error stands, as without one. Asking the copy then would first spend the whole
//! retry budget on the unreachable store, and a copy that lacks the object would turn "cannot
//! tell" into "not found", which ends PostgreSQL's recovery early.

use std::collections::HashSet;
use std::fmt::Display;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

use super::{Store, StoreError, StoreOptions};
use crate::repo::url::RepoUrl;

/// Whether `what` is reported for the first time in this process: one line per object, however
/// many times a command opens the repository.
fn first_report(what: String) -> bool {
    static REPORTED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    REPORTED
        .get_or_init(Mutex::default)
        .lock()
        .map_or(true, |mut reported| reported.insert(what))
}

/// Why an object was served from the fallback.
enum Why<'a> {
    Missing,
    Damaged(&'a dyn Display),
}

impl Store {
    /// Open the store at `url` and, when `fallback` names one, the fallback repository's store
    /// behind it ([`Store::with_fallback`]); each retried like [`Store::open_retrying`].
    pub async fn open_with_fallback(
        url: &RepoUrl,
        fallback: Option<&RepoUrl>,
        options: &StoreOptions,
    ) -> Result<Store, StoreError> {
        let Some(fallback) = fallback else {
            return Store::open_retrying(url, options).await;
        };
        let (first, second) = tokio::try_join!(
            Store::open_retrying(url, options),
            Store::open_retrying(fallback, options)
        )?;
        Ok(first.with_fallback(second))
    }

    /// This store, with `fallback` answering for the objects it lacks. Whether `fallback` holds
    /// the same repository is [`crate::repo::Reader::on_stores`]'s question.
    pub fn with_fallback(&self, fallback: Store) -> Store {
        Store {
            fallback: Some(Arc::new(fallback.without_fallback())),
            ..self.clone()
        }
    }

    /// The fallback repository's store, if this store has one.
    pub fn fallback(&self) -> Option<&Store> {
        self.fallback.as_deref()
    }

    /// This store alone, without its fallback.
    pub fn without_fallback(&self) -> Store {
        Store {
            fallback: None,
            ..self.clone()
        }
    }

    /// Log, once per process, that the fallback serves everything: this store holds no
    /// repository.
    pub(crate) fn report_running_from_fallback(&self) {
        if let Some(f) = &self.fallback
            && first_report(format!("{} alone instead of {}", f.url, self.url))
        {
            tracing::warn!(
                "no walvault repository at {} (it has no walvault.json): reading everything from fallback repository {}",
                self.url,
                f.url
            );
        }
    }

    /// Log that `key` was served from the fallback, once per key.
    fn report_served(&self, f: &Store, key: &str, why: Why<'_>) {
        if !first_report(format!("{key} from {} instead of {}", f.url, self.url)) {
            return;
        }
        match why {
            Why::Missing => tracing::warn!(
                "read {key} from fallback repository {}: missing in {}",
                f.url,
                self.url
            ),
            Why::Damaged(why) => tracing::warn!(
                "read {key} from fallback repository {}: damaged in {}: {why}",
                f.url,
                self.url
            ),
        }
    }

    /// Size and entity tag of an object, `None` when it does not exist (one HEAD request, and
    /// one to the fallback when it is not here).
    pub async fn head(&self, key: &str) -> Result<Option<(u64, Option<String>)>, StoreError> {
        match (self.head_here(key).await?, &self.fallback) {
            (None, Some(f)) => f.head_here(key).await,
            (found, _) => Ok(found),
        }
    }

    /// Read a whole object; `None` when it does not exist here nor in the fallback.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let found = self.get_here(key).await?;
        let (None, Some(f)) = (&found, &self.fallback) else {
            return Ok(found);
        };
        let there = f.get_here(key).await?;
        if there.is_some() {
            self.report_served(f, key, Why::Missing);
        }
        Ok(there)
    }

    /// Read bytes `range` of an object (one ranged GET); `None` when it does not exist here nor
    /// in the fallback. A range past the object's end gives the bytes there are, so that a short
    /// object is reported by the caller at once rather than retried.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Option<Bytes>, StoreError> {
        let found = self.get_range_here(key, range.clone()).await?;
        let (None, Some(f)) = (&found, &self.fallback) else {
            return Ok(found);
        };
        let there = f.get_range_here(key, range).await?;
        if there.is_some() {
            self.report_served(f, key, Why::Missing);
        }
        Ok(there)
    }

    /// Every object under `prefix` (a key prefix ending at a `/` boundary), here or in the
    /// fallback, as keys relative to the repository with their sizes, sorted by key. A key in
    /// both is listed once, with the size it has here.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let Some(f) = &self.fallback else {
            return self.list_here(prefix).await;
        };
        let (here, there) = tokio::try_join!(self.list_here(prefix), f.list_here(prefix))?;
        Ok(union(here, there))
    }

    /// The fallback's copy of `key` (bytes `range` of it, when given), opened by `open`, for
    /// bytes read through this store that did not open (`damage` says why, for the log).
    /// `None`, the caller's error standing, when there is no fallback or its copy is missing,
    /// unreadable or does not open either (logged).
    pub async fn reread_from_fallback<T, E: Display>(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        damage: String,
        open: impl FnOnce(&[u8]) -> Result<T, E>,
    ) -> Option<T> {
        let f = self.fallback.as_deref()?;
        let read = match range {
            Some(range) => f.get_range_here(key, range).await,
            None => f.get_here(key).await,
        };
        let bytes = match read {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                tracing::warn!(
                    "{key} does not open ({damage}), and fallback repository {} has none",
                    f.url
                );
                return None;
            }
            Err(e) => {
                tracing::warn!("{key} does not open ({damage}), and the fallback's copy cannot be read: {e}");
                return None;
            }
        };
        match open(&bytes) {
            Ok(value) => {
                self.report_served(f, key, Why::Damaged(&damage));
                Some(value)
            }
            Err(e) => {
                tracing::warn!(
                    "{key} does not open ({damage}), nor does fallback repository {}'s copy: {e}",
                    f.url
                );
                None
            }
        }
    }
}

/// Two sorted listings as one, a key in both once (`here`'s).
fn union(here: Vec<(String, u64)>, there: Vec<(String, u64)>) -> Vec<(String, u64)> {
    let mut out = Vec::with_capacity(here.len().max(there.len()));
    let (mut a, mut b) = (here.into_iter().peekable(), there.into_iter().peekable());
    loop {
        let take_here = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x.0 == y.0 => {
                b.next();
                true
            }
            (Some(x), Some(y)) => x.0 < y.0,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return out,
        };
        out.extend(if take_here { a.next() } else { b.next() });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use crate::repo::fault::{Fault, FaultStore};
    use crate::repo::layout::{DESCRIPTOR_KEY, wal_key};
    use crate::repo::object::{ObjectKind, Sealer};
    use crate::repo::reads::ReadStats;
    use crate::repo::store::CreateSemantics;
    use crate::repo::stored::WalObject;
    use crate::repo::{ReadError, Reader, RepoDescriptor, RepoError, Store, WritableStore};
    use crate::retry::RetryPolicy;
    use crate::wal::WalFileName;

    /// Two in-memory "S3" repositories: `first`, and `copy` holding the same objects.
    struct Pair {
        first: Arc<FaultStore>,
        copy: Arc<FaultStore>,
        a: WritableStore,
        b: WritableStore,
    }

    fn on(faults: &Arc<FaultStore>, url: &str) -> WritableStore {
        WritableStore::with_backend(
            Arc::clone(faults) as Arc<dyn object_store::ObjectStore>,
            url.parse().unwrap(),
            CreateSemantics::CheckThenWrite,
            RetryPolicy::with_total(Duration::from_millis(200)),
        )
    }

    fn name(n: u32) -> WalFileName {
        format!("0000000100000000000000{n:02X}").parse().unwrap()
    }

    fn content(n: u32) -> Vec<u8> {
        format!("segment {n}").repeat(100).into_bytes()
    }

    fn sealed(n: u32) -> Bytes {
        Sealer::plain()
            .seal(ObjectKind::WalFile, &name(n).to_string(), &content(n), 3)
            .unwrap()
            .bytes
    }

    impl Pair {
        /// The same repository in both, with segments 1 to 3 archived.
        async fn new(test: &str) -> Pair {
            let (first, copy) = (
                Arc::new(FaultStore::new(Fault::None)),
                Arc::new(FaultStore::new(Fault::None)),
            );
            let (a, b) = (
                on(&first, &format!("s3://{test}/first")),
                on(&copy, &format!("s3://{test}/copy")),
            );
            let descriptor = Bytes::from(RepoDescriptor::new(None, 0).to_json());
            for store in [&a, &b] {
                store.put(DESCRIPTOR_KEY, descriptor.clone()).await.unwrap();
                for n in 1..=3 {
                    store.put(&wal_key(&name(n)), sealed(n)).await.unwrap();
                }
            }
            Pair { first, copy, a, b }
        }

        /// The first repository, with the copy behind it, opened.
        async fn reader(&self) -> Result<Reader, RepoError> {
            Reader::on_stores(self.a.reader().with_fallback(self.b.reader()), None).await
        }

        /// Flip a byte in the middle of object `key` of `store`.
        async fn damage(store: &WritableStore, key: &str) {
            let mut bytes = store.get(key).await.unwrap().unwrap().to_vec();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xFF;
            store.put(key, bytes.into()).await.unwrap();
        }
    }

    /// What was logged while `f` ran (on this thread).
    async fn logged<T>(f: impl std::future::Future<Output = T>) -> (T, String) {
        #[derive(Clone, Default)]
        struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        let out = f.await;
        drop(guard);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        (out, text)
    }

    #[tokio::test]
    async fn an_object_missing_here_is_read_from_the_copy_and_reported_once() {
        let pair = Pair::new("missing").await;
        pair.a.delete(&wal_key(&name(2))).await.unwrap();
        let repo = pair.reader().await.unwrap();
        let (reads, log) = logged(async {
            let first = repo.read::<WalObject>(&name(2)).await.unwrap();
            let again = repo.read::<WalObject>(&name(2)).await.unwrap();
            let range = repo.store().get_range(&wal_key(&name(2)), 0..10).await.unwrap();
            let size = repo.store().size(&wal_key(&name(2))).await.unwrap();
            (first.content, again.content, range, size)
        })
        .await;
        assert_eq!((reads.0, reads.1), (content(2), content(2)));
        assert_eq!(reads.2.as_deref(), Some(&sealed(2)[..10]));
        assert_eq!(reads.3, Some(sealed(2).len() as u64));
        let line = format!(
            "read {} from fallback repository s3://missing/copy: missing in s3://missing/first",
            wal_key(&name(2))
        );
        assert_eq!(log.matches(&line).count(), 1, "one line per object:\n{log}");
        assert_eq!(log.lines().count(), 1, "nothing else:\n{log}");
        // Objects the first repository has are read there, and the copy is not asked.
        let before = pair.copy.requests();
        assert_eq!(
            repo.read::<WalObject>(&name(1)).await.unwrap().content,
            content(1)
        );
        assert_eq!(pair.copy.requests(), before);
    }

    #[tokio::test]
    async fn an_object_damaged_here_is_read_from_the_copy() {
        let pair = Pair::new("damaged").await;
        Pair::damage(&pair.a, &wal_key(&name(3))).await;
        let repo = pair.reader().await.unwrap();
        let (read, log) = logged(repo.read::<WalObject>(&name(3))).await;
        assert_eq!(read.unwrap().content, content(3));
        let line = format!(
            "read {} from fallback repository s3://damaged/copy: damaged in s3://damaged/first: ",
            wal_key(&name(3))
        );
        assert!(log.contains(&line), "{log}");
        // Without the copy, the damage is what the reader gets.
        let alone = Reader::on_stores(pair.a.reader(), None).await.unwrap();
        assert!(matches!(
            alone.read::<WalObject>(&name(3)).await,
            Err(ReadError::Damaged { .. })
        ));
    }

    #[tokio::test]
    async fn missing_in_both_is_missing_and_damaged_in_both_is_damaged() {
        let pair = Pair::new("both").await;
        let four = name(4);
        let repo = pair.reader().await.unwrap();
        assert!(matches!(
            repo.read::<WalObject>(&four).await,
            Err(ReadError::Missing { .. })
        ));
        assert_eq!(repo.store().get(&wal_key(&four)).await.unwrap(), None);
        assert_eq!(repo.store().head(&wal_key(&four)).await.unwrap(), None);
        // Damaged here and missing there, damaged here and there: the damage stands.
        Pair::damage(&pair.a, &wal_key(&name(1))).await;
        pair.b.delete(&wal_key(&name(1))).await.unwrap();
        Pair::damage(&pair.a, &wal_key(&name(2))).await;
        Pair::damage(&pair.b, &wal_key(&name(2))).await;
        for n in [1, 2] {
            let read = repo.read::<WalObject>(&name(n)).await;
            assert!(matches!(read, Err(ReadError::Damaged { .. })), "{n}: {read:?}");
        }
        // Missing here, damaged there: damaged, never missing.
        pair.a.delete(&wal_key(&name(3))).await.unwrap();
        Pair::damage(&pair.b, &wal_key(&name(3))).await;
        let read = repo.read::<WalObject>(&name(3)).await;
        assert!(matches!(read, Err(ReadError::Damaged { .. })), "{read:?}");
    }

    #[tokio::test]
    async fn listings_are_the_union_of_both() {
        let pair = Pair::new("union").await;
        pair.a.delete(&wal_key(&name(2))).await.unwrap();
        pair.b.delete(&wal_key(&name(3))).await.unwrap();
        pair.b.put(&wal_key(&name(4)), sealed(4)).await.unwrap();
        let repo = pair.reader().await.unwrap();
        let keys: Vec<String> = repo
            .store()
            .list("wal/")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let expected: Vec<String> = (1..=4).map(|n| wal_key(&name(n))).collect();
        assert_eq!(keys, expected);
        // What a restore plans from: every segment, whichever repository holds it.
        let catalog = crate::catalog::Catalog::load_listing(&repo).await.unwrap();
        let segments: Vec<(_, Vec<_>)> = catalog.segments().map(|(t, nos)| (t, nos.to_vec())).collect();
        assert_eq!(segments.len(), 1, "{segments:?}");
        assert_eq!(segments[0].1.len(), 4, "{segments:?}");
    }

    #[tokio::test]
    async fn a_copy_of_another_repository_is_refused() {
        let pair = Pair::new("other").await;
        let other = Bytes::from(RepoDescriptor::new(None, 0).to_json());
        pair.b.put(DESCRIPTOR_KEY, other).await.unwrap();
        let e = pair.reader().await.unwrap_err();
        assert!(matches!(e, RepoError::NotACopy { .. }), "{e}");
        let message = e.to_string();
        assert!(
            message.contains("s3://other/first")
                && message.contains("s3://other/copy")
                && !message.contains('\n'),
            "{message}"
        );
        assert!(!e.is_transient());
    }

    #[tokio::test]
    async fn without_a_repository_here_the_copy_alone_serves() {
        let pair = Pair::new("alone").await;
        pair.a.delete(DESCRIPTOR_KEY).await.unwrap();
        pair.a.delete(&wal_key(&name(1))).await.unwrap();
        let ((repo, again), log) = logged(async {
            let repo = pair.reader().await.unwrap();
            let again = pair.reader().await;
            (repo, again)
        })
        .await;
        assert_eq!(repo.url().as_str(), "s3://alone/copy");
        assert!(again.is_ok());
        assert_eq!(
            repo.read::<WalObject>(&name(1)).await.unwrap().content,
            content(1)
        );
        assert_eq!(
            log.matches("reading everything from fallback repository s3://alone/copy")
                .count(),
            1,
            "{log}"
        );
        // No repository in either: the first one's absence is the answer.
        pair.b.delete(DESCRIPTOR_KEY).await.unwrap();
        let e = pair.reader().await.unwrap_err();
        assert!(matches!(e, RepoError::NotInitialized { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_store_error_here_is_not_answered_from_the_copy() {
        let pair = Pair::new("errors").await;
        let repo = pair.reader().await.unwrap();
        pair.first.set(Fault::Denied);
        assert!(repo.store().get(&wal_key(&name(1))).await.is_err());
        assert!(repo.store().list("wal/").await.is_err());
        assert!(matches!(
            repo.read::<WalObject>(&name(4)).await,
            Err(ReadError::Store(_))
        ));
        // And a copy that cannot be read is no "not found" either.
        pair.first.set(Fault::None);
        pair.copy.set(Fault::Denied);
        assert!(repo.store().get(&wal_key(&name(4))).await.is_err());
    }

    #[tokio::test]
    async fn reads_from_the_copy_are_recorded() {
        let pair = Pair::new("recorded").await;
        pair.a.delete(&wal_key(&name(2))).await.unwrap();
        let store: Store = pair.a.reader().with_fallback(pair.b.reader());
        let stats = ReadStats::new();
        let recording = store.recording(&stats);
        let bytes = recording.get(&wal_key(&name(2))).await.unwrap().unwrap();
        let report = stats.report();
        // One read here (answered: not found), one there.
        assert_eq!(report.requests, 2, "{report:?}");
        assert_eq!(report.bytes, bytes.len() as u64);
    }
}
