//! The restored tree on disk: directories created with the backup's modes, files created at
//! their size without following or replacing anything already there, and a directory emptied
//! (`--force`, or after a failed restore).

use std::path::Path;

use super::{RestoreError, write_err};

/// Create the missing parents of `p`, 0700.
pub(crate) fn create_parent(p: &Path) -> Result<(), RestoreError> {
    use std::os::unix::fs::DirBuilderExt;
    match p.parent() {
        Some(parent) if !parent.is_dir() => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(write_err(parent)),
        _ => Ok(()),
    }
}

pub(crate) fn create_dir(p: &Path, mode: u32) -> Result<(), RestoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode & 0o7777)
        .create(p)
    {
        Ok(()) => {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode & 0o7777)).map_err(write_err(p))
        }
        Err(e) => Err(write_err(p)(e)),
    }
}

/// Create `path` (never following or replacing something already there) at `size` bytes.
pub(crate) fn create_sized(path: &Path, size: u64) -> Result<(), RestoreError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(write_err(path))?;
    file.set_len(size).map_err(write_err(path))
}

/// Remove everything inside `dir` (which may not exist).
pub(crate) fn clear_dir(dir: &Path) -> Result<(), RestoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(write_err(dir)(e)),
    };
    for e in entries {
        let p = e.map_err(write_err(dir))?.path();
        let r = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(write_err(&p))?;
    }
    Ok(())
}
