//! Whether the repository at the URL is (still) there: `walvault.json` is read again every
//! [`super::scheduler::REPOSITORY_CHECK_EVERY`], so a repository removed (a volume unmounted)
//! pauses uploads instead of writing into a location that is no repository, and one recreated
//! gets markers under its own id. Each reading is recorded in the spool, where push finds which
//! repository the store holds without a request of its own
//! ([`crate::commands::push::TRUST_DAEMON_CHECK`]).

use std::sync::Arc;

use tokio::task::JoinHandle;

use super::clock::Clock;
use crate::config::Settings;
use crate::local::handoff::Spool;
use crate::repo::{RepoError, Writer};

/// The repository the daemon archives into, as the last check found it.
#[derive(Debug)]
pub(crate) struct RepoWatch {
    settings: Arc<Settings>,
    repo: Writer,
    gone: bool,
    check: Option<JoinHandle<Result<Writer, RepoError>>>,
    spool: Spool,
    /// [`crate::repo::store::store_identity`] of the settings.
    store: String,
    clock: Arc<dyn Clock>,
}

impl RepoWatch {
    /// Watch `repo`, just read from the store.
    pub(crate) fn new(
        settings: Arc<Settings>,
        repo: Writer,
        spool: Spool,
        clock: Arc<dyn Clock>,
    ) -> RepoWatch {
        let store = crate::repo::store::store_identity(&settings.repo, &settings.store_options());
        let watch = RepoWatch {
            settings,
            repo,
            gone: false,
            check: None,
            spool,
            store,
            clock,
        };
        watch.record();
        watch
    }

    /// The spool's record of this reading (wall clock: push compares it with its own). A record
    /// that cannot be written only makes push read `walvault.json` itself.
    fn record(&self) {
        let now = self.clock.now_micros();
        if let Err(e) = self.spool.record_repository(&self.store, self.repo.id(), now) {
            tracing::warn!("cannot record the repository check in the spool: {e}");
        }
    }

    /// The daemon stops: its reading is withdrawn from the spool (nobody keeps it current).
    pub(crate) fn stop(self) {
        self.spool.forget_repository();
    }

    /// The repository (the last one found, even while it is gone).
    pub(crate) fn repo(&self) -> &Writer {
        &self.repo
    }

    /// The repository to upload into; `None` while it is gone (uploads paused).
    pub(crate) fn uploads_into(&self) -> Option<&Writer> {
        (!self.gone).then_some(&self.repo)
    }

    /// Whether a check is in flight (or ended without [`RepoWatch::take_finished`] yet).
    pub(crate) fn checking(&self) -> bool {
        self.check.is_some()
    }

    /// Start reading `walvault.json` again.
    pub(crate) fn start_check(&mut self) {
        let settings = Arc::clone(&self.settings);
        self.check = Some(tokio::spawn(async move {
            Writer::open_writable(&settings.repo, &settings.store_options()).await
        }));
    }

    /// Act on a finished check: a replaced repository is archived into from now on, a removed
    /// one pauses uploads until it is back.
    pub(crate) async fn take_finished(&mut self) {
        let Some(t) = self.check.take_if(|t| t.is_finished()) else {
            return;
        };
        match t.await {
            Ok(Ok(now)) => {
                if now.id() != self.repo.id() {
                    tracing::warn!(old = %self.repo.id(), new = %now.id(), "the repository at {} was replaced; archiving into the new one", self.settings.repo);
                } else if self.gone {
                    tracing::info!("repository {} is back; uploads resume", self.settings.repo);
                }
                self.repo = now;
                self.gone = false;
                self.record();
            }
            Ok(Err(e)) if !e.is_transient() => {
                self.spool.forget_repository();
                if !self.gone {
                    tracing::error!(
                        "{e}; uploads paused (push will keep failing too, and PostgreSQL keeps the WAL)"
                    );
                }
                self.gone = true;
            }
            Ok(Err(e)) => tracing::warn!("repository check: {e}"),
            Err(_) => {}
        }
    }
}
