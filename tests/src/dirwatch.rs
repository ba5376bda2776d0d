//! What a process does in a directory, seen from outside through inotify: how often it listed
//! the directory or opened a file in it, how often it replaced a file whole (a rename onto it).
//! The tests count these events where timing them would depend on the machine's load.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use notify::event::{AccessKind, ModifyKind, RenameMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

/// How long [`DirWatch::stop`] waits for the events still on their way.
const STOP_LIMIT: Duration = Duration::from_secs(5);

/// A directory watched (not its subdirectories) from [`DirWatch::start`] to [`DirWatch::stop`].
#[derive(Debug)]
pub struct DirWatch {
    watcher: RecommendedWatcher,
    events: mpsc::Receiver<notify::Event>,
}

/// The events a [`DirWatch`] saw, in order.
#[derive(Debug)]
pub struct Seen {
    events: Vec<notify::Event>,
}

impl DirWatch {
    /// Watch `dir` from now on.
    pub fn start(dir: &Path) -> Result<DirWatch> {
        let (tx, events) = mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // An error (a full event queue) loses events: the counts are then a lower bound.
            if let Ok(event) = event {
                let _ = tx.send(event);
            }
        })
        .context("starting inotify")?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        Ok(DirWatch { watcher, events })
    }

    /// Stop watching; what was seen meanwhile.
    pub fn stop(self) -> Seen {
        // Dropping the watcher ends its thread, which drops the sender: the receiver then yields
        // what was queued and ends (waiting a little at most, should the thread linger).
        drop(self.watcher);
        let mut events = Vec::new();
        while let Ok(event) = self.events.recv_timeout(STOP_LIMIT) {
            events.push(event);
        }
        Seen { events }
    }
}

impl Seen {
    /// How often `path` was opened: a directory each time it was listed, a file each time it was
    /// read or written.
    pub fn opened(&self, path: &Path) -> usize {
        self.count(
            |kind| matches!(kind, EventKind::Access(AccessKind::Open(_))),
            path,
        )
    }

    /// How often a file was renamed onto `path` (replaced whole, as a crash-safe write does).
    pub fn renamed_to(&self, path: &Path) -> usize {
        self.count(
            |kind| matches!(kind, EventKind::Modify(ModifyKind::Name(RenameMode::To))),
            path,
        )
    }

    fn count(&self, kind: impl Fn(&EventKind) -> bool, path: &Path) -> usize {
        self.events
            .iter()
            .filter(|e| kind(&e.kind) && e.paths.iter().any(|p| p == path))
            .count()
    }

    /// Every event, for a failure message.
    pub fn describe(&self) -> String {
        let lines: Vec<String> = self
            .events
            .iter()
            .map(|e| {
                format!(
                    "{:?} {:?}",
                    e.kind,
                    e.paths.iter().map(PathBuf::as_path).collect::<Vec<_>>()
                )
            })
            .collect();
        lines.join("\n")
    }
}
