//! The repository: its layout, the formats of what it stores, and the storage it lives in.
//! Every format here is specified in `docs/FORMAT.md`.
//!
//! Commands reach storage only through here: [`Repository`] (descriptor validated once, no
//! accidental creation), over [`Store`] / [`WritableStore`] (every request retried by one policy,
//! read-only as a type), with every key built by [`layout`] and every object read back through
//! [`stored`] (`repo.read::<Manifest>(&id)`).

pub mod descriptor;
#[cfg(test)]
pub mod fault;
pub mod http;
pub mod identity;
pub mod init;
pub mod keys;
pub mod layout;
pub mod locks;
pub mod object;
pub mod rate;
pub mod reads;
pub mod repository;
pub mod settings;
pub mod store;
pub mod stored;
pub mod url;

pub use descriptor::RepoDescriptor;
pub use identity::{ClusterIdentity, RepoId};
pub use object::{ObjectError, SealedObject};
pub use repository::{Reader, RepoError, Repository, WalCheckError, Writer};
pub use store::{Store, StoreError, StoreErrorKind, StoreOptions, WritableStore};
pub use stored::{Damage, Objects, ReadError, StoredKind};
pub use url::RepoUrl;
