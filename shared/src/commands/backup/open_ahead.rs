//! Opening a backup's files ahead of the copier: a thread of its own (not one of the runtime's
//! blocking pool, which it would hold for the whole backup) opens and `fstat`s them in the
//! copier's order, at most [`OPEN_AHEAD`] before it. Each file's open had been a hop to a
//! blocking thread and back, one file after the other: with 61,000 small files that was a
//! large part of a backup that reads nothing new (every file is only opened, `fstat`ed and taken
//! over unread).

use std::path::Path;
use std::sync::Arc;

use super::BackupError;
use super::control::CONTROL_FILE;
use super::inventory::{At, Roots, Walk};

/// Files opened and not yet taken by the copier, at most (each holds a descriptor; with the one
/// being handed over and the copier's own, two more are open).
pub const OPEN_AHEAD: usize = 64;

/// A file opened with what `fstat` said of it; `None` when it was dropped since the walk.
pub(super) type Opened = Option<(std::fs::File, std::fs::Metadata)>;

/// The files of a backup being opened ahead, in order.
pub(super) struct OpenAhead {
    /// Each file with its index in the sources, checked against the copier's.
    rx: tokio::sync::mpsc::Receiver<(usize, Result<Opened, BackupError>)>,
    roots: Roots,
}

impl OpenAhead {
    /// Start opening every source that [`opens`] says the copier opens, in order.
    pub(super) fn start(sources: Arc<Walk>, roots: &Roots) -> OpenAhead {
        let (tx, rx) = tokio::sync::mpsc::channel(OPEN_AHEAD);
        let on_disk = roots.clone();
        // Ends when every file is opened, or when the copier stops taking them (it failed). Not
        // started (no thread to be had): the copier's first file reports it.
        let _ = std::thread::Builder::new()
            .name("walvault-open".into())
            .spawn(move || {
                for (at, src) in sources.iter().enumerate().filter(|(_, s)| opens(s)) {
                    if tx.blocking_send((at, open(&on_disk.path(src.rel)))).is_err() {
                        return;
                    }
                }
            });
        OpenAhead {
            rx,
            roots: roots.clone(),
        }
    }

    /// Source `at`, the next file the copier opens (it takes them in order: anything else is
    /// refused rather than a file taken for another).
    pub(super) async fn next(&mut self, at: usize, src: At<'_>) -> Result<Opened, BackupError> {
        let failed = |why: &str| BackupError::Read {
            path: self.roots.path(src.rel).display().to_string(),
            source: std::io::Error::other(why.to_string()),
        };
        match self.rx.recv().await {
            Some((opened_at, opened)) if opened_at == at => opened,
            Some(_) => Err(failed(
                "the files opened ahead are out of step with the backup (a bug)",
            )),
            None => Err(failed("the thread opening files ended early")),
        }
    }
}

/// Whether the copier opens `src`: a file, but `global/pg_control` (read whole until its CRC
/// checks).
pub(super) fn opens(src: &At<'_>) -> bool {
    !src.is_dir && src.rel != CONTROL_FILE
}

/// Open `abs` and `fstat` it; `None` when it was dropped since the walk.
fn open(abs: &Path) -> Result<Opened, BackupError> {
    match std::fs::File::open(abs).and_then(|f| f.metadata().map(|m| (f, m))) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(BackupError::Read {
            path: abs.display().to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(rel: &str, is_dir: bool) -> super::super::inventory::Source {
        super::super::inventory::Source {
            rel: rel.into(),
            is_dir,
            mode: 0o600,
        }
    }

    #[tokio::test]
    async fn files_are_opened_in_order_skipping_directories_pg_control_and_the_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("base")).unwrap();
        std::fs::write(dir.path().join("base/a"), b"one").unwrap();
        std::fs::write(dir.path().join("base/b"), b"three").unwrap();
        let sources = Arc::new(
            Walk::of(vec![
                source("base", true),
                source("base/a", false),
                source("base/gone", false),
                source("base/b", false),
                source(CONTROL_FILE, false),
            ])
            .unwrap(),
        );
        let roots = Roots::of(dir.path());
        let mut ahead = OpenAhead::start(Arc::clone(&sources), &roots);
        let mut lens = vec![];
        for (at, src) in sources.iter().enumerate().filter(|(_, s)| opens(s)) {
            lens.push(ahead.next(at, src).await.unwrap().map(|(_, m)| m.len()));
        }
        assert_eq!(lens, [Some(3), None, Some(5)]);
        // Asked for another file than the next one opened: refused, not handed the wrong one.
        let mut ahead = OpenAhead::start(Arc::clone(&sources), &roots);
        let err = ahead.next(3, sources.get(3)).await.unwrap_err();
        assert!(err.to_string().contains("out of step"), "{err}");
    }
}
