//! An in-process store that fails on purpose, for unit tests of the retry layer: an
//! `object_store` in memory in front of which a share of requests fail with a transient error
//! (the 5xx or reset a real store gives), fail permanently (access denied), or succeed on the
//! server while the answer is lost (a write that landed but reported failure).

use std::fmt;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// What the next requests do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every request is served.
    None,
    /// Of every `n` requests, all but the last fail with a transient error.
    FailAllBut(u32),
    /// Every request is refused: access denied.
    Denied,
    /// Writes are stored, then reported as failed (transient) once; other requests are served.
    LoseWriteAnswers,
    /// Create-only writes replace what is there, like S3 servers that ignore `If-None-Match`
    /// (Garage); other requests are served.
    IgnoreCreateOnly,
}

/// An in-memory store with injected faults; counts the requests it receives.
#[derive(Debug)]
pub struct FaultStore {
    inner: InMemory,
    fault: Mutex<Fault>,
    requests: AtomicU32,
    lost: Mutex<std::collections::HashSet<String>>,
}

impl fmt::Display for FaultStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultStore")
    }
}

impl FaultStore {
    pub fn new(fault: Fault) -> FaultStore {
        FaultStore {
            inner: InMemory::new(),
            fault: Mutex::new(fault),
            requests: AtomicU32::new(0),
            lost: Mutex::new(Default::default()),
        }
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().expect("fault lock") = fault;
    }

    /// A store on `faults` that behaves like an S3 repository (`s3://b/r`, check-then-write,
    /// `total` of retries): what the unit tests of the layers above write through.
    pub fn s3_like(
        faults: &std::sync::Arc<FaultStore>,
        total: std::time::Duration,
    ) -> crate::repo::WritableStore {
        crate::repo::WritableStore::with_backend(
            std::sync::Arc::clone(faults) as std::sync::Arc<dyn ObjectStore>,
            "s3://b/r".parse().expect("a valid URL"),
            crate::repo::store::CreateSemantics::CheckThenWrite,
            crate::retry::RetryPolicy::with_total(total),
        )
    }

    /// Requests received so far.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Whether this request fails, and how.
    fn check(&self) -> Result<()> {
        let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        match *self.fault.lock().expect("fault lock") {
            Fault::FailAllBut(k) if !n.is_multiple_of(k.max(1)) => Err(transient()),
            Fault::Denied => Err(object_store::Error::PermissionDenied {
                path: String::new(),
                source: "injected: access denied".into(),
            }),
            _ => Ok(()),
        }
    }

    fn loses_answer(&self, location: &Path) -> bool {
        *self.fault.lock().expect("fault lock") == Fault::LoseWriteAnswers
            && self.lost.lock().expect("lost lock").insert(location.to_string())
    }
}

fn transient() -> object_store::Error {
    object_store::Error::Generic {
        store: "FaultStore",
        source: "injected: 503 Slow Down".into(),
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> Result<PutResult> {
        self.check()?;
        if *self.fault.lock().expect("fault lock") == Fault::IgnoreCreateOnly {
            opts.mode = object_store::PutMode::Overwrite;
        }
        let r = self.inner.put_opts(location, payload, opts).await?;
        if self.loses_answer(location) {
            return Err(transient());
        }
        Ok(r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.check()?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.check()?;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.check()?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        use futures::StreamExt;
        match self.check() {
            Ok(()) => self.inner.list(prefix),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.check()?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.check()?;
        self.inner.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::repo::store::{CreateSemantics, PutNew, WritableStore};
    use crate::retry::RetryPolicy;

    fn store(fault: Fault, total: Duration) -> (Arc<FaultStore>, WritableStore) {
        let faults = Arc::new(FaultStore::new(fault));
        let url = "s3://bucket/repo".parse().unwrap();
        let store = WritableStore::with_backend(
            Arc::clone(&faults) as Arc<dyn ObjectStore>,
            url,
            CreateSemantics::CheckThenWrite,
            RetryPolicy::with_total(total),
        );
        (faults, store)
    }

    #[tokio::test(start_paused = true)]
    async fn every_call_survives_a_storm_of_transient_errors() {
        // Two requests of every three fail: each call needs three attempts.
        let (faults, store) = store(Fault::FailAllBut(3), Duration::from_secs(30));
        let body = Bytes::from_static(b"segment bytes");
        assert_eq!(
            store.put_new("wal/a.wvo", body.clone()).await.unwrap(),
            PutNew::Created
        );
        store.put("chunks/ab/c.wvo", body.clone()).await.unwrap();
        assert_eq!(store.get("wal/a.wvo").await.unwrap(), Some(body.clone()));
        assert_eq!(store.size("chunks/ab/c.wvo").await.unwrap(), Some(13));
        assert_eq!(store.get("wal/missing.wvo").await.unwrap(), None);
        let listed = store.list("wal/").await.unwrap();
        assert_eq!(listed, vec![("wal/a.wvo".to_string(), 13)]);
        assert_eq!(faults.requests(), 6 * 3, "three attempts per call");
    }

    #[tokio::test(start_paused = true)]
    async fn answers_and_refusals_are_never_retried() {
        let (faults, store) = store(Fault::None, Duration::from_secs(30));
        assert_eq!(store.get("wal/missing.wvo").await.unwrap(), None);
        assert_eq!(store.size("wal/missing.wvo").await.unwrap(), None);
        let body = Bytes::from_static(b"x");
        store.put_new("wal/a.wvo", body.clone()).await.unwrap();
        assert_eq!(
            store.put_new("wal/a.wvo", body).await.unwrap(),
            PutNew::AlreadyExists
        );
        assert_eq!(faults.requests(), 4, "not found and already exists are answers");
        faults.set(Fault::Denied);
        let started = tokio::time::Instant::now();
        let e = store.get("wal/a.wvo").await.unwrap_err();
        assert!(!e.is_transient() && e.attempts == 1, "{e:?}");
        assert_eq!(started.elapsed(), Duration::ZERO, "no backoff for a refusal");
        assert_eq!(faults.requests(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_never_answers_well_fails_at_the_deadline() {
        let (faults, store) = store(Fault::FailAllBut(u32::MAX), Duration::from_secs(10));
        let started = tokio::time::Instant::now();
        let e = store.get("wal/a.wvo").await.unwrap_err();
        let spent = started.elapsed();
        assert!(e.is_transient() && e.attempts > 3, "{e:?}");
        assert_eq!(e.attempts, faults.requests());
        assert!(
            e.to_string()
                .contains(&format!("gave up after {} attempts", e.attempts)),
            "{e}"
        );
        assert!(
            spent >= Duration::from_secs(10) && spent < Duration::from_secs(11),
            "{spent:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_whose_answer_was_lost_is_found_stored_not_written_twice() {
        let (faults, store) = store(Fault::LoseWriteAnswers, Duration::from_secs(30));
        let body = Bytes::from_static(b"first");
        // The first attempt lands but reports failure; the retry finds the object there.
        assert_eq!(
            store.put_new("wal/a.wvo", body.clone()).await.unwrap(),
            PutNew::AlreadyExists
        );
        assert_eq!(store.get("wal/a.wvo").await.unwrap(), Some(body));
        assert_eq!(faults.requests(), 3);
    }
}
