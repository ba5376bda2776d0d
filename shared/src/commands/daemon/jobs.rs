//! The daemon's background jobs in flight (repository checks, window refreshes, backups,
//! verifies, drills, forced WAL switches): at most one of each kind, started at each
//! housekeeping tick when the [`Schedule`] says they are due.

use std::sync::Arc;

use tokio::task::JoinHandle;

use super::DaemonOptions;
use super::backups::{BackupJob, scheduled_backup};
use super::clock::Clock;
use super::drills::scheduled_drill;
use super::metrics::Metrics;
use super::repo_watch::RepoWatch;
use super::scheduler::{Intervals, Job, Schedule};
use super::verifies::scheduled_verify;
use super::wal_switch::WalSwitcher;
use super::window::{LastCatalog, update_window};
use crate::commands::drill::DrillOptions;
use crate::config::Settings;

/// A job that runs on its own until it ends.
#[derive(Debug, Default)]
struct Running(Option<JoinHandle<()>>);

impl Running {
    fn is_running(&self) -> bool {
        self.0.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn start(&mut self, job: impl Future<Output = ()> + Send + 'static) {
        self.0 = Some(tokio::spawn(job));
    }

    fn abort(&self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

/// The scheduled jobs, what they need, and the ones running.
#[derive(Debug)]
pub(crate) struct Jobs {
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    schedule: Schedule,
    backup_job: Option<BackupJob>,
    drill_opts: Option<DrillOptions>,
    /// The last catalog read, so each refresh downloads only new manifests and summaries.
    catalog: LastCatalog,
    window: Running,
    backup: Running,
    verify: Running,
    drill: Running,
    switcher: Option<WalSwitcher>,
}

impl Jobs {
    /// The jobs `opts` asks for, scheduled from now.
    pub(crate) fn new(
        settings: Arc<Settings>,
        opts: &DaemonOptions,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Jobs {
        // Backups and forced switches need a connection, drills their options.
        let backup_job = opts
            .pg_conn
            .as_ref()
            .filter(|_| opts.backup_every.is_some())
            .zip(opts.pgdata.as_ref())
            .map(|(conn, pgdata)| BackupJob {
                pgdata: Some(pgdata.clone()),
                conn: conn.clone(),
                retention: opts.retention.clone(),
                page_checksums: opts.page_checksums,
            });
        let drill_opts = opts.drill.clone().filter(|_| opts.drill_every.is_some());
        let switcher = opts
            .max_wal_age
            .zip(opts.pg_conn.clone())
            .map(|(max_age, conn)| WalSwitcher::new(conn, max_age));
        let intervals = Intervals {
            backup: opts.backup_every.filter(|_| backup_job.is_some()),
            verify: opts.verify_every,
            drill: opts.drill_every.filter(|_| drill_opts.is_some()),
            wal_switch: switcher.is_some(),
        };
        Jobs {
            schedule: Schedule::new(&intervals, clock.now()),
            settings,
            metrics,
            clock,
            backup_job,
            drill_opts,
            catalog: LastCatalog::default(),
            window: Running::default(),
            backup: Running::default(),
            verify: Running::default(),
            drill: Running::default(),
            switcher,
        }
    }

    /// One housekeeping tick: take in the checks that ended, then start the jobs due.
    pub(crate) async fn tick(&mut self, watch: &mut RepoWatch) {
        watch.take_finished().await;
        if let Some(s) = &mut self.switcher {
            s.take_finished().await;
        }
        let running = |job| match job {
            Job::RepoCheck => watch.checking(),
            Job::Window => self.window.is_running(),
            Job::Backup => self.backup.is_running(),
            Job::Verify => self.verify.is_running(),
            Job::Drill => self.drill.is_running(),
            Job::WalSwitch => self.switcher.as_ref().is_some_and(WalSwitcher::checking),
        };
        let due = self.schedule.due(self.clock.now(), running);
        for job in due {
            self.start(job, watch);
        }
    }

    fn start(&mut self, job: Job, watch: &mut RepoWatch) {
        let (metrics, clock) = (Arc::clone(&self.metrics), Arc::clone(&self.clock));
        match job {
            Job::RepoCheck => watch.start_check(),
            Job::Window => {
                let catalog = Arc::clone(&self.catalog);
                self.window
                    .start(update_window(watch.repo().reader(), metrics, catalog));
            }
            Job::Backup => {
                if let Some(job) = self.backup_job.clone() {
                    let settings = Arc::clone(&self.settings);
                    self.backup.start(scheduled_backup(settings, job, metrics, clock));
                }
            }
            Job::Verify => self
                .verify
                .start(scheduled_verify(watch.repo().reader(), metrics, clock)),
            Job::Drill => {
                if let Some(opts) = self.drill_opts.clone() {
                    let (settings, repo) = (Arc::clone(&self.settings), watch.repo().clone());
                    self.drill
                        .start(scheduled_drill(settings, opts, repo, metrics, clock));
                }
            }
            Job::WalSwitch => {
                if let Some(s) = &mut self.switcher {
                    s.start();
                }
            }
        }
    }

    /// Stop the long jobs at shutdown: a backup, a verify, a drill (a drill cut short stops its
    /// server and removes its directory as it is dropped, drill.rs).
    pub(crate) fn abort(&self) {
        self.backup.abort();
        self.verify.abort();
        self.drill.abort();
    }
}
