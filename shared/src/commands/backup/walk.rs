//! The sources of a backup as its walk holds them ([`Walk`]): every path in one string, each
//! with its kind and mode, in the order they are copied. The list of what the backup copied and
//! the previous backup's files name these paths by their index rather than holding them again.

use super::BackupError;
use super::names::Names;

/// A file or directory to back up: its path in the manifest (where it is on disk is
/// [`Roots::path`](super::inventory::Roots::path) of it: a path each, for every file of a cluster, took 14 MB at 201,000 files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Source {
    pub rel: String,
    pub is_dir: bool,
    pub mode: u32,
}

/// A source as the walk holds it ([`Walk::get`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct At<'a> {
    pub rel: &'a str,
    pub is_dir: bool,
    pub mode: u32,
}

/// Every path of a walk in one string ([`Names`]), with each source's kind and mode: a
/// [`Source`] each took some 80 bytes at 300,963 files (24 MB), and its copier's list of what
/// it copied names them again ([`super::listing::Listing`] shares these).
#[derive(Debug, Default)]
pub(super) struct Walk {
    pub names: Names,
    /// Mode bits, and [`WALK_DIR`] for a directory.
    meta: Vec<u32>,
}

/// Set in [`Walk`]'s `meta` for a directory.
const WALK_DIR: u32 = 1 << 31;

impl Walk {
    /// The sources in this order.
    #[cfg(test)]
    pub fn of(sources: Vec<Source>) -> Result<Walk, BackupError> {
        let mut walk = Walk {
            names: Names::default(),
            meta: Vec::with_capacity(sources.len()),
        };
        for s in sources {
            walk.push(s)?;
        }
        walk.names.shrink_to_fit();
        Ok(walk)
    }

    pub(super) fn push(&mut self, s: Source) -> Result<(), BackupError> {
        self.names.push(&s.rel)?;
        self.meta.push(s.mode | if s.is_dir { WALK_DIR } else { 0 });
        Ok(())
    }

    /// The same sources in path order, but `last` (when there) after every other. Sorted
    /// through their indexes, then copied once into room of the exact size: a walk of 300,963
    /// files held as a `Source` each peaked at 71 MiB, most of the backup's peak.
    pub(super) fn sorted(self, last: &str) -> Result<Walk, BackupError> {
        let key = |i: u32| {
            let rel = self.names.get(i as usize);
            (rel == last, rel)
        };
        let n = u32::try_from(self.len())
            .map_err(|_| BackupError::Unsound("more than 4 billion files in one backup".into()))?;
        let mut order: Vec<u32> = (0..n).collect();
        // Paths are unique: sorted in place, with no scratch.
        order.sort_unstable_by(|&a, &b| key(a).cmp(&key(b)));
        let mut names = Names::default();
        names.reserve(order.len(), self.names.bytes());
        let mut meta = Vec::with_capacity(order.len());
        for i in order {
            names.push(self.names.get(i as usize))?;
            meta.push(self.meta[i as usize]);
        }
        Ok(Walk { names, meta })
    }

    pub fn len(&self) -> usize {
        self.meta.len()
    }

    /// The index of the source at `rel`, asked in path order: `cursor` starts at 0 and keeps
    /// where the walk was left, so that asking every path of a list in path order costs one
    /// pass. The walk is in path order but for its last source ([`Walk::sorted`]), which is
    /// compared on its own.
    pub fn position(&self, rel: &str, cursor: &mut usize) -> Option<usize> {
        let n = self.len();
        if n > 0 && self.names.get(n - 1) == rel {
            return Some(n - 1);
        }
        let ordered = n.saturating_sub(1);
        while *cursor < ordered && self.names.get(*cursor) < rel {
            *cursor += 1;
        }
        (*cursor < ordered && self.names.get(*cursor) == rel).then_some(*cursor)
    }

    /// Source `at`.
    pub fn get(&self, at: usize) -> At<'_> {
        let meta = self.meta[at];
        At {
            rel: self.names.get(at),
            is_dir: meta & WALK_DIR != 0,
            mode: meta & !WALK_DIR,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = At<'_>> {
        (0..self.len()).map(|at| self.get(at))
    }
}
