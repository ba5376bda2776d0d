//! The repository: its layout, the formats of what it stores, and the storage it lives in.
//! Every format here is specified in `docs/FORMAT.md`.

pub mod descriptor;
pub mod layout;
pub mod object;
pub mod store;
pub mod url;

pub use descriptor::{ClusterIdentity, RepoDescriptor};
pub use object::{ObjectError, SealedObject};
pub use store::{Access, Store, StoreError, StoreOptions};
pub use url::RepoUrl;
