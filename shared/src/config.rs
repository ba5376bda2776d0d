//! Settings shared by both agents, from flags, `WALVAULT_*` environment variables and a TOML file.
//!
//! Precedence, highest first: command-line flag, environment variable (clap merges these two),
//! then the TOML file named by `--config`/`WALVAULT_CONFIG`, else `/etc/walvault/walvault.toml`
//! when it exists.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::repo::keys::KeySource;
pub use crate::repo::settings::{AzureSettings, GcsSettings, S3Settings, Secret};
use crate::repo::url::UrlError;
use crate::repo::{Reader, RepoError, RepoUrl, Store, StoreError, StoreOptions};

/// Read when neither `--config` nor `WALVAULT_CONFIG` names a file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/walvault/walvault.toml";
/// zstd level for WAL files; see README "Compression level" for the measurement behind it.
pub const DEFAULT_COMPRESS_LEVEL: i32 = 3;
/// How long a push or fetch keeps retrying transient storage errors before giving up.
pub const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the repository is and how to reach it, as given on the command line or in the
/// environment (clap merges the two): the flags both agents share. [`RepoArgs::settings`] adds
/// the TOML file and the defaults.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RepoArgs {
    /// Repository URL: file:///var/lib/walvault, s3://bucket/prefix or az://container/prefix
    #[arg(long, env = "WALVAULT_REPO", global = true, value_name = "URL")]
    pub repo: Option<String>,
    /// TOML file with repo, fallback_repo, compress_level, retry_timeout, page_checksums, [s3], [azure], [gcs] credentials, [retention], [encryption] [default: /etc/walvault/walvault.toml if it exists]
    #[arg(long, env = "WALVAULT_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Give up on an unreachable repository after this long (500ms, 30s, 5m) [default: 60s]
    #[arg(long, env = "WALVAULT_RETRY_TIMEOUT", global = true, value_name = "DURATION")]
    pub retry_timeout: Option<String>,
    /// restore-agent's `--fallback-repo` ([`FallbackArgs`]), which restore-agent puts here once
    /// parsed ([`RepoArgs::with_fallback`]); archive-agent has no such flag.
    #[arg(skip)]
    pub fallback_repo: Option<String>,
}

/// restore-agent's second repository: a flag of its own, since only a reader can use one.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FallbackArgs {
    /// A copy of the repository (made by `archive-agent copy`: same repository id, same key) to
    /// read whatever is missing or damaged in --repo from, e.g. s3://dr-bucket/walvault. Each
    /// object served from it is logged once. Every command reads through it except verify,
    /// which judges --repo alone. [default: fallback_repo in the TOML file]
    #[arg(long, env = "WALVAULT_FALLBACK_REPO", global = true, value_name = "URL")]
    pub fallback_repo: Option<String>,
}

impl RepoArgs {
    /// The flags of another repository (a copy's source or target): `url`, read with `config`
    /// (else the same configuration file), with the same retry timeout, and no fallback.
    pub fn elsewhere(&self, url: &str, config: Option<&Path>) -> RepoArgs {
        RepoArgs {
            repo: Some(url.to_string()),
            config: config.map(Path::to_path_buf).or_else(|| self.config.clone()),
            retry_timeout: self.retry_timeout.clone(),
            fallback_repo: None,
        }
    }

    /// These flags with restore-agent's `--fallback-repo`.
    pub fn with_fallback(self, fallback: FallbackArgs) -> RepoArgs {
        RepoArgs {
            fallback_repo: fallback.fallback_repo,
            ..self
        }
    }

    /// The settings these flags give, with the key from the environment ([`KeyEnv::read`]), the
    /// TOML file they name (else [`DEFAULT_CONFIG_PATH`] if it exists) and the defaults;
    /// `compress_level` is a command's own flag.
    pub fn settings(&self, compress_level: Option<i32>) -> Result<Settings, ConfigError> {
        Settings::resolve(
            self,
            compress_level,
            KeyEnv::read(),
            Path::new(DEFAULT_CONFIG_PATH),
        )
    }
}

/// The zstd level of the commands that compress (`push`, `backup`): one flag, declared once.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct CompressArgs {
    /// zstd level, 1 (fastest) to 19 (smallest) [default: compress_level in the TOML file, else 3]
    #[arg(long, env = "WALVAULT_COMPRESS_LEVEL", value_name = "LEVEL")]
    pub compress_level: Option<i32>,
}

/// An encrypted repository's key source from the environment, never from a flag: PostgreSQL
/// logs the command lines it runs. Either replaces the `[encryption]` table's key source.
#[derive(Debug, Clone, Default)]
pub struct KeyEnv {
    /// `WALVAULT_ENCRYPTION_KEY_FILE`.
    pub file: Option<PathBuf>,
    /// `WALVAULT_ENCRYPTION_KEY_COMMAND`.
    pub command: Option<String>,
}

impl KeyEnv {
    /// The variables as set (an empty one is unset).
    pub fn read() -> KeyEnv {
        KeyEnv {
            file: std::env::var_os("WALVAULT_ENCRYPTION_KEY_FILE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            command: std::env::var("WALVAULT_ENCRYPTION_KEY_COMMAND")
                .ok()
                .filter(|v| !v.is_empty()),
        }
    }
}

/// The resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub repo: RepoUrl,
    /// restore-agent's copy of the repository, read for what `repo` lacks: `--fallback-repo`
    /// or `WALVAULT_FALLBACK_REPO`, else the file's `fallback_repo`.
    pub fallback_repo: Option<RepoUrl>,
    pub compress_level: i32,
    pub retry_timeout: Duration,
    /// S3 settings from the file's `[s3]` table; `AWS_*` environment variables take precedence.
    pub s3: S3Settings,
    /// Azure settings from the file's `[azure]` table; `AZURE_*` environment variables take
    /// precedence.
    pub azure: AzureSettings,
    /// GCS settings from the file's `[gcs]` table; `GOOGLE_*` environment variables take
    /// precedence.
    pub gcs: GcsSettings,
    /// The file's `[retention]` table.
    pub retention: RetentionSettings,
    /// Where an encrypted repository's key comes from: `WALVAULT_ENCRYPTION_KEY_FILE` or
    /// `WALVAULT_ENCRYPTION_KEY_COMMAND`, else the file's `[encryption]` table.
    pub key: Option<KeySource>,
    /// Whether [`Settings::key`] came from the environment (another process run with the same
    /// configuration file does not find it there).
    pub key_from_env: bool,
    /// `page_checksums` in the file (default true): whether backups from disk verify page
    /// checksums; `--no-page-checksums` turns it off for one command.
    pub page_checksums: bool,
    /// The file's `max_rate`: what [`Settings::cap_writes`] applies when no flag says.
    pub max_rate: Option<crate::repo::rate::Rate>,
    /// The cap every store opened with these settings shares, once [`Settings::cap_writes`]
    /// set it (backup, copy and the daemon do; push does not: archiving must keep up with
    /// the WAL PostgreSQL writes).
    pub rate_limit: Option<std::sync::Arc<crate::repo::rate::RateLimit>>,
}

/// The `[encryption]` table: where the key of an encrypted repository comes from. Never a
/// command-line flag: PostgreSQL logs archive_command and restore_command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionSettings {
    /// A file holding a 256-bit key as 64 hex digits (`openssl rand -hex 32`), or a passphrase
    /// (stretched with Argon2id). Readable by the postgres user only.
    pub key_file: Option<PathBuf>,
    /// A shell command whose standard output is the key or passphrase (Vault, a cloud KMS CLI).
    pub key_command: Option<String>,
}

/// Retention rules: the `[retention]` table, and the flags of the same names (`expire`,
/// `daemon`), one type for both. Any rule given as a flag replaces the table's rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Keep the newest N backups, with every instant since the oldest of them
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep every instant of the last DURATION restorable (14d, 2w, 36h): the backups that
    /// became consistent in it and the newest one before it
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<String>,
    /// Keep the newest backup of each of the last N days that have one (restorable to its
    /// consistency point)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// ... of each of the last N ISO weeks (Monday to Sunday)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// ... of each of the last N calendar months
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// ... of each of the last N calendar years
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Time zone of the calendar periods (IANA name, e.g. Europe/Paris) [default: UTC]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "ZONE")]
    pub timezone: Option<String>,
    /// Rewrite the packs with the most dead bytes (chunks only expired backups used) until at
    /// most PERCENT of all pack bytes stays dead; 100 rewrites nothing [default: 10]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(0..=100))]
    pub max_dead: Option<u8>,
}

impl RetentionSettings {
    /// Whether any rule is set (the time zone alone is not a rule).
    pub fn has_rules(&self) -> bool {
        self.keep_last.is_some()
            || self.keep_within.is_some()
            || self.keep_daily.is_some()
            || self.keep_weekly.is_some()
            || self.keep_monthly.is_some()
            || self.keep_yearly.is_some()
    }
}

/// The TOML file; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    repo: Option<String>,
    /// restore-agent's copy of the repository (`--fallback-repo`).
    fallback_repo: Option<String>,
    compress_level: Option<i32>,
    retry_timeout: Option<String>,
    /// The cap on what backup, copy and the daemon send (`--max-rate`).
    max_rate: Option<String>,
    #[serde(default)]
    s3: S3Settings,
    #[serde(default)]
    azure: AzureSettings,
    #[serde(default)]
    gcs: GcsSettings,
    #[serde(default)]
    retention: RetentionSettings,
    #[serde(default)]
    encryption: EncryptionSettings,
    page_checksums: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("max_rate: {0}")]
    Rate(#[from] crate::repo::rate::RateParseError),
    #[error(
        "no repository configured: pass --repo URL, set WALVAULT_REPO, or put repo = \"file:///path\" in a TOML file named by --config or WALVAULT_CONFIG"
    )]
    NoRepository,
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("compress level {0} is out of range: use 1 (fastest) to 19 (smallest)")]
    Level(i32),
    #[error("unknown time zone {0:?}: use an IANA name like UTC, Europe/Paris or America/New_York")]
    TimeZone(String),
    #[error("a retention rule of 0 keeps nothing: leave the rule out instead")]
    ZeroRule,
    #[error("invalid duration {0:?}: use a number with a unit, like 500ms, 30s, 5m, 1h, 14d or 2w")]
    Duration(String),
    #[error("{0}: give key_file or key_command, not both")]
    TwoKeySources(&'static str),
}

/// The key source `file` or `command` name, if any; refuses both.
fn key_source(
    file: Option<PathBuf>,
    command: Option<String>,
    place: &'static str,
) -> Result<Option<KeySource>, ConfigError> {
    match (file, command) {
        (Some(_), Some(_)) => Err(ConfigError::TwoKeySources(place)),
        (Some(f), None) => Ok(Some(KeySource::File(f))),
        (None, Some(c)) => Ok(Some(KeySource::Command(c))),
        (None, None) => Ok(None),
    }
}

/// Whether `name` has the shape of an IANA time zone name (`UTC`, `Europe/Paris`, `Etc/GMT+2`):
/// letters, digits, `_`, `-`, `+`, `.`, and `/` between non-empty parts that are not `.` or `..`.
pub fn is_zone_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+' | b'.'))
        })
}

/// A duration as [`parse_duration`] reads it back, in the largest unit that divides it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("w", 7 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// Parse `500ms`, `30s`, `5m`, `1h`, `14d`, `2w`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::Duration(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" | "min" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        "w" => n.checked_mul(7 * 86_400_000),
        _ => None,
    }
    .ok_or_else(bad)?;
    Ok(Duration::from_millis(ms))
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: parse_message(&text, &e),
    })
}

/// A TOML error for messages: where it is, and what is wrong, without the offending value. The
/// file may hold a secret, and toml quotes values in backticks ("invalid type: integer `123`").
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let mut what = String::new();
    let mut quoted = false;
    for c in e.message().chars() {
        match c {
            '`' => quoted = !quoted,
            '\n' | '\r' if !quoted => what.push(' '),
            _ if !quoted => what.push(c),
            _ => {}
        }
    }
    let what = what.split_whitespace().collect::<Vec<_>>().join(" ");
    match e.span() {
        Some(span) => {
            let line = text.get(..span.start).map_or(0, |t| t.matches('\n').count()) + 1;
            format!("line {line}: {what}")
        }
        None => what,
    }
}

impl Settings {
    /// Resolve settings from what was given (`args`, `compress_level`, `env`), the TOML file and
    /// the defaults, in that order of precedence; `default_config` is the file read when none is
    /// named (injected for tests).
    pub fn resolve(
        args: &RepoArgs,
        compress_level: Option<i32>,
        env: KeyEnv,
        default_config: &Path,
    ) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None if default_config.is_file() => read_file(default_config)?,
            None => FileConfig::default(),
        };
        let repo = args.repo.clone().or(file.repo).ok_or(ConfigError::NoRepository)?;
        let fallback_repo = args.fallback_repo.clone().or(file.fallback_repo);
        let compress_level = compress_level
            .or(file.compress_level)
            .unwrap_or(DEFAULT_COMPRESS_LEVEL);
        if !(1..=19).contains(&compress_level) {
            return Err(ConfigError::Level(compress_level));
        }
        let retry_timeout = match args.retry_timeout.clone().or(file.retry_timeout) {
            Some(s) => parse_duration(&s)?,
            None => DEFAULT_RETRY_TIMEOUT,
        };
        // The environment gives a whole key source, replacing the table's.
        let from_env = key_source(
            env.file,
            env.command,
            "WALVAULT_ENCRYPTION_KEY_FILE and WALVAULT_ENCRYPTION_KEY_COMMAND",
        )?;
        let key_from_env = from_env.is_some();
        let key = match from_env {
            Some(k) => Some(k),
            None => key_source(
                file.encryption.key_file,
                file.encryption.key_command,
                "the [encryption] table",
            )?,
        };
        let max_rate = file.max_rate.as_deref().map(str::parse).transpose()?;
        Ok(Settings {
            max_rate,
            rate_limit: None,
            repo: repo.parse()?,
            fallback_repo: fallback_repo.as_deref().map(str::parse).transpose()?,
            compress_level,
            retry_timeout,
            s3: file.s3,
            azure: file.azure,
            gcs: file.gcs,
            retention: file.retention,
            key,
            key_from_env,
            page_checksums: file.page_checksums.unwrap_or(true),
        })
    }

    /// How to open the repository's store.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            retry_timeout: self.retry_timeout,
            s3: self.s3.clone(),
            azure: self.azure.clone(),
            gcs: self.gcs.clone(),
            key: self.key.clone(),
            rate_limit: self.rate_limit.clone(),
        }
    }

    /// The repository, opened for reading, with the fallback repository, when one is set,
    /// answering for what it lacks ([`Reader::open_with_fallback`]): how every restore-agent
    /// command but verify opens it.
    pub async fn open_reader(&self) -> Result<Reader, RepoError> {
        Reader::open_with_fallback(&self.repo, self.fallback_repo.as_ref(), &self.store_options()).await
    }

    /// The repository's store, with the fallback repository's behind it when one is set
    /// ([`Store::open_with_fallback`]), for a command that reads the descriptor beside its first
    /// object ([`Reader::on_stores`]).
    pub async fn open_store(&self) -> Result<Store, StoreError> {
        Store::open_with_fallback(&self.repo, self.fallback_repo.as_ref(), &self.store_options()).await
    }

    /// Cap what this process writes to `flag` (`--max-rate` or `WALVAULT_MAX_RATE`), else to
    /// the file's `max_rate`, else leave it uncapped; one cap for every store opened from here on.
    pub fn cap_writes(&mut self, flag: Option<crate::repo::rate::Rate>) {
        self.rate_limit = flag
            .or(self.max_rate)
            .map(|r| std::sync::Arc::new(crate::repo::rate::RateLimit::new(r)));
    }

    /// What a capped process sent so far (`None` when uncapped).
    pub fn sent(&self) -> Option<crate::repo::rate::Sent> {
        self.rate_limit.as_ref().map(|r| r.sent())
    }

    /// The most a push or fetch may take in all: the retry budget, plus one request in flight
    /// when it ran out (see [`crate::repo::store::REQUEST_TIMEOUT`]).
    pub fn call_bound(&self) -> Duration {
        self.retry_timeout + crate::repo::store::REQUEST_TIMEOUT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("14d").unwrap(), Duration::from_secs(14 * 86_400));
        assert_eq!(parse_duration("2w").unwrap(), Duration::from_secs(14 * 86_400));
        assert_eq!(format_duration(Duration::from_secs(14 * 86_400)), "2w");
        assert_eq!(format_duration(Duration::from_secs(36 * 3600)), "36h");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        for bad in ["", "s", "1y", "-1s", "1.5s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_environment_replaces_the_encryption_table_and_one_source_is_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("w.toml");
        let args = RepoArgs {
            config: Some(cfg.clone()),
            ..Default::default()
        };
        let resolve = |env: KeyEnv| Settings::resolve(&args, None, env, Path::new("/nonexistent"));
        let with = |file: Option<&str>, command: Option<&str>| KeyEnv {
            file: file.map(PathBuf::from),
            command: command.map(str::to_string),
        };
        std::fs::write(
            &cfg,
            "repo = \"file:///r\"\n[encryption]\nkey_command = \"vault kv get -field=key secret/w\"\n",
        )
        .unwrap();
        let s = resolve(with(None, None)).unwrap();
        assert_eq!(
            s.key,
            Some(KeySource::Command("vault kv get -field=key secret/w".into()))
        );
        assert!(!s.key_from_env);
        assert_eq!(s.store_options().key, s.key);
        // The command may hold a token: never shown by Debug.
        assert!(!format!("{s:?}").contains("vault kv"), "{s:?}");
        let s = resolve(with(Some("/etc/walvault/key"), None)).unwrap();
        assert_eq!(s.key, Some(KeySource::File("/etc/walvault/key".into())));
        assert!(s.key_from_env);
        let s = resolve(with(None, Some("cat /k"))).unwrap();
        assert_eq!(s.key, Some(KeySource::Command("cat /k".into())));
        assert!(matches!(
            resolve(with(Some("/k"), Some("cat /k"))),
            Err(ConfigError::TwoKeySources(_))
        ));
        std::fs::write(
            &cfg,
            "repo = \"file:///r\"\n[encryption]\nkey_file = \"/k\"\nkey_command = \"cat /k\"\n",
        )
        .unwrap();
        assert!(matches!(
            resolve(with(None, None)),
            Err(ConfigError::TwoKeySources(_))
        ));
        std::fs::write(&cfg, "repo = \"file:///r\"\n[encryption]\nkey = \"s3cr3t\"\n").unwrap();
        let e = resolve(with(None, None)).unwrap_err().to_string();
        assert!(e.contains("unknown field") && !e.contains("s3cr3t"), "{e}");
        std::fs::write(&cfg, "repo = \"file:///r\"\n").unwrap();
        assert_eq!(resolve(with(None, None)).unwrap().key, None);
    }

    #[test]
    fn retention_table_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("w.toml");
        std::fs::write(
            &cfg,
            "repo = \"file:///r\"\n[retention]\nkeep_daily = 7\nkeep_within = \"14d\"\ntimezone = \"Europe/Paris\"\n",
        )
        .unwrap();
        let s = Settings::resolve(
            &RepoArgs {
                config: Some(cfg),
                ..Default::default()
            },
            None,
            KeyEnv::default(),
            Path::new("/x"),
        )
        .unwrap();
        let from_file = s.retention.policy(&RetentionSettings::default()).unwrap();
        assert_eq!(from_file.keep_daily, Some(7));
        assert_eq!(from_file.keep_within, Some(Duration::from_secs(14 * 86_400)));
        assert_eq!(
            from_file.timezone.as_ref().and_then(|t| t.iana_name()),
            Some("Europe/Paris")
        );
        // Flags with rules replace the table's rules; the time zone still comes from the file.
        let flags = RetentionSettings {
            keep_last: Some(3),
            ..Default::default()
        };
        let p = s.retention.policy(&flags).unwrap();
        assert_eq!((p.keep_last, p.keep_daily, p.keep_within), (Some(3), None, None));
        assert!(p.timezone.is_some());
        let bad_tz = RetentionSettings {
            timezone: Some("Mars/Olympus".into()),
            ..Default::default()
        };
        assert!(matches!(
            s.retention.policy(&bad_tz),
            Err(ConfigError::TimeZone(_))
        ));
        let zero = RetentionSettings {
            keep_last: Some(0),
            ..Default::default()
        };
        assert!(matches!(s.retention.policy(&zero), Err(ConfigError::ZeroRule)));
    }

    #[test]
    fn the_fallback_repository_comes_from_the_flag_else_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("w.toml");
        std::fs::write(
            &cfg,
            "repo = \"file:///a\"\nfallback_repo = \"s3://dr/walvault\"\n",
        )
        .unwrap();
        let resolve = |flag: Option<&str>| {
            let args = RepoArgs {
                config: Some(cfg.clone()),
                ..Default::default()
            }
            .with_fallback(FallbackArgs {
                fallback_repo: flag.map(str::to_string),
            });
            Settings::resolve(&args, None, KeyEnv::default(), Path::new("/nonexistent")).unwrap()
        };
        let from_file = resolve(None).fallback_repo.unwrap();
        assert_eq!(from_file.as_str(), "s3://dr/walvault");
        let from_flag = resolve(Some("file:///b")).fallback_repo.unwrap();
        assert_eq!(from_flag.as_str(), "file:///b");
        std::fs::write(&cfg, "repo = \"file:///a\"\n").unwrap();
        assert_eq!(resolve(None).fallback_repo, None);
    }

    #[test]
    fn flag_beats_file_and_file_fills_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("w.toml");
        std::fs::write(
            &cfg,
            "repo = \"file:///from/file\"\ncompress_level = 9\nretry_timeout = \"5s\"\n",
        )
        .unwrap();
        let from_file = Settings::resolve(
            &RepoArgs {
                config: Some(cfg.clone()),
                ..Default::default()
            },
            None,
            KeyEnv::default(),
            Path::new("/nonexistent"),
        )
        .unwrap();
        assert_eq!(from_file.repo.as_str(), "file:///from/file");
        assert_eq!(from_file.compress_level, 9);
        assert_eq!(from_file.retry_timeout, Duration::from_secs(5));
        let flag = Settings::resolve(
            &RepoArgs {
                repo: Some("file:///from/flag".into()),
                config: Some(cfg),
                ..Default::default()
            },
            None,
            KeyEnv::default(),
            Path::new("/nonexistent"),
        )
        .unwrap();
        assert_eq!(flag.repo.as_str(), "file:///from/flag");
        assert_eq!(flag.compress_level, 9);
        assert!(
            flag.page_checksums,
            "backups verify page checksums unless told not to"
        );
        let off_cfg = dir.path().join("off.toml");
        std::fs::write(&off_cfg, "repo = \"file:///r\"\npage_checksums = false\n").unwrap();
        let off = Settings::resolve(
            &RepoArgs {
                config: Some(off_cfg),
                ..Default::default()
            },
            None,
            KeyEnv::default(),
            Path::new("/x"),
        )
        .unwrap();
        assert!(!off.page_checksums);
    }

    #[test]
    fn missing_repo_unknown_keys_and_bad_levels_are_errors() {
        let none = Settings::resolve(
            &RepoArgs::default(),
            None,
            KeyEnv::default(),
            Path::new("/nonexistent"),
        );
        assert!(matches!(none, Err(ConfigError::NoRepository)));
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("w.toml");
        std::fs::write(&cfg, "repository = \"file:///typo\"\n").unwrap();
        let typo = Settings::resolve(
            &RepoArgs {
                config: Some(cfg),
                ..Default::default()
            },
            None,
            KeyEnv::default(),
            Path::new("/x"),
        );
        assert!(matches!(typo, Err(ConfigError::Parse { .. })));
        let level = Settings::resolve(
            &RepoArgs {
                repo: Some("file:///r".into()),
                ..Default::default()
            },
            Some(40),
            KeyEnv::default(),
            Path::new("/x"),
        );
        assert!(matches!(level, Err(ConfigError::Level(40))));
    }

    #[test]
    fn s3_table_is_read_and_its_secrets_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("w.toml");
        std::fs::write(
            &cfg,
            "repo = \"s3://b/p\"\n[s3]\nendpoint = \"http://127.0.0.1:3900\"\nregion = \"garage\"\n\
             access_key_id = \"GKabc\"\nsecret_access_key = \"hunter2\"\nallow_http = true\n",
        )
        .unwrap();
        let s = Settings::resolve(
            &RepoArgs {
                config: Some(cfg.clone()),
                ..Default::default()
            },
            None,
            KeyEnv::default(),
            Path::new("/x"),
        )
        .unwrap();
        assert_eq!(s.s3.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(s.s3.allow_http, Some(true));
        assert_eq!(
            s.s3.secret_access_key.as_ref().map(Secret::expose),
            Some("hunter2")
        );
        assert!(!format!("{s:?}").contains("hunter2"));
        std::fs::write(&cfg, "[s3]\nsecret = \"x\"\n").unwrap();
        let typo = Settings::resolve(
            &RepoArgs {
                repo: Some("s3://b/p".into()),
                config: Some(cfg),
                ..Default::default()
            },
            None,
            KeyEnv::default(),
            Path::new("/x"),
        );
        assert!(matches!(typo, Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn gcs_table_is_read_and_its_key_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("w.toml");
        let key = r#"{"client_email":"a@b","private_key":"c2VjcmV0LXBlbQ","private_key_id":"k"}"#;
        std::fs::write(
            &cfg,
            format!("repo = \"gs://wal-archive/pg\"\n[gcs]\nservice_account_key = '{key}'\n"),
        )
        .unwrap();
        let s = Settings::resolve(
            &RepoArgs {
                config: Some(cfg),
                ..Default::default()
            },
            None,
            KeyEnv::default(),
            Path::new("/x"),
        )
        .unwrap();
        assert_eq!(s.gcs.service_account_key.as_ref().map(Secret::expose), Some(key));
        assert!(!format!("{s:?}").contains("c2VjcmV0"));
        // A key that is no PEM is refused when the client is built: permanently, unquoted.
        let e = crate::repo::Store::open(&s.repo, &s.store_options()).unwrap_err();
        assert!(!e.is_transient(), "{e}");
        assert!(!format!("{e} {e:?}").contains("c2VjcmV0"), "{e}");
    }

    #[test]
    fn azure_table_is_read_and_its_key_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("w.toml");
        std::fs::write(
            &cfg,
            "repo = \"az://wal/p\"\n[azure]\naccount = \"devstoreaccount1\"\n\
             access_key = \"aHVudGVyMg==\"\nendpoint = \"http://127.0.0.1:10000/devstoreaccount1\"\n\
             use_emulator = false\nallow_http = true\n",
        )
        .unwrap();
        let s = Settings::resolve(
            &RepoArgs {
                config: Some(cfg.clone()),
                ..Default::default()
            },
            None,
            KeyEnv::default(),
            Path::new("/x"),
        )
        .unwrap();
        assert_eq!(s.azure.account.as_deref(), Some("devstoreaccount1"));
        assert_eq!(
            s.azure.endpoint.as_deref(),
            Some("http://127.0.0.1:10000/devstoreaccount1")
        );
        assert_eq!(s.azure.use_emulator, Some(false));
        assert_eq!(s.azure.allow_http, Some(true));
        assert_eq!(
            s.azure.access_key.as_ref().map(Secret::expose),
            Some("aHVudGVyMg==")
        );
        assert_eq!(s.store_options().azure, s.azure);
        assert!(!format!("{s:?}").contains("aHVudGVyMg"));
        assert!(!format!("{:?}", s.store_options()).contains("aHVudGVyMg"));
        // The settings make a client (no request is sent when opening an object store).
        let store = crate::repo::Store::open(&s.repo, &s.store_options()).unwrap();
        assert!(!format!("{store:?}").contains("aHVudGVyMg"));
        assert!(!format!("{store:?}").contains("104, 117, 110")); // the decoded bytes
        std::fs::write(&cfg, "[azure]\naccount_key = \"x\"\n").unwrap();
        let typo = Settings::resolve(
            &RepoArgs {
                repo: Some("az://wal/p".into()),
                config: Some(cfg),
                ..Default::default()
            },
            None,
            KeyEnv::default(),
            Path::new("/x"),
        );
        assert!(matches!(typo, Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn parse_errors_never_quote_a_value() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("w.toml");
        for text in [
            "[s3]\nsecret_access_key = 98765432123\n",
            "[s3]\nsecret_access_key = \"98765432123\n",
            "[s3]\nsecret_access_key = 98765432123abc\n",
            "[s3]\nsecret_access_key = \"98765432123\" x\n",
        ] {
            std::fs::write(&cfg, text).unwrap();
            let err = Settings::resolve(
                &RepoArgs {
                    repo: Some("s3://b/p".into()),
                    config: Some(cfg.clone()),
                    ..Default::default()
                },
                None,
                KeyEnv::default(),
                Path::new("/x"),
            )
            .unwrap_err()
            .to_string();
            assert!(!err.contains("98765432123"), "{err}");
            assert!(err.contains("line 2"), "{err}");
        }
    }
}
