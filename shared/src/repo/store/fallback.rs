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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{Store, StoreError, StoreOptions};
use crate::repo::url::RepoUrl;

/// The fallback repository's store, and what was said about it.
pub(super) struct Fallback {
    store: Store,
    /// Keys already reported as served from the fallback: one line per object per process.
    reported: Arc<Mutex<HashSet<String>>>,
    /// Whether running from the fallback alone was reported.
    alone_reported: Arc<AtomicBool>,
}

impl Fallback {
    /// The same fallback, its requests recorded into `stats` ([`Store::recording`]).
    pub(super) fn recording(&self, stats: &crate::repo::reads::ReadStats) -> Fallback {
        Fallback {
            store: self.store.recording(stats),
            reported: Arc::clone(&self.reported),
            alone_reported: Arc::clone(&self.alone_reported),
        }
    }
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
            fallback: Some(Arc::new(Fallback {
                store: fallback.without_fallback(),
                reported: Arc::default(),
                alone_reported: Arc::default(),
            })),
            ..self.clone()
        }
    }

    /// The fallback repository's store, if this store has one.
    pub fn fallback(&self) -> Option<&Store> {
        self.fallback.as_deref().map(|f| &f.store)
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
            && !f.alone_reported.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "no walvault repository at {} (it has no walvault.json): reading everything from fallback repository {}",
                self.url,
                f.store.url
            );
        }
    }

    /// Log that `key` was served from the fallback, once per key.
    fn report_served(&self, f: &Fallback, key: &str, why: Why<'_>) {
        let first = f.reported.lock().map(|mut r| r.insert(key.to_string())).unwrap_or(true);
        if !first {
            return;
        }
        match why {
            Why::Missing => tracing::warn!(
                "read {key} from fallback repository {}: missing in {}",
                f.store.url,
                self.url
            ),
            Why::Damaged(why) => tracing::warn!(
                "read {key} from fallback repository {}: damaged in {}: {why}",
                f.store.url,
                self.url
            ),
        }
    }

    /// Size and entity tag of an object, `None` when it does not exist (one HEAD request, and
    /// one to the fallback when it is not here).
    pub async fn head(&self, key: &str) -> Result<Option<(u64, Option<String>)>, StoreError> {
        match (self.head_here(key).await?, &self.fallback) {
            (None, Some(f)) => f.store.head_here(key).await,
            (found, _) => Ok(found),
        }
    }

    /// Read a whole object; `None` when it does not exist here nor in the fallback.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let found = self.get_here(key).await?;
        let (None, Some(f)) = (&found, &self.fallback) else {
            return Ok(found);
        };
        let there = f.store.get_here(key).await?;
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
        let there = f.store.get_range_here(key, range).await?;
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
        let (here, there) = tokio::try_join!(self.list_here(prefix), f.store.list_here(prefix))?;
        Ok(union(here, there))
    }

    /// The fallback's copy of `key` (bytes `range` of it, when given), opened by `open`, for a
    /// copy read from this store that did not open (`damage` says why, for the log). `None`, the caller's
    /// error standing, when there is no fallback or its copy is missing, unreadable or does not
    /// open either (logged).
    pub async fn reread_from_fallback<T, E: Display>(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        damage: String,
        open: impl FnOnce(&[u8]) -> Result<T, E>,
    ) -> Option<T> {
        let f = self.fallback.as_deref()?;
        let read = match range {
            Some(range) => f.store.get_range_here(key, range).await,
            None => f.store.get_here(key).await,
        };
        let bytes = match read {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                tracing::warn!("{key} is damaged in {} and missing in fallback repository {}", self.url, f.store.url);
                return None;
            }
            Err(e) => {
                tracing::warn!("{key} is damaged in {}, and the fallback's copy cannot be read: {e}", self.url);
                return None;
            }
        };
        match open(&bytes) {
            Ok(value) => {
                self.report_served(f, key, Why::Damaged(&damage));
                Some(value)
            }
            Err(e) => {
                tracing::warn!("{key} is damaged in fallback repository {} too: {e}", f.store.url);
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
