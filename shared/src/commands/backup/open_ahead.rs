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
use super::inventory::{Roots, Unchanged};
use super::walk::{At, Walk};
use crate::basebackup::manifest::FileStat;

/// Files opened and not yet taken by the copier, at most (each holds a descriptor; with the one
/// being handed over and the copier's own, two more are open).
pub const OPEN_AHEAD: usize = 64;

/// A file opened with what `fstat` said of it; `None` when it was dropped since the walk.
pub(super) type Opened = Option<Ahead>;

/// A file as the thread left it for the copier.
#[derive(Debug)]
pub(super) enum Ahead {
    /// Opened, with what `fstat` said of it.
    Open(std::fs::File, std::fs::Metadata),
    /// Not opened: a `stat` of its path found it as the previous backup read it
    /// ([`Unchanged::holds`]), to be taken over.
    Unchanged(FileStat),
}

/// The files of a backup being opened ahead, in order.
pub(super) struct OpenAhead {
    /// Each file with its index in the sources, checked against the copier's.
    rx: tokio::sync::mpsc::Receiver<(usize, Result<Opened, BackupError>)>,
    roots: Roots,
}

impl OpenAhead {
    /// Start opening every source that [`opens`] says the copier opens, in order, but those
    /// `unchanged` holds as they are.
    pub(super) fn start(sources: Arc<Walk>, roots: &Roots, unchanged: Option<Unchanged>) -> OpenAhead {
        let (tx, rx) = tokio::sync::mpsc::channel(OPEN_AHEAD);
        let on_disk = roots.clone();
        // Ends when every file is opened, or when the copier stops taking them (it failed). Not
        // started (no thread to be had): the copier's first file reports it.
        let _ = std::thread::Builder::new()
            .name("walvault-open".into())
            .spawn(move || {
                for (at, src) in sources.iter().enumerate().filter(|(_, s)| opens(s)) {
                    let ahead = open(&on_disk.path(src.rel), src.rel, unchanged.as_ref());
                    if tx.blocking_send((at, ahead)).is_err() {
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

/// `abs` (`rel` in the backup) left unopened when `unchanged` holds it as a `stat` of its path
/// finds it (a regular file), else opened and `fstat`ed; `None` when it was dropped since the
/// walk.
fn open(abs: &Path, rel: &str, unchanged: Option<&Unchanged>) -> Result<Opened, BackupError> {
    if let Some(u) = unchanged
        && let Ok(meta) = std::fs::symlink_metadata(abs)
        && meta.is_file()
    {
        let stat = crate::basebackup::reuse::file_stat(&meta);
        if u.holds(rel, &stat) {
            return Ok(Some(Ahead::Unchanged(stat)));
        }
    }
    match std::fs::File::open(abs).and_then(|f| f.metadata().map(|m| (f, m))) {
        Ok((f, m)) => Ok(Some(Ahead::Open(f, m))),
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

    fn source(rel: &str, is_dir: bool) -> super::super::walk::Source {
        super::super::walk::Source {
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
        let mut ahead = OpenAhead::start(Arc::clone(&sources), &roots, None);
        let mut lens = vec![];
        for (at, src) in sources.iter().enumerate().filter(|(_, s)| opens(s)) {
            lens.push(ahead.next(at, src).await.unwrap().map(|a| match a {
                Ahead::Open(_, m) => m.len(),
                Ahead::Unchanged(_) => panic!("nothing to take over"),
            }));
        }
        assert_eq!(lens, [Some(3), None, Some(5)]);
        // Asked for another file than the next one opened: refused, not handed the wrong one.
        let mut ahead = OpenAhead::start(Arc::clone(&sources), &roots, None);
        let err = ahead.next(3, sources.get(3)).await.unwrap_err();
        assert!(err.to_string().contains("out of step"), "{err}");
    }

    /// A file the previous backup read and that has not changed since is left unopened, found
    /// by a `stat` of its path; one that changed, or that it never recorded, is opened.
    #[tokio::test]
    async fn unchanged_files_are_not_opened() {
        use crate::basebackup::manifest::{Entry, EntryKind, FileRecord};
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("base")).unwrap();
        for (name, bytes) in [("a", &b"one"[..]), ("b", b"three"), ("c", b"seven")] {
            std::fs::write(dir.path().join("base").join(name), bytes).unwrap();
        }
        let stat_of = |name: &str| {
            crate::basebackup::reuse::file_stat(
                &std::fs::metadata(dir.path().join("base").join(name)).unwrap(),
            )
        };
        let mut m = crate::catalog::testing::manifest("20260101T000000Z", 1, 5, 2_000_000);
        "000000010000000000000005".clone_into(&mut m.start_wal);
        "000000010000000000000005".clone_into(&mut m.stop_wal);
        let id = |c: char| c.to_string().repeat(64).parse().unwrap();
        let file = |name: &str, size: u64, c: char| Entry {
            path: format!("base/{name}"),
            kind: EntryKind::File,
            mode: 0o600,
            size,
            chunks: vec![id(c)],
            within: None,
        };
        m.entries = vec![file("a", 3, 'a'), file("b", 5, 'b'), file("c", 5, 'c')];
        let record = |name: &str, stat| FileRecord {
            path: format!("base/{name}"),
            stored: vec![9],
            stat: Some(stat),
            read_by: None,
        };
        // `b` was 5 bytes of other times when the previous backup read it; `c` has no record.
        let mut then_b = stat_of("b");
        then_b.mtime_ns -= 1;
        m.files = vec![record("a", stat_of("a")), record("b", then_b)];
        let now_ns = super::super::inventory::wall_clock_ns();
        // The previous backup examined its files well after they were last written.
        m.files_examined_after_us = Some(now_ns / 1000 + 10_000_000);
        let previous = super::super::inventory::Previous::of(&m);
        let sources = Arc::new(
            Walk::of(vec![
                source("base", true),
                source("base/a", false),
                source("base/b", false),
                source("base/c", false),
            ])
            .unwrap(),
        );
        let unchanged = previous.unchanged(now_ns + 20_000_000_000);
        let mut ahead = OpenAhead::start(Arc::clone(&sources), &Roots::of(dir.path()), unchanged);
        let mut got = vec![];
        for (at, src) in sources.iter().enumerate().filter(|(_, s)| opens(s)) {
            got.push(match ahead.next(at, src).await.unwrap().unwrap() {
                Ahead::Open(_, m) => format!("opened {}", m.len()),
                Ahead::Unchanged(s) => format!("unchanged {}", s.size),
            });
        }
        assert_eq!(got, ["unchanged 3", "opened 5", "opened 5"]);
        // With this backup's clock before the previous one's, nothing is compared.
        let unchanged = previous.unchanged(now_ns);
        let mut ahead = OpenAhead::start(Arc::clone(&sources), &Roots::of(dir.path()), unchanged);
        assert!(matches!(
            ahead.next(1, sources.get(1)).await.unwrap(),
            Some(Ahead::Open(..))
        ));
    }
}
