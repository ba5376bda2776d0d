//! Paths one after the other in one string ([`Names`]): what a backup's walk, its list of what
//! it copied and the previous backup's files each name every file with, rather than a `String`
//! each (24 bytes and an allocation beside every path).

use super::BackupError;

/// Paths one after the other in one string, each found by where it ends.
#[derive(Debug, Default)]
pub(super) struct Names {
    text: String,
    ends: Vec<u32>,
}

impl Names {
    /// Add `name`; its index.
    pub fn push(&mut self, name: &str) -> Result<usize, BackupError> {
        self.text.push_str(name);
        let end = u32::try_from(self.text.len())
            .map_err(|_| BackupError::Unsound("more than 4 GiB of paths in one backup".into()))?;
        self.ends.push(end);
        Ok(self.ends.len() - 1)
    }

    /// Name `at`.
    pub fn get(&self, at: usize) -> &str {
        let start = if at == 0 { 0 } else { self.ends[at - 1] as usize };
        &self.text[start..self.ends[at] as usize]
    }

    /// How many names.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Every name, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> + Clone + '_ {
        (0..self.len()).map(|at| self.get(at))
    }

    /// Room for `names` more names of `bytes` bytes in all.
    pub fn reserve(&mut self, names: usize, bytes: usize) {
        self.text.reserve_exact(bytes);
        self.ends.reserve_exact(names);
    }

    /// Their bytes, all names together.
    pub fn bytes(&self) -> usize {
        self.text.len()
    }

    pub fn shrink_to_fit(&mut self) {
        self.text.shrink_to_fit();
        self.ends.shrink_to_fit();
    }
}
