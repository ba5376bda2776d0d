//! The checks of a manifest's entries, one entry at a time and in order ([`EntryChecks`]): what
//! [`Manifest::validate`] runs over the entries it holds, and what a restore runs over entries
//! it reads from the stored manifest a page at a time ([`super::paged`]), never holding them all.
//! Each check needs only the entry, the manifest's outline and what is kept here: the previous
//! path, the files whose names may still prefix an entry to come, and the length of each shared
//! chunk met.

use std::collections::{BTreeSet, HashMap};

use super::{
    Entry, EntryKind, FORMAT_VERSION_WITHIN, MAX_FILE_SIZE, MAX_TEXT_LEN, MAX_TOTAL_SIZE, Manifest,
    ManifestError, check_relative_path, entry_err, shown, tablespace_part,
};
use crate::basebackup::chunk::ChunkId;

/// The checks of one manifest's entries, fed in order ([`EntryChecks::check`]).
pub(super) struct EntryChecks<'m> {
    m: &'m Manifest,
    /// The tablespaces' oids.
    oids: BTreeSet<u32>,
    previous: Option<String>,
    /// The files bytes add up to so far.
    total: u64,
    /// Files an entry to come may still lie under (`f/...`): entries are sorted, so the paths
    /// under `f/` form one run after `f`, and each file kept is a prefix of the next one kept
    /// (at most one per byte of a path).
    files: Vec<String>,
    /// The length each shared chunk met is given.
    shared: HashMap<ChunkId, u64>,
}

impl<'m> EntryChecks<'m> {
    /// The checks of `m`'s entries; `m`'s tablespaces are checked first.
    pub(super) fn new(m: &'m Manifest) -> Result<EntryChecks<'m>, ManifestError> {
        Ok(EntryChecks {
            oids: m.check_tablespaces()?,
            m,
            previous: None,
            total: 0,
            files: Vec::new(),
            shared: HashMap::new(),
        })
    }

    /// Check entry `e`, the next in the manifest's order.
    pub(super) fn check(&mut self, e: &Entry) -> Result<(), ManifestError> {
        check_relative_path(&e.path)?;
        self.m.check_entry(e, &self.oids)?;
        if let Some(prev) = &self.previous {
            if prev.as_bytes() == e.path.as_bytes() {
                return Err(entry_err(&e.path, "it is listed twice"));
            }
            if prev.as_bytes() > e.path.as_bytes() {
                return Err(entry_err(
                    &e.path,
                    format!("entries are not sorted by path (it follows {:?})", shown(prev)),
                ));
            }
        }
        self.total = match self.total.checked_add(e.size) {
            Some(t) if t <= MAX_TOTAL_SIZE => t,
            _ => {
                return Err(ManifestError::Implausible(format!(
                    "the files add up to more than {MAX_TOTAL_SIZE} bytes"
                )));
            }
        };
        self.through_no_file(e)?;
        self.shared_length(e)?;
        match &mut self.previous {
            Some(prev) => {
                prev.clear();
                prev.push_str(&e.path);
            }
            None => self.previous = Some(e.path.clone()),
        }
        Ok(())
    }

    /// Nothing may be restored through a file: `a` a file and `a/b` an entry.
    fn through_no_file(&mut self, e: &Entry) -> Result<(), ManifestError> {
        let p = e.path.as_bytes();
        // A file is let go once an entry sorts after every path under it: no later one can lie
        // there. One kept sorts between `f` and `f/`, so the files kept are each a prefix of the
        // next, and only the last can be what `e` goes through.
        while let Some(f) = self.files.last() {
            match p.strip_prefix(f.as_bytes()).map(|rest| rest.first().copied()) {
                Some(Some(b'/')) => {
                    return Err(entry_err(
                        &e.path,
                        format!("it goes through {:?}, which is a file", shown(f)),
                    ));
                }
                Some(Some(next)) if next < b'/' => break,
                _ => {
                    self.files.pop();
                }
            }
        }
        if e.kind == EntryKind::File {
            self.files.push(e.path.clone());
        }
        Ok(())
    }

    /// Every file within one shared chunk gives it the same length.
    fn shared_length(&mut self, e: &Entry) -> Result<(), ManifestError> {
        let (Some(w), Some(id)) = (e.within, e.chunks.first()) else {
            return Ok(());
        };
        let first = *self.shared.entry(*id).or_insert(w.of);
        if first != w.of {
            return Err(entry_err(
                &e.path,
                format!(
                    "its shared chunk {id} is {} bytes long, and {first} for another file",
                    w.of
                ),
            ));
        }
        Ok(())
    }
}

impl Manifest {
    /// The rules for one entry on its own.
    fn check_entry(&self, e: &Entry, oids: &std::collections::BTreeSet<u32>) -> Result<(), ManifestError> {
        let bad = |why: String| Err(entry_err(&e.path, why));
        let first = e.path.split('/').next().unwrap_or_default();
        let is_root = first.len() == e.path.len();
        if let Some(owner) = RESERVED
            .iter()
            .find(|(name, _)| *name == first)
            .map(|(_, owner)| owner)
        {
            return bad(format!("{first} {owner}"));
        }
        if MUST_BE_FILES.contains(&first) && (!is_root || e.kind != EntryKind::File) {
            return bad(format!(
                "{first} can only be a file (restore reads, appends to or removes it)"
            ));
        }
        if first == "postgresql.auto.conf" && e.size > MAX_TEXT_LEN as u64 {
            return bad(format!(
                "postgresql.auto.conf is {} bytes, more than {MAX_TEXT_LEN} (restore reads it into memory)",
                e.size
            ));
        }
        if e.mode & !0o7777 != 0 {
            return bad(format!(
                "mode {:o} has file type bits (devices, fifos, sockets and links are never restored)",
                e.mode
            ));
        }
        let tablespace = tablespace_part(&e.path).filter(|(oid, _)| oids.contains(oid));
        match e.kind {
            EntryKind::Dir => {
                if e.mode & 0o5000 != 0 {
                    return bad(format!(
                        "directory mode {:o} has the setuid or sticky bit",
                        e.mode
                    ));
                }
                if e.mode & 0o700 != 0o700 {
                    return bad(format!(
                        "directory mode {:o} lacks owner rwx (restore could not fill or clean it)",
                        e.mode
                    ));
                }
                if e.size != 0 || !e.chunks.is_empty() || e.within.is_some() {
                    return bad("a directory has no size and no chunks".into());
                }
            }
            EntryKind::File => {
                if e.mode & 0o7000 != 0 {
                    return bad(format!(
                        "file mode {:o} has setuid, setgid or sticky bits",
                        e.mode
                    ));
                }
                if matches!(tablespace, Some((_, None))) {
                    return bad("a tablespace's root is a directory, not a file".into());
                }
                if e.size > MAX_FILE_SIZE {
                    return bad(format!(
                        "{} bytes, more than the limit of {MAX_FILE_SIZE}",
                        e.size
                    ));
                }
                self.check_chunks(e)?;
            }
        }
        // A tablespace lives outside the data directory, whose 0700 mode protects the rest.
        if tablespace.is_some() && e.mode & 0o022 != 0 {
            return bad(format!(
                "mode {:o} is group or world writable in a tablespace, outside the data directory",
                e.mode
            ));
        }
        Ok(())
    }

    /// A file's chunks agree with its size: `chunk_size` each but the last, or one shared
    /// chunk holding the file's bytes ([`Entry::within`]).
    fn check_chunks(&self, e: &Entry) -> Result<(), ManifestError> {
        if let Some(w) = e.within {
            if self.version < FORMAT_VERSION_WITHIN {
                return Err(entry_err(
                    &e.path,
                    format!("a shared chunk in a manifest of version {}", self.version),
                ));
            }
            return match (e.chunks.len(), w.at.checked_add(e.size)) {
                (1, Some(end)) if e.size > 0 && end <= w.of && w.of <= self.chunk_size => Ok(()),
                _ => Err(entry_err(
                    &e.path,
                    format!(
                        "{} bytes at {} of a shared chunk of {} ({} chunks; chunks of {})",
                        e.size,
                        w.at,
                        w.of,
                        e.chunks.len(),
                        self.chunk_size
                    ),
                )),
            };
        }
        let expected = e.size.div_ceil(self.chunk_size);
        if e.chunks.len() as u64 != expected {
            return Err(entry_err(
                &e.path,
                format!(
                    "{} chunks for {} bytes in chunks of {} (expected {expected})",
                    e.chunks.len(),
                    e.size,
                    self.chunk_size
                ),
            ));
        }
        Ok(())
    }
}

/// Root names a backup never holds because restore writes them itself (or they are walvault's),
/// with why.
const RESERVED: [(&str, &str); 3] = [
    ("backup_label", "is written by restore itself, from the manifest"),
    (
        "tablespace_map",
        "is written by restore itself, from the chosen locations",
    ),
    (
        crate::local::handoff::SPOOL_DIR,
        "is walvault's local spool, never part of a backup",
    ),
];
/// Root names restore reads, appends to or removes: if a backup holds them, they are files.
const MUST_BE_FILES: [&str; 3] = ["postgresql.auto.conf", "recovery.signal", "standby.signal"];
