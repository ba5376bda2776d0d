//! Repository locks: how a backup, a pin and an expire running at the same time, on any hosts,
//! stay out of each other's way (docs/FORMAT.md, "Garbage collection and locks").
//!
//! Each holder writes `locks/<kind>-<token>.json` and rewrites it every [`REFRESH_EVERY`]; a lock
//! not refreshed for [`STALE_AFTER`] belongs to a process that died or lost the repository.
//! Every holder writes its own lock first and lists the others second. With a store whose
//! listings show every completed write (S3, Azure, GCS and local disks do), of two processes
//! doing so at once at least one sees the other:
//! - a backup (or pin) that sees a live expire lock removes its own, waits for the expire to end,
//!   and starts over: it never relies on a chunk (or a manifest) an expire may be deleting;
//! - an expire that sees a live backup lock leaves every chunk in place (it collects them next
//!   time); one that sees a pin lock waits for it (a pin takes a moment).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::repo::layout::{self, Kind};
use crate::repo::object::Sealer;
use crate::repo::stored::{Envelope, Objects, Opened, ReadError, StoredKind};
use crate::repo::{Store, StoreError, WritableStore};

/// How often a holder rewrites its lock.
pub const REFRESH_EVERY: Duration = Duration::from_secs(60);
/// A lock not rewritten for this long is stale: its holder is gone.
pub const STALE_AFTER: Duration = Duration::from_secs(10 * 60);
/// How often a waiting process looks again.
const POLL: Duration = Duration::from_secs(2);

pub const FORMAT_NAME: &str = "walvault-lock";
pub const FORMAT_VERSION: u32 = 1;

/// What holds a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    /// A base backup: it may rely on chunks already stored.
    Backup,
    /// An expire: it deletes manifests, WAL and chunks.
    Expire,
    /// A pin or unpin being written.
    Pin,
}

impl LockKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LockKind::Backup => "backup",
            LockKind::Expire => "expire",
            LockKind::Pin => "pin",
        }
    }
}

/// `locks/<kind>-<token>.json`, version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    pub format: String,
    pub version: u32,
    pub kind: LockKind,
    /// `host pid`, for the human reading a "waiting for" line.
    pub holder: String,
    /// What the holder does (`backup`, `expire`, `pin 20261122T101500Z`).
    pub what: String,
    /// Unix microseconds, by the holder's clock.
    pub created_us: i64,
    pub refreshed_us: i64,
}

impl LockRecord {
    /// Whether the lock was refreshed within [`STALE_AFTER`] of `now_us`.
    pub fn live(&self, now_us: i64) -> bool {
        now_us.saturating_sub(self.refreshed_us) < STALE_AFTER.as_micros() as i64
    }

    pub fn describe(&self) -> String {
        format!(
            "{} by {} since {}",
            self.what,
            self.holder,
            crate::time::format_micros(self.created_us)
        )
    }
}

/// Why a stored lock is unusable.
#[derive(Debug, thiserror::Error)]
pub enum LockRecordError {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("format {0:?} is not a lock's")]
    Format(String),
}

impl StoredKind for LockRecord {
    /// The lock's key.
    type Id = str;
    type Error = LockRecordError;
    const ENVELOPE: Envelope = Envelope::Record;

    fn key(key: &str) -> String {
        key.to_string()
    }

    fn parse(opened: Opened, _: &str) -> Result<LockRecord, LockRecordError> {
        let r: LockRecord = serde_json::from_slice(&opened.content)?;
        match r.format == FORMAT_NAME {
            true => Ok(r),
            false => Err(LockRecordError::Format(r.format)),
        }
    }
}

/// A lock found in the repository.
#[derive(Debug, Clone)]
pub struct Found {
    pub key: String,
    /// `None`: the object could not be read or parsed (treated as a backup in progress by expire,
    /// ignored by everyone else).
    pub record: Option<LockRecord>,
}

/// Every lock in the repository, read.
pub async fn list(store: &Store, sealer: &Sealer) -> Result<Vec<Found>, StoreError> {
    let mut out = Vec::new();
    for (key, _) in store.list(Kind::Lock.dirname()).await? {
        let Some((kind, _)) = layout::parse_lock_key(&key) else {
            continue;
        };
        let record = match Objects::new(store, sealer)
            .read_if_present::<LockRecord>(&key)
            .await
        {
            Ok(r) => r.filter(|r| r.kind.as_str() == kind),
            Err(ReadError::Store(e)) => return Err(e),
            Err(_) => None,
        };
        // Released between the listing and the read: gone, not unreadable.
        if record.is_none() && store.size(&key).await?.is_none() {
            continue;
        }
        out.push(Found { key, record });
    }
    Ok(out)
}

/// A lock this process holds; rewritten in the background until released.
#[derive(Debug)]
pub struct Lock {
    store: WritableStore,
    sealer: Sealer,
    key: String,
    lost: Arc<AtomicBool>,
    /// When the lock was last written, on this process's monotonic clock (which keeps counting
    /// while the process is stopped): a holder that could not refresh in time knows its lock
    /// may have been found stale, whatever the lock object says now.
    refreshed: Arc<Mutex<Instant>>,
    refresher: tokio::task::JoinHandle<()>,
}

/// A holder trusts its lock only while its last refresh is this much younger than
/// [`STALE_AFTER`]: the margin covers the clocks of the holders disagreeing a little.
const TRUST_MARGIN: Duration = Duration::from_secs(2 * 60);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gave up after {waited:?} waiting for {what} to finish (remove {key} if that process is gone)")]
    Busy {
        what: String,
        key: String,
        waited: Duration,
    },
}

impl Lock {
    /// Write a lock of `kind` and keep it fresh.
    pub async fn take(
        store: &WritableStore,
        sealer: &Sealer,
        kind: LockKind,
        what: &str,
    ) -> Result<Lock, StoreError> {
        let token = hex::encode(rand::random::<[u8; 16]>());
        let key = layout::lock_key(kind.as_str(), &token).expect("a valid kind and a 32-hex token");
        let now = crate::time::now_micros();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let record = LockRecord {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            kind,
            holder: format!("{} {}", host.trim(), std::process::id()),
            what: what.to_string(),
            created_us: now,
            refreshed_us: now,
        };
        store.put(&key, to_bytes(sealer, &key, &record)).await?;
        let lost = Arc::new(AtomicBool::new(false));
        let refreshed = Arc::new(Mutex::new(Instant::now()));
        let refresher = tokio::spawn({
            let (store, sealer, key, lost, refreshed) = (
                store.clone(),
                sealer.clone(),
                key.clone(),
                Arc::clone(&lost),
                Arc::clone(&refreshed),
            );
            async move {
                let mut record = record;
                loop {
                    tokio::time::sleep(REFRESH_EVERY).await;
                    record.refreshed_us = crate::time::now_micros();
                    let attempt = Instant::now();
                    match store.size(&key).await {
                        // Removed by someone who found it stale: never recreate it.
                        Ok(None) => {
                            tracing::warn!("the repository lock {key} was removed");
                            lost.store(true, Ordering::SeqCst);
                            return;
                        }
                        Ok(Some(_)) => match store.put(&key, to_bytes(&sealer, &key, &record)).await {
                            Ok(()) => {
                                if let Ok(mut at) = refreshed.lock() {
                                    *at = attempt;
                                }
                            }
                            // Tried again next minute; `still_held` tells when it is too late.
                            Err(e) => tracing::warn!("cannot refresh the repository lock {key}: {e}"),
                        },
                        Err(e) => tracing::warn!("cannot refresh the repository lock {key}: {e}"),
                    }
                }
            }
        });
        Ok(Lock {
            store: store.clone(),
            sealer: sealer.clone(),
            key,
            lost,
            refreshed,
            refresher,
        })
    }

    /// Take a lock of `kind`, then make sure no live lock of `yield_to` exists; while one does,
    /// step back (remove this lock), wait for it to go, and try again, for at most `max_wait`.
    pub async fn take_yielding(
        store: &WritableStore,
        sealer: &Sealer,
        kind: LockKind,
        what: &str,
        yield_to: LockKind,
        max_wait: Duration,
    ) -> Result<Lock, LockError> {
        let started = tokio::time::Instant::now();
        let mut told = false;
        loop {
            let lock = Lock::take(store, sealer, kind, what).await?;
            let other = match lock.live_other(yield_to).await {
                Ok(None) => return Ok(lock),
                Ok(Some(other)) => other,
                Err(e) => {
                    lock.release().await;
                    return Err(e.into());
                }
            };
            lock.release().await;
            loop {
                if started.elapsed() >= max_wait {
                    return Err(LockError::Busy {
                        what: other.1.describe(),
                        key: other.0,
                        waited: max_wait,
                    });
                }
                if !told {
                    tracing::info!("waiting for {} to finish", other.1.describe());
                    told = true;
                }
                tokio::time::sleep(POLL).await;
                if live_of(store, sealer, yield_to, None).await?.is_none() {
                    break;
                }
            }
        }
    }

    /// A live lock of `kind` other than this one.
    pub async fn live_other(&self, kind: LockKind) -> Result<Option<(String, LockRecord)>, StoreError> {
        live_of(&self.store, &self.sealer, kind, Some(&self.key)).await
    }

    /// Whether this lock is still in the repository and was refreshed in time. A holder that is
    /// about to publish what it did (a backup, its manifest) checks this first: a lock found
    /// stale and removed means an expire may have run meanwhile.
    pub async fn still_held(&self) -> Result<bool, StoreError> {
        let fresh = self
            .refreshed
            .lock()
            .map(|at| at.elapsed() + TRUST_MARGIN < STALE_AFTER)
            .unwrap_or(false);
        Ok(fresh && !self.lost.load(Ordering::SeqCst) && self.store.size(&self.key).await?.is_some())
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Remove the lock.
    pub async fn release(self) {
        self.refresher.abort();
        if let Err(e) = self.store.delete(&self.key).await {
            tracing::warn!("could not remove the lock {}: {e}", self.key);
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// A live lock of `kind` in the repository, if any.
pub async fn live(
    store: &Store,
    sealer: &Sealer,
    kind: LockKind,
) -> Result<Option<(String, LockRecord)>, StoreError> {
    live_of(store, sealer, kind, None).await
}

/// A live lock of `kind`, ignoring `except`.
async fn live_of(
    store: &Store,
    sealer: &Sealer,
    kind: LockKind,
    except: Option<&str>,
) -> Result<Option<(String, LockRecord)>, StoreError> {
    let now = crate::time::now_micros();
    Ok(list(store, sealer).await?.into_iter().find_map(|f| {
        let r = f.record?;
        (Some(f.key.as_str()) != except && r.kind == kind && r.live(now)).then_some((f.key, r))
    }))
}

fn to_bytes(sealer: &Sealer, key: &str, r: &LockRecord) -> bytes::Bytes {
    sealer.seal_record(key, serde_json::to_vec_pretty(r).expect("a lock serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> (tempfile::TempDir, WritableStore) {
        let dir = tempfile::tempdir().unwrap();
        let url: crate::repo::RepoUrl = format!("file://{}", dir.path().display()).parse().unwrap();
        let opts = crate::repo::StoreOptions {
            retry_timeout: Duration::from_secs(1),
            ..Default::default()
        };
        let store = WritableStore::open(&url, &opts).unwrap();
        (dir, store)
    }

    #[test]
    fn a_lock_is_stale_once_not_refreshed_for_ten_minutes() {
        let r = LockRecord {
            format: FORMAT_NAME.into(),
            version: 1,
            kind: LockKind::Backup,
            holder: "h 1".into(),
            what: "backup".into(),
            created_us: 0,
            refreshed_us: 1_000_000,
        };
        assert!(r.live(1_000_000 + 599_000_000));
        assert!(!r.live(1_000_000 + 600_000_000));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""kind":"backup""#), "{json}");
    }

    #[test]
    fn lock_v1_fixture_still_parses() {
        let r: LockRecord =
            serde_json::from_slice(include_bytes!("../../tests/fixtures/lock-v1.json")).unwrap();
        assert_eq!(
            (r.format.as_str(), r.version, r.kind),
            (FORMAT_NAME, 1, LockKind::Backup)
        );
        assert_eq!(r.holder, "db1 4242");
        assert!(r.live(r.refreshed_us + 1) && !r.live(r.refreshed_us + STALE_AFTER.as_micros() as i64));
    }

    #[tokio::test]
    async fn a_backup_steps_back_while_an_expire_holds_the_repository() {
        let (_dir, store) = local();
        let plain = Sealer::plain();
        let expire = Lock::take(&store, &plain, LockKind::Expire, "expire")
            .await
            .unwrap();
        // The backup sees the expire, steps back, and gives up after its wait.
        let busy = Lock::take_yielding(
            &store,
            &plain,
            LockKind::Backup,
            "backup",
            LockKind::Expire,
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
        assert!(busy.to_string().contains("expire by"), "{busy}");
        // It left no lock behind, so the expire sees no backup in progress.
        assert!(expire.live_other(LockKind::Backup).await.unwrap().is_none());
        assert_eq!(list(&store, &plain).await.unwrap().len(), 1);
        expire.release().await;
        let backup = Lock::take_yielding(
            &store,
            &plain,
            LockKind::Backup,
            "backup",
            LockKind::Expire,
            Duration::ZERO,
        )
        .await
        .unwrap();
        assert!(backup.still_held().await.unwrap());
        // Found stale and removed by an expire: the backup knows before it publishes anything.
        store.delete(backup.key()).await.unwrap();
        assert!(!backup.still_held().await.unwrap());
        backup.release().await;
        assert!(list(&store, &plain).await.unwrap().is_empty());
    }
}
