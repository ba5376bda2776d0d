//! The check before a write, shared by the daemon's uploads, on a store that ignores create-only
//! writes: one listing of a WAL directory (`wal/<timeline><log>/`, at most a few hundred names,
//! one request) answers for every upload into it during [`FRESH`], instead of a read per
//! segment. A name a listing reported absent is taken into it at once, so a second upload of
//! the same name (a retry) finds it present and reads what is stored, as a push would. The
//! check after the write (the entity tag) is each upload's own.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::clock::Clock;
use crate::repo::WritableStore;

/// How long a listing answers for a directory: about as old as the read it replaces can be by
/// the time the upload writes (it runs while the file is compressed).
const FRESH: Duration = Duration::from_secs(3);

/// A directory's listing: when it was taken, and the keys in it (with those taken since).
type Listing = (Instant, HashSet<String>);

/// The latest listing of each WAL directory, and when it was taken.
#[derive(Debug, Clone)]
pub(crate) struct Listings {
    dirs: Arc<Mutex<HashMap<String, Listing>>>,
    clock: Arc<dyn Clock>,
}

impl Listings {
    pub(crate) fn new(clock: Arc<dyn Clock>) -> Listings {
        Listings {
            dirs: Arc::default(),
            clock,
        }
    }

    /// Whether a fresh listing has no object under `key` (listing its directory when the last
    /// listing is older than [`FRESH`]); `false` when the listing fails, so the upload reads
    /// for itself. Uploads of one directory wait for one listing rather than each making one.
    pub(crate) async fn absent(&self, store: &WritableStore, key: &str) -> bool {
        let Some((dir, _)) = key.rsplit_once('/') else {
            return false;
        };
        let mut dirs = self.dirs.lock().await;
        let fresh = |at: &Instant| self.clock.now().saturating_duration_since(*at) <= FRESH;
        // Old listings go: one directory per 4 GiB of WAL would pile up in a long-lived daemon.
        dirs.retain(|_, (at, _)| fresh(at));
        if !dirs.contains_key(dir) {
            let at = self.clock.now();
            match store.list(dir).await {
                Ok(keys) => {
                    dirs.insert(dir.to_string(), (at, keys.into_iter().map(|(k, _)| k).collect()));
                }
                Err(e) => {
                    tracing::debug!("listing {dir} for the check before writing: {e}");
                    dirs.remove(dir);
                    return false;
                }
            }
        }
        let (_, names) = dirs.get_mut(dir).expect("listed just now");
        // Taken: a later upload of this name within FRESH reads what is stored.
        names.insert(key.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::daemon::ManualClock;
    use crate::repo::fault::{Fault, FaultStore};

    /// One listing answers for several names of a directory while fresh; a name answered
    /// absent once is present the second time; an old listing is taken again.
    #[tokio::test]
    async fn one_listing_answers_for_a_directory_while_fresh() {
        let faults = Arc::new(FaultStore::new(Fault::None));
        let store = FaultStore::s3_like(&faults, Duration::from_millis(200));
        store
            .put("wal/0000000100000000/a.wvo", bytes::Bytes::from_static(b"x"))
            .await
            .unwrap();
        let clock = Arc::new(ManualClock::new(0));
        let listings = Listings::new(clock.clone());
        let before = faults.requests();
        assert!(
            !listings.absent(&store, "wal/0000000100000000/a.wvo").await,
            "stored"
        );
        assert!(listings.absent(&store, "wal/0000000100000000/b.wvo").await);
        assert!(listings.absent(&store, "wal/0000000100000000/c.wvo").await);
        assert!(
            !listings.absent(&store, "wal/0000000100000000/b.wvo").await,
            "taken"
        );
        assert_eq!(faults.requests() - before, 1, "one listing");
        clock.advance(FRESH + Duration::from_millis(1));
        assert!(
            listings.absent(&store, "wal/0000000100000000/b.wvo").await,
            "listed again: b was never written"
        );
        assert_eq!(faults.requests() - before, 2);
    }
}
