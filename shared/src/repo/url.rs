//! Repository URLs: `file:///absolute/path`, `s3://bucket/prefix`, `az://container/prefix` and
//! `gs://bucket/prefix`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A repository location. `Display` never shows a password.
#[derive(Clone, PartialEq, Eq)]
pub struct RepoUrl(url::Url);

/// Kinds of repository this build can open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoLocation {
    Local(PathBuf),
    S3 {
        bucket: String,
        prefix: String,
    },
    /// Azure Blob storage (`az://` or `azure://`); the account comes from the settings.
    Azure {
        container: String,
        prefix: String,
    },
    /// Google Cloud Storage (`gs://`); credentials come from the settings.
    Gcs {
        bucket: String,
        prefix: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("invalid repository URL {0:?}: {1}")]
    Invalid(String, String),
    #[error("repository URL {0:?}: file URLs need an absolute path, like file:///var/lib/walvault")]
    NotAbsolute(String),
    #[error(
        "repository URL scheme {0:?} is not supported: use file:///path, s3://bucket/prefix, az://container/prefix or gs://bucket/prefix"
    )]
    Unsupported(String),
}

impl RepoUrl {
    /// Where the repository is, decoded: `file:///tmp/my%20repo` is the directory `/tmp/my repo`,
    /// the very path the URL was validated as.
    pub fn location(&self) -> RepoLocation {
        let prefix = || {
            percent_encoding::percent_decode_str(self.0.path().trim_matches('/'))
                .decode_utf8_lossy()
                .into_owned()
        };
        match self.0.scheme() {
            "s3" | "s3a" => RepoLocation::S3 {
                bucket: self.0.host_str().unwrap_or_default().to_string(),
                prefix: prefix(),
            },
            "az" | "azure" => RepoLocation::Azure {
                container: self.0.host_str().unwrap_or_default().to_string(),
                prefix: prefix(),
            },
            "gs" => RepoLocation::Gcs {
                bucket: self.0.host_str().unwrap_or_default().to_string(),
                prefix: prefix(),
            },
            _ => RepoLocation::Local(
                self.0
                    .to_file_path()
                    .unwrap_or_else(|()| PathBuf::from(self.0.path())),
            ),
        }
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl FromStr for RepoUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown = || redact(s);
        if s.starts_with('/') {
            return Err(UrlError::Invalid(
                shown(),
                "write it as file:///absolute/path".into(),
            ));
        }
        let url = url::Url::parse(s).map_err(|e| UrlError::Invalid(shown(), e.to_string()))?;
        match url.scheme() {
            "file" => {
                if url.host_str().is_some_and(|h| !h.is_empty() && h != "localhost") {
                    return Err(UrlError::NotAbsolute(shown()));
                }
                let path = url.to_file_path().map_err(|_| UrlError::NotAbsolute(shown()))?;
                if !path.is_absolute() || path.components().any(|c| c == std::path::Component::ParentDir) {
                    return Err(UrlError::NotAbsolute(shown()));
                }
                // The decoded path: `file:///%2F` is the root too.
                if path.parent().is_none() {
                    return Err(UrlError::Invalid(
                        shown(),
                        "the file system root cannot be a repository".into(),
                    ));
                }
            }
            "s3" | "s3a" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(UrlError::Invalid(shown(), "missing bucket name".into()));
                }
            }
            "az" | "azure" => {
                // The account is a setting, not part of the URL: object_store would read
                // `az://container@account.blob.core.windows.net` differently.
                if !url.username().is_empty() || url.password().is_some() {
                    return Err(UrlError::Invalid(
                        shown(),
                        "write it as az://container/prefix; the account goes in [azure] or AZURE_STORAGE_ACCOUNT_NAME".into(),
                    ));
                }
                if !url.host_str().is_some_and(valid_container) {
                    return Err(UrlError::Invalid(
                        shown(),
                        "the container name must be 3 to 63 lowercase letters, digits and dashes".into(),
                    ));
                }
            }
            "gs" => {
                if !url.username().is_empty() || url.password().is_some() {
                    return Err(UrlError::Invalid(
                        shown(),
                        "write it as gs://bucket/prefix; credentials go in [gcs] or GOOGLE_*".into(),
                    ));
                }
                if !url.host_str().is_some_and(valid_gcs_bucket) {
                    return Err(UrlError::Invalid(
                        shown(),
                        "the bucket name must be 3 to 63 lowercase letters, digits, dashes, underscores and dots".into(),
                    ));
                }
            }
            other => return Err(UrlError::Unsupported(other.to_string())),
        }
        Ok(RepoUrl(url))
    }
}

/// Google's rule for bucket names (without dots, the usual case, up to 63 characters): 3 to 63 of
/// `a-z0-9-_.`, starting and ending with a letter or digit.
fn valid_gcs_bucket(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Azure's rule for container names: 3 to 63 of `a-z0-9-`, starting and ending with a letter or
/// digit, no `--`.
fn valid_container(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// A URL for messages: any password replaced.
fn redact(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("REDACTED"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => s.chars().take(200).collect(),
    }
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(self.0.as_str()))
    }
}

impl fmt::Debug for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_decoded() {
        let u: RepoUrl = "file:///tmp/my repo".parse().unwrap();
        assert_eq!(u.location(), RepoLocation::Local("/tmp/my repo".into()));
        let u: RepoUrl = "s3://bucket/a b/c".parse().unwrap();
        assert_eq!(
            u.location(),
            RepoLocation::S3 {
                bucket: "bucket".into(),
                prefix: "a b/c".into()
            }
        );
    }

    #[test]
    fn file_urls_must_be_absolute() {
        let u: RepoUrl = "file:///var/lib/walvault".parse().unwrap();
        assert_eq!(u.location(), RepoLocation::Local("/var/lib/walvault".into()));
        for bad in [
            "/var/lib/walvault",
            "file://host/x",
            "file:///",
            "file:%2F/",
            "file:///%2F",
            "walvault",
            "ftp://x/y",
        ] {
            assert!(bad.parse::<RepoUrl>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn s3_urls_name_bucket_and_prefix_and_hide_passwords() {
        let u: RepoUrl = "s3://backups/pg/main".parse().unwrap();
        assert_eq!(
            u.location(),
            RepoLocation::S3 {
                bucket: "backups".into(),
                prefix: "pg/main".into()
            }
        );
        let secret: RepoUrl = "s3://key:hunter2@backups/x".parse().unwrap();
        assert!(!secret.to_string().contains("hunter2"));
        assert!(!format!("{secret:?}").contains("hunter2"));
    }

    #[test]
    fn azure_urls_name_container_and_prefix() {
        for scheme in ["az", "azure"] {
            let u: RepoUrl = format!("{scheme}://backups/pg/main/").parse().unwrap();
            assert_eq!(
                u.location(),
                RepoLocation::Azure {
                    container: "backups".into(),
                    prefix: "pg/main".into()
                }
            );
        }
        let root: RepoUrl = "az://wal-archive".parse().unwrap();
        assert_eq!(
            root.location(),
            RepoLocation::Azure {
                container: "wal-archive".into(),
                prefix: String::new()
            }
        );
        for bad in [
            "az://",
            "az:///prefix",
            "az://ab/p",
            "az://Backups/p",
            "az://back--ups/p",
            "az://-backups/p",
            "az://back.ups/p",
            "az://backups@account.blob.core.windows.net/p",
            "azure://key:hunter2@backups/p",
        ] {
            let err = bad.parse::<RepoUrl>().unwrap_err();
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn gcs_urls_name_a_bucket_and_a_prefix() {
        let url: RepoUrl = "gs://wal-archive/pg15/main".parse().unwrap();
        assert_eq!(
            url.location(),
            RepoLocation::Gcs {
                bucket: "wal-archive".into(),
                prefix: "pg15/main".into()
            }
        );
        for bad in [
            "gs://",
            "gs:///p",
            "gs://ab/p",
            "gs://Backups/p",
            "gs://-b-/p",
            "gs://k:s@bucket/p",
        ] {
            assert!(bad.parse::<RepoUrl>().is_err(), "{bad}");
        }
    }
}
