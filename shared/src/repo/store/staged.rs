//! Objects written into a local repository through a staging file, then published under their
//! key with `link(2)`: atomic, exclusive and durable (push's path on file:// repositories).

use super::{PutNew, StoreError, WritableStore};

/// An object being written to a local repository: a staging file beside its final name
/// (`<name>#<digits>`, which listings skip), published with `link(2)` by
/// [`WritableStore::publish_new`] or removed when dropped.
#[derive(Debug)]
pub struct Staged {
    pub file: Option<std::fs::File>,
    path: std::path::PathBuf,
    dest: std::path::PathBuf,
    key: String,
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl WritableStore {
    /// A staging file for `key` in a local repository (`None` for object stores): the object
    /// is written into it by the caller and published with [`WritableStore::publish_new`].
    pub fn stage(&self, key: &str) -> Result<Option<Staged>, StoreError> {
        let Some(root) = &self.local_root else {
            return Ok(None);
        };
        let dest = key.split('/').fold(root.clone(), |p, part| p.join(part));
        let fail = |e: std::io::Error| self.error_io("write", key, e);
        for n in 1u32.. {
            let mut path = dest.clone().into_os_string();
            path.push(format!("#{}{n}", std::process::id()));
            let path = std::path::PathBuf::from(path);
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(Some(Staged {
                        file: Some(file),
                        path,
                        dest,
                        key: key.to_string(),
                    }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let parent = dest.parent().expect("a key names a file under the root");
                    std::fs::create_dir_all(parent).map_err(fail)?;
                    crate::local::crashsafe::sync_dir(parent.parent().unwrap_or(root)).map_err(fail)?;
                }
                Err(e) => return Err(fail(e)),
            }
        }
        unreachable!("some staging name is free")
    }

    /// Publish a staged object under its key only if none exists there: the file is synced,
    /// hard-linked to its name (which fails if the name exists: atomic and exclusive), and the
    /// directory synced, so the object is durable when this returns.
    pub async fn publish_new(&self, mut staged: Staged) -> Result<PutNew, StoreError> {
        let key = staged.key.clone();
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let fail = |e: std::io::Error| this.error_io("write", &staged.key, e);
            if let Some(file) = staged.file.take() {
                file.sync_all().map_err(fail)?;
            }
            match std::fs::hard_link(&staged.path, &staged.dest) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(PutNew::AlreadyExists),
                Err(e) => return Err(fail(e)),
            }
            let parent = staged.dest.parent().expect("a key names a file under the root");
            crate::local::crashsafe::sync_dir(parent).map_err(fail)?;
            Ok(PutNew::Created)
        })
        .await
        .map_err(|e| self.error_io("write", &key, std::io::Error::other(e)))?
    }
}
