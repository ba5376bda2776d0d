//! Client-side encryption keys (see `docs/FORMAT.md`, "Encryption").
//!
//! Envelope encryption: each encrypted repository has one random 256-bit *master key*, chosen by
//! `archive-agent init --encrypt` and stored in `walvault.json` only wrapped (XChaCha20-Poly1305)
//! by a *key-encryption key* (KEK). The KEK comes from the DBA's key source (a key file or a key
//! command, [`KeySource`]): a 256-bit key used as is, or a passphrase stretched with Argon2id.
//! From the master key two subkeys are derived (blake3's key derivation mode): the object key,
//! which seals every object, and the id key, which makes chunk ids and content hashes keyed
//! hashes. `archive-agent rekey` re-wraps the master key under a new KEK; no object is rewritten.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::identity::RepoId;

/// The AEAD of every sealed object and of the wrapped master key.
pub const CIPHER: &str = "xchacha20poly1305";
/// How chunk ids and content hashes are computed in an encrypted repository.
pub const CHUNK_IDS: &str = "blake3-keyed";
/// Argon2id cost for passphrases (RFC 9106's second recommended option, with one lane: this is
/// run once per process, and push and fetch are one process per file).
pub const ARGON2_M_KIB: u32 = 64 * 1024;
pub const ARGON2_T: u32 = 3;
pub const ARGON2_P: u32 = 1;
/// The shortest passphrase `init` and `rekey` accept.
pub const MIN_PASSPHRASE_LEN: usize = 12;
/// The most a key file or key command may give (a key is 64 bytes; this is far beyond any passphrase).
const MAX_KEY_SOURCE_LEN: usize = 4096;
/// How long a key command may run.
pub const KEY_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

const DERIVE_OBJECT_KEY: &str = "walvault 2026-11 object encryption key";
const DERIVE_ID_KEY: &str = "walvault 2026-11 content id key";
const DERIVE_RAW_KEK: &str = "walvault 2026-11 key-encryption key from a raw key";
const WRAP_AAD: &[u8] = b"walvault repository master key v1\0";

/// Where the key-encryption key comes from: the `[encryption]` table's `key_file` or
/// `key_command`, or `WALVAULT_ENCRYPTION_KEY_FILE` / `WALVAULT_ENCRYPTION_KEY_COMMAND`.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file holding a 256-bit key in 64 hex digits, or a passphrase.
    File(PathBuf),
    /// A shell command whose standard output is the key or passphrase (Vault, a KMS CLI...).
    Command(String),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "KeySource::File({})", p.display()),
            // A command line may hold a token; never shown.
            KeySource::Command(_) => f.write_str("KeySource::Command(<redacted>)"),
        }
    }
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "key file {}", p.display()),
            KeySource::Command(_) => f.write_str("key command"),
        }
    }
}

/// Why a key could not be had, or does not open the repository.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {source_name}: {error}")]
    Read {
        source_name: String,
        error: std::io::Error,
    },
    #[error("the key command failed: {0}")]
    Command(String),
    #[error("{0} is empty")]
    Empty(String),
    #[error("{0} gives more than {MAX_KEY_SOURCE_LEN} bytes: not a key or passphrase")]
    TooLong(String),
    #[error(
        "{0} gives a passphrase shorter than {MIN_PASSPHRASE_LEN} characters: use a longer one, or a 256-bit key (`openssl rand -hex 32`)"
    )]
    WeakPassphrase(String),
    #[error(
        "the {0} does not open this repository: wrong key (or the repository was rekeyed to another one)"
    )]
    Wrong(String),
    #[error(
        "the {0} gives a passphrase, but this repository's key is a 256-bit key (64 hex digits): wrong key source"
    )]
    NotRaw(String),
    #[error("walvault.json's encryption record is not valid: {0}")]
    BadRecord(String),
}

/// What a key source gives: a 256-bit key or a passphrase.
enum Material {
    /// The key, and the text it was read from (a record may say that text is a passphrase).
    Raw(Zeroizing<[u8; 32]>, Zeroizing<Vec<u8>>),
    Passphrase(Zeroizing<Vec<u8>>),
}

impl Material {
    /// 64 hex digits are a key; anything else a passphrase. Trailing line ends are dropped
    /// (`openssl rand -hex 32 > file` writes one).
    fn classify(mut bytes: Zeroizing<Vec<u8>>, what: &str) -> Result<Material, KeyError> {
        while matches!(bytes.last(), Some(b'\n' | b'\r')) {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(KeyError::Empty(what.to_string()));
        }
        if bytes.len() == 64 && bytes.iter().all(u8::is_ascii_hexdigit) {
            let mut key = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(&bytes[..], &mut key[..]).expect("64 hex digits");
            return Ok(Material::Raw(key, bytes));
        }
        Ok(Material::Passphrase(bytes))
    }
}

impl KeySource {
    /// Read the key or passphrase: the file's content, or the command's standard output.
    fn material(&self) -> Result<Material, KeyError> {
        let what = self.to_string();
        let bytes = match self {
            KeySource::File(path) => {
                let bytes = std::fs::read(path).map_err(|error| KeyError::Read {
                    source_name: what.clone(),
                    error,
                })?;
                Zeroizing::new(bytes)
            }
            KeySource::Command(cmd) => run_key_command(cmd)?,
        };
        if bytes.len() > MAX_KEY_SOURCE_LEN {
            return Err(KeyError::TooLong(what));
        }
        Material::classify(bytes, &what)
    }
}

/// Run `cmd` with `sh -c`, no standard input, its standard error passed through (PostgreSQL's
/// log, where the command's own diagnostics belong), for at most [`KEY_COMMAND_TIMEOUT`].
fn run_key_command(cmd: &str) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| KeyError::Command(format!("cannot start sh: {e}")))?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    // Read on a thread so a command that never exits (or never closes its output) is bounded.
    let reader = std::thread::spawn(move || {
        let mut out = Zeroizing::new(Vec::new());
        let r = (&mut stdout)
            .take(MAX_KEY_SOURCE_LEN as u64 + 1)
            .read_to_end(&mut out);
        r.map(|_| out)
    });
    let deadline = std::time::Instant::now() + KEY_COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(KeyError::Command(format!(
                    "still running after {}s; killed",
                    KEY_COMMAND_TIMEOUT.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(KeyError::Command(e.to_string())),
        }
    };
    if !status.success() {
        return Err(KeyError::Command(match status.code() {
            Some(code) => format!("it exited with status {code}"),
            None => "it was killed by a signal".to_string(),
        }));
    }
    match reader.join() {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(KeyError::Command(format!("cannot read its output: {e}"))),
        Err(_) => Err(KeyError::Command("its output reader panicked".into())),
    }
}

/// How the KEK is derived from the key source's material.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kdf {
    /// The source gives a 256-bit key: KEK = blake3 derive_key(key ‖ salt).
    Raw,
    /// The source gives a passphrase: KEK = Argon2id(passphrase, salt, the record's costs).
    Argon2id,
}

/// Argon2id costs, recorded so they can be raised for new wraps without breaking old ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Argon2Params {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

/// The master key, wrapped: the `key` of `walvault.json`'s `encryption` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedKey {
    pub kdf: Kdf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argon2: Option<Argon2Params>,
    /// 32 random bytes, hex.
    pub salt: String,
    /// The XChaCha20-Poly1305 nonce, 24 random bytes, hex.
    pub nonce: String,
    /// The master key sealed under the KEK with the repository id as associated data: 48 bytes
    /// (32 of key, 16 of tag), hex.
    pub wrapped: String,
}

/// `walvault.json`'s `encryption` record (descriptor version 3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionRecord {
    /// Always [`CIPHER`].
    pub cipher: String,
    /// Always [`CHUNK_IDS`].
    pub chunk_ids: String,
    pub key: WrappedKey,
    /// When the key was last wrapped (init or rekey), for people; never interpreted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped_at: Option<String>,
}

impl EncryptionRecord {
    pub fn validate(&self) -> Result<(), KeyError> {
        let bad = |m: &str| Err(KeyError::BadRecord(m.to_string()));
        if self.cipher != CIPHER {
            return bad(&format!(
                "unknown cipher {:?} (this walvault knows {CIPHER})",
                self.cipher
            ));
        }
        if self.chunk_ids != CHUNK_IDS {
            return bad(&format!("unknown chunk id scheme {:?}", self.chunk_ids));
        }
        let k = &self.key;
        let hex_len = |s: &str, n: usize| s.len() == 2 * n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_len(&k.salt, 32) || !hex_len(&k.nonce, 24) || !hex_len(&k.wrapped, 48) {
            return bad("salt, nonce or wrapped key has the wrong length");
        }
        match (k.kdf, k.argon2) {
            (Kdf::Raw, None) => Ok(()),
            (Kdf::Argon2id, Some(p))
                if (8..=4 << 20).contains(&p.m_kib) && (1..=64).contains(&p.t) && (1..=16).contains(&p.p) =>
            {
                Ok(())
            }
            (Kdf::Argon2id, _) => bad("argon2id needs costs within m_kib 8..4194304, t 1..64, p 1..16"),
            (Kdf::Raw, Some(_)) => bad("a raw key has no argon2 costs"),
        }
    }
}

/// The master key, in memory only.
struct MasterKey(Zeroizing<[u8; 32]>);

fn kek(
    material: &Material,
    kdf: Kdf,
    argon2: Option<Argon2Params>,
    salt: &[u8; 32],
    what: &str,
) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    match (kdf, material) {
        (Kdf::Raw, Material::Raw(key, _)) => {
            let mut h = blake3::Hasher::new_derive_key(DERIVE_RAW_KEK);
            h.update(&key[..]);
            h.update(salt);
            Ok(Zeroizing::new(*h.finalize().as_bytes()))
        }
        (Kdf::Raw, Material::Passphrase(_)) => Err(KeyError::NotRaw(what.to_string())),
        (Kdf::Argon2id, m) => {
            // A passphrase may happen to be 64 hex digits: the record says it is one.
            let (Material::Raw(_, pass) | Material::Passphrase(pass)) = m;
            let p = argon2.expect("validated: argon2id records have costs");
            let params = argon2::Params::new(p.m_kib, p.t, p.p, Some(32))
                .map_err(|e| KeyError::BadRecord(format!("argon2 costs: {e}")))?;
            let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
            let mut out = Zeroizing::new([0u8; 32]);
            a.hash_password_into(pass, salt, &mut out[..])
                .map_err(|e| KeyError::BadRecord(format!("argon2: {e}")))?;
            Ok(out)
        }
    }
}

fn wrap_aad(repo: &RepoId, kdf: Kdf) -> Vec<u8> {
    let mut aad = WRAP_AAD.to_vec();
    aad.extend_from_slice(repo.as_str().as_bytes());
    aad.push(0);
    aad.extend_from_slice(match kdf {
        Kdf::Raw => b"raw",
        Kdf::Argon2id => b"argon2id",
    });
    aad
}

fn unhex<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).expect("validated lengths");
    out
}

impl MasterKey {
    fn wrap(
        &self,
        source: &KeySource,
        repo: &RepoId,
        now: Option<String>,
    ) -> Result<EncryptionRecord, KeyError> {
        let what = source.to_string();
        let material = source.material()?;
        let (kdf, argon2) = match &material {
            Material::Raw(..) => (Kdf::Raw, None),
            Material::Passphrase(p) if p.len() < MIN_PASSPHRASE_LEN => {
                return Err(KeyError::WeakPassphrase(what));
            }
            Material::Passphrase(_) => (
                Kdf::Argon2id,
                Some(Argon2Params {
                    m_kib: ARGON2_M_KIB,
                    t: ARGON2_T,
                    p: ARGON2_P,
                }),
            ),
        };
        let salt: [u8; 32] = rand::random();
        let nonce: [u8; 24] = rand::random();
        let kek = kek(&material, kdf, argon2, &salt, &what)?;
        let cipher = XChaCha20Poly1305::new((&*kek).into());
        let wrapped = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &self.0[..],
                    aad: &wrap_aad(repo, kdf),
                },
            )
            .expect("sealing 32 bytes cannot fail");
        Ok(EncryptionRecord {
            cipher: CIPHER.into(),
            chunk_ids: CHUNK_IDS.into(),
            key: WrappedKey {
                kdf,
                argon2,
                salt: hex::encode(salt),
                nonce: hex::encode(nonce),
                wrapped: hex::encode(wrapped),
            },
            wrapped_at: now,
        })
    }

    fn unwrap(record: &EncryptionRecord, source: &KeySource, repo: &RepoId) -> Result<MasterKey, KeyError> {
        record.validate()?;
        let what = source.to_string();
        let material = source.material()?;
        let k = &record.key;
        let kek = kek(&material, k.kdf, k.argon2, &unhex::<32>(&k.salt), &what)?;
        let cipher = XChaCha20Poly1305::new((&*kek).into());
        let wrapped = hex::decode(&k.wrapped).expect("validated");
        let key = cipher
            .decrypt(
                XNonce::from_slice(&unhex::<24>(&k.nonce)),
                Payload {
                    msg: &wrapped,
                    aad: &wrap_aad(repo, k.kdf),
                },
            )
            .map_err(|_| KeyError::Wrong(what))?;
        let key = Zeroizing::new(key);
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&key);
        Ok(MasterKey(out))
    }
}

/// An encrypted repository's keys, once unwrapped: what seals and opens its objects
/// ([`super::object::Sealer`]) and rewraps its master key.
pub struct RepoKeys {
    master: MasterKey,
    pub(super) cipher: XChaCha20Poly1305,
    pub(super) id_key: Zeroizing<[u8; 32]>,
    pub(super) repo_id: RepoId,
}

impl std::fmt::Debug for RepoKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepoKeys({}, <redacted>)", self.repo_id)
    }
}

impl RepoKeys {
    fn from_master(master: MasterKey, repo_id: RepoId) -> RepoKeys {
        let object_key = Zeroizing::new(blake3::derive_key(DERIVE_OBJECT_KEY, &master.0[..]));
        let id_key = Zeroizing::new(blake3::derive_key(DERIVE_ID_KEY, &master.0[..]));
        RepoKeys {
            master,
            cipher: XChaCha20Poly1305::new((&*object_key).into()),
            id_key,
            repo_id,
        }
    }

    /// A new repository's keys: a random master key, wrapped under `source`'s KEK.
    pub fn generate(
        source: &KeySource,
        repo_id: &RepoId,
        now: Option<String>,
    ) -> Result<(Arc<RepoKeys>, EncryptionRecord), KeyError> {
        let master = MasterKey(Zeroizing::new(rand::random()));
        let record = master.wrap(source, repo_id, now)?;
        Ok((Arc::new(RepoKeys::from_master(master, repo_id.clone())), record))
    }

    /// Unwrap the master key of the repository `repo_id` with `source`'s KEK.
    pub fn open(
        record: &EncryptionRecord,
        source: &KeySource,
        repo_id: &RepoId,
    ) -> Result<Arc<RepoKeys>, KeyError> {
        let master = MasterKey::unwrap(record, source, repo_id)?;
        Ok(Arc::new(RepoKeys::from_master(master, repo_id.clone())))
    }

    /// The same master key wrapped under `new_source`'s KEK (`archive-agent rekey`).
    pub fn rewrap(&self, new_source: &KeySource, now: Option<String>) -> Result<EncryptionRecord, KeyError> {
        self.master.wrap(new_source, &self.repo_id, now)
    }

    /// The keyed blake3 of `content`: chunk ids and the content hash in object headers.
    pub fn content_hash(&self, content: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.id_key, content).as_bytes()
    }

    /// [`RepoKeys::content_hash`] of content fed in pieces.
    pub(crate) fn content_hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.id_key)
    }
}

/// Keys for tests: an encrypted repository's sealer.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// The sealer of a new encrypted repository with id `repo` (a key file of 32 bytes).
    pub(crate) fn sealer(repo: &str) -> crate::repo::object::Sealer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "ab".repeat(32)).unwrap();
        let id = RepoId::try_from(repo.to_string()).unwrap();
        let keys = RepoKeys::generate(&KeySource::File(path), &id, None).unwrap().0;
        crate::repo::object::Sealer::encrypted(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &tempfile::TempDir, name: &str, content: &str) -> KeySource {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        KeySource::File(p)
    }

    fn repo() -> RepoId {
        RepoId::try_from("0123456789abcdef0123456789abcdef".to_string()).unwrap()
    }

    #[test]
    fn raw_keys_and_passphrases_wrap_and_unwrap() {
        let dir = tempfile::tempdir().unwrap();
        let raw = file(&dir, "raw", &format!("{}\n", "ab".repeat(32)));
        let pass = file(&dir, "pass", "correct horse battery staple\n");
        let (keys, record) = RepoKeys::generate(&raw, &repo(), None).unwrap();
        assert_eq!(record.key.kdf, Kdf::Raw);
        let again = RepoKeys::open(&record, &raw, &repo()).unwrap();
        assert_eq!(again.content_hash(b"x"), keys.content_hash(b"x"));
        assert_ne!(keys.content_hash(b"x"), *blake3::hash(b"x").as_bytes());

        let rewrapped = keys.rewrap(&pass, None).unwrap();
        assert_eq!(rewrapped.key.kdf, Kdf::Argon2id);
        let by_pass = RepoKeys::open(&rewrapped, &pass, &repo()).unwrap();
        assert_eq!(by_pass.content_hash(b"x"), keys.content_hash(b"x"));
        // The old key does not open the new record, nor the new key the old one.
        assert!(matches!(
            RepoKeys::open(&rewrapped, &raw, &repo()),
            Err(KeyError::Wrong(_))
        ));
        assert!(matches!(
            RepoKeys::open(&record, &pass, &repo()),
            Err(KeyError::NotRaw(_))
        ));
        // Another repository's id: the wrap is bound to it.
        let other = RepoId::try_from("fedcba9876543210fedcba9876543210".to_string()).unwrap();
        assert!(matches!(
            RepoKeys::open(&record, &raw, &other),
            Err(KeyError::Wrong(_))
        ));
        let wrong = file(&dir, "wrong", &"cd".repeat(32));
        assert!(matches!(
            RepoKeys::open(&record, &wrong, &repo()),
            Err(KeyError::Wrong(_))
        ));
    }

    #[test]
    fn bad_sources_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let short = file(&dir, "short", "hunter2\n");
        assert!(matches!(
            RepoKeys::generate(&short, &repo(), None),
            Err(KeyError::WeakPassphrase(_))
        ));
        let empty = file(&dir, "empty", "\n");
        assert!(matches!(
            RepoKeys::generate(&empty, &repo(), None),
            Err(KeyError::Empty(_))
        ));
        let missing = KeySource::File(dir.path().join("nope"));
        assert!(matches!(
            RepoKeys::generate(&missing, &repo(), None),
            Err(KeyError::Read { .. })
        ));
        let failing = KeySource::Command("echo oops >&2; exit 3".into());
        let e = RepoKeys::generate(&failing, &repo(), None).unwrap_err();
        assert!(e.to_string().contains("status 3"), "{e}");
        let cmd = KeySource::Command(format!("printf %s {}", "ef".repeat(32)));
        let (_, record) = RepoKeys::generate(&cmd, &repo(), None).unwrap();
        assert_eq!(record.key.kdf, Kdf::Raw);
        assert!(!format!("{cmd:?}").contains("printf"));
    }

    #[test]
    fn damaged_records_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let raw = file(&dir, "raw", &"ab".repeat(32));
        let (_, record) = RepoKeys::generate(&raw, &repo(), None).unwrap();
        let mut r = record.clone();
        r.cipher = "rot13".into();
        assert!(matches!(
            RepoKeys::open(&r, &raw, &repo()),
            Err(KeyError::BadRecord(_))
        ));
        let mut r = record.clone();
        r.key.wrapped.truncate(10);
        assert!(matches!(
            RepoKeys::open(&r, &raw, &repo()),
            Err(KeyError::BadRecord(_))
        ));
        let mut r = record;
        r.key.wrapped.replace_range(
            0..2,
            if r.key.wrapped.starts_with("00") {
                "01"
            } else {
                "00"
            },
        );
        assert!(matches!(
            RepoKeys::open(&r, &raw, &repo()),
            Err(KeyError::Wrong(_))
        ));
    }
}
