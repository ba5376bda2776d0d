//! Credentials and endpoints of the object stores, as the configuration file's tables give them.
//! (`AWS_*`, `AZURE_*` and `GOOGLE_*` environment variables win; see [`super::store`].)

use serde::Deserialize;

/// A secret (S3 secret key, session token, Azure account key): never shown by `Debug` or in any message.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for handing to the storage client only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The `[s3]` table of the TOML file. Each key has the same meaning as the `AWS_*` environment
/// variable of the same name (`endpoint` is `AWS_ENDPOINT_URL`), which wins when both are set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
    /// Allow `http://` endpoints (loopback or a trusted network only).
    pub allow_http: Option<bool>,
    /// Virtual-hosted-style requests (`bucket.endpoint`) instead of path style.
    pub virtual_hosted_style: Option<bool>,
}

/// The `[azure]` table of the TOML file. Each key has the meaning of the `AZURE_STORAGE_*`
/// environment variable of the same name (`account` is `AZURE_STORAGE_ACCOUNT_NAME`, `access_key`
/// is `AZURE_STORAGE_ACCOUNT_KEY`, `endpoint` is `AZURE_STORAGE_ENDPOINT`), which wins when both
/// are set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureSettings {
    /// The storage account name.
    pub account: Option<String>,
    /// The storage account's shared key.
    pub access_key: Option<Secret>,
    /// The blob service URL, for a private endpoint or an emulator
    /// (`http://127.0.0.1:10000/devstoreaccount1` for Azurite); `https://<account>.blob.core.windows.net`
    /// when unset.
    pub endpoint: Option<String>,
    /// Talk to a local Azurite at `http://127.0.0.1:10000` (or `AZURITE_BLOB_STORAGE_URL`) with its
    /// well-known development account unless `account`/`access_key` say otherwise; `endpoint` is
    /// then ignored.
    pub use_emulator: Option<bool>,
    /// Allow `http://` endpoints (loopback or a trusted network only).
    pub allow_http: Option<bool>,
}

/// The `[gcs]` table of the TOML file. Each key has the meaning of the `GOOGLE_*` environment
/// variable of the same name (`service_account` is `GOOGLE_SERVICE_ACCOUNT`, a path to a service
/// account JSON file; `service_account_key` is `GOOGLE_SERVICE_ACCOUNT_KEY`, that JSON itself;
/// `application_credentials` is `GOOGLE_APPLICATION_CREDENTIALS`), which wins when both are set.
/// With none, the instance's metadata server is asked (on Google Cloud).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcsSettings {
    pub service_account: Option<String>,
    pub service_account_key: Option<Secret>,
    pub application_credentials: Option<String>,
    /// Allow `http://` endpoints (an emulator on loopback only).
    pub allow_http: Option<bool>,
}
