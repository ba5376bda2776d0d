//! archive-agent's repository administration: `init`, `rekey`, `pin` and `unpin`, each with the
//! report it prints.

use std::path::Path;

use serde::Serialize;

use crate::basebackup::BackupId;
use crate::basebackup::manifest::BackupIdError;
use crate::commands::expire::ExpireError;
use crate::config::Settings;
use crate::repo::init::InitError;
use crate::repo::keys::KeySource;
use crate::repo::{ClusterIdentity, RepoError, RepoId, Writer};
use crate::report::{Message, Report};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Init(#[from] InitError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Pin(#[from] ExpireError),
    #[error(transparent)]
    BackupId(#[from] BackupIdError),
}

/// The repository `init` created; `init --json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    /// The repository URL, as walvault prints it (credentials redacted).
    pub repository: String,
    pub id: RepoId,
    /// The cluster it is bound to, when `--pgdata` named it.
    pub cluster: Option<ClusterIdentity>,
    pub encrypted: bool,
    /// With `--copy-of`: the repository this one is a second copy of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_of: Option<String>,
}

impl Report for Created {
    fn render(&self) -> String {
        let encrypted = if self.encrypted { "encrypted " } else { "" };
        let mut out = match &self.cluster {
            Some(c) => format!(
                "created {encrypted}repository {} (id {}) for {c}",
                self.repository, self.id
            ),
            None => format!(
                "created {encrypted}repository {} (id {}); the first WAL segment archived binds it to its cluster",
                self.repository, self.id
            ),
        };
        if let Some(source) = &self.copy_of {
            out = format!(
                "created {encrypted}repository {} (id {}) as a second copy of {source}\nfill it with `archive-agent copy --repo {source} --to {}`, or keep it filled with `archive-agent daemon --copy-to {}`",
                self.repository, self.id, self.repository, self.repository
            );
        }
        if self.encrypted {
            out.push_str(
                "\nkeep the key safe and apart from the repository: without it nothing in the repository can be read",
            );
        }
        out
    }
}

/// `archive-agent init`: create the repository, bound to the cluster of `pgdata` when given.
pub async fn init(
    settings: &Settings,
    pgdata: Option<&Path>,
    encrypt: bool,
    now_us: i64,
) -> Result<Created, AdminError> {
    let cluster = pgdata.map(crate::repo::init::cluster_of_data_dir).transpose()?;
    let created = Writer::init(
        &settings.repo,
        &settings.store_options(),
        cluster,
        now_us,
        encrypt,
    )
    .await?;
    Ok(Created {
        repository: settings.repo.to_string(),
        id: created.id().clone(),
        cluster: created.cluster().copied(),
        encrypted: created.sealer().is_encrypted(),
        copy_of: None,
    })
}

/// `archive-agent init --copy-of SOURCE`: create, at `settings`' repository, a second copy of
/// the repository `source` names (same id, cluster and encryption record; empty until copied).
pub async fn init_copy(settings: &Settings, source: &Settings) -> Result<Created, AdminError> {
    let from = crate::repo::Reader::open(&source.repo, &source.store_options()).await?;
    let created = Writer::init_copy(&settings.repo, &settings.store_options(), &from).await?;
    Ok(Created {
        repository: settings.repo.to_string(),
        id: created.id().clone(),
        cluster: from.cluster().copied(),
        encrypted: created.sealer().is_encrypted(),
        copy_of: Some(source.repo.to_string()),
    })
}

/// `archive-agent rekey`: wrap the master key again under `new_key`.
pub async fn rekey(settings: &Settings, new_key: &KeySource, now_us: i64) -> Result<Message, AdminError> {
    let mut writer = Writer::open_writable(&settings.repo, &settings.store_options()).await?;
    writer.rekey(new_key, now_us).await?;
    Ok(Message::new(format!(
        "rekeyed repository {}: it opens with the {new_key} only; point key_file / key_command (or WALVAULT_ENCRYPTION_KEY_*) at it everywhere before the next push, fetch or restore (a running daemon keeps working)",
        settings.repo
    )))
}

/// `archive-agent pin` (`note` is `Some`, itself holding the optional note) or `unpin` (`None`).
pub async fn pin(settings: &Settings, id: &str, note: Option<Option<String>>) -> Result<Message, AdminError> {
    let id: BackupId = id.parse()?;
    let writer = Writer::open_writable(&settings.repo, &settings.store_options()).await?;
    Ok(Message::new(match note {
        Some(note) => {
            crate::commands::expire::pin(&writer, &id, note).await?;
            format!("pinned {id}")
        }
        None => {
            crate::commands::expire::unpin(&writer, &id).await?;
            format!("unpinned {id}")
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Format, to_string};

    #[test]
    fn init_says_what_it_created_and_warns_about_the_key() {
        let created = Created {
            repository: "file:///srv/repo".into(),
            id: serde_json::from_str("\"0123456789abcdef0123456789abcdef\"").unwrap(),
            cluster: None,
            encrypted: true,
            copy_of: None,
        };
        let text = to_string(&created, Format::Text);
        assert!(text.starts_with("created encrypted repository file:///srv/repo (id 0123456789abcdef0123456789abcdef); the first WAL segment archived binds it"), "{text}");
        assert!(
            text.ends_with("nothing in the repository can be read\n"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&to_string(&created, Format::Json)).unwrap();
        assert_eq!(v["repository"], "file:///srv/repo");
        assert_eq!(v["encrypted"], true);
        assert!(v["cluster"].is_null());
    }
}
