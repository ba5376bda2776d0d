//! Azurite, Microsoft's Azure Storage emulator, run by the harness on a loopback port: one blob
//! service per test process with one container, stopped when that process ends.
//!
//! The binary comes from npm (`scripts/ensure-deps.sh` runs `npm install --prefix
//! ~/.cache/walvault/azurite azurite@3` when it is missing); `WALVAULT_AZURITE` names another
//! `azurite-blob`. Azurite serves the well-known development account only, path style:
//! `http://127.0.0.1:<port>/devstoreaccount1/<container>/<blob>`.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{KeyInit, Mac};

use crate::cluster::pick_port;
use crate::host::{self, ScratchDir};

/// Azurite's development account (documented, the same on every installation).
pub const ACCOUNT: &str = "devstoreaccount1";
/// Its documented shared key.
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The container every [`Azurite`] creates.
pub const CONTAINER: &str = "walvault-test";
/// How long Azurite may take to listen after it was started.
const START_LIMIT: Duration = Duration::from_secs(60);
/// The blob service REST API version the container is created with.
const API_VERSION: &str = "2021-08-06";

/// The `azurite-blob` script: `WALVAULT_AZURITE`, else where `scripts/ensure-deps.sh` installs it
/// (`${XDG_CACHE_HOME:-$HOME/.cache}/walvault/azurite`).
pub fn azurite_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WALVAULT_AZURITE") {
        return Ok(PathBuf::from(p));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(bin) = cache.map(|c| c.join("walvault/azurite/node_modules/.bin/azurite-blob"))
        && bin.is_file()
    {
        return Ok(bin);
    }
    bail!(
        "azurite not found: run scripts/ensure-deps.sh (it runs `npm install --prefix \
         ~/.cache/walvault/azurite azurite@3`), or set WALVAULT_AZURITE to an azurite-blob script"
    )
}

/// One Azurite blob service with [`CONTAINER`] created.
#[derive(Debug)]
pub struct Azurite {
    port: u16,
    child: Child,
    _scratch: ScratchDir,
}

impl Azurite {
    /// The Azurite shared by every repository of this test process, started on first use.
    pub fn shared() -> &'static Azurite {
        static SHARED: OnceLock<Azurite> = OnceLock::new();
        SHARED.get_or_init(|| Azurite::start().unwrap_or_else(|e| panic!("starting Azurite: {e:#}")))
    }

    /// A fresh blob service on a free loopback port, data in a scratch directory.
    pub fn start() -> Result<Azurite> {
        let bin = azurite_bin()?;
        let scratch = ScratchDir::new("azurite")?;
        let data = scratch.subdir("data")?;
        let port = pick_port()?;
        let log_path = scratch.path().join("azurite.log");
        let log = fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(&bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(&data)
            .args([
                "--skipApiVersionCheck",
                "--loose",
                "--disableTelemetry",
                "--silent",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        host::kill_with_this_process(child.id());
        let mut azurite = Azurite {
            port,
            child,
            _scratch: scratch,
        };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = azurite.child.try_wait()? {
                bail!(
                    "azurite exited with {status}:\n{}",
                    host::tail(&fs::read_to_string(&log_path).unwrap_or_default(), 30)
                );
            }
            if started.elapsed() > START_LIMIT {
                bail!(
                    "azurite did not listen within {START_LIMIT:?}:\n{}",
                    host::tail(&fs::read_to_string(&log_path).unwrap_or_default(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        azurite.create_container(CONTAINER)?;
        Ok(azurite)
    }

    /// The blob service URL of the development account, as `endpoint` in `[azure]`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// The server's address, without the account: what a closed port replaces to cut it off.
    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `[azure]` table of a walvault configuration file for this Azurite.
    pub fn config_toml(&self) -> String {
        format!(
            "[azure]\nendpoint = \"{}\"\naccount = \"{ACCOUNT}\"\naccess_key = \"{ACCOUNT_KEY}\"\n\
             allow_http = true\n",
            self.endpoint()
        )
    }

    /// Create a container (object_store cannot): `PUT /<account>/<name>?restype=container`,
    /// signed with the account's shared key. One that already exists is fine.
    pub fn create_container(&self, name: &str) -> Result<()> {
        let date = http_date(SystemTime::now());
        let path = format!("/{ACCOUNT}/{name}");
        // Shared Key: verb, eleven standard headers (all empty here; a zero Content-Length is
        // signed as empty), the x-ms-* headers sorted, then /<account><path> and the query.
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{API_VERSION}\n\
             /{ACCOUNT}{path}\nrestype:container"
        );
        let key = BASE64.decode(ACCOUNT_KEY).context("decoding the account key")?;
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).map_err(|e| anyhow::anyhow!("HMAC key: {e}"))?;
        mac.update(to_sign.as_bytes());
        let signature = BASE64.encode(mac.finalize().into_bytes());
        let request = format!(
            "PUT {path}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             x-ms-date: {date}\r\nx-ms-version: {API_VERSION}\r\n\
             Authorization: SharedKey {ACCOUNT}:{signature}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            port = self.port
        );
        let mut conn = TcpStream::connect(("127.0.0.1", self.port)).context("connecting to azurite")?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        conn.write_all(request.as_bytes())?;
        let mut response = String::new();
        conn.read_to_string(&mut response)
            .context("reading azurite's answer")?;
        let status = response.split_whitespace().nth(1).unwrap_or_default();
        match status {
            "201" => Ok(()),
            "409" if response.contains("ContainerAlreadyExists") => Ok(()),
            _ => bail!("creating container {name}: {}", host::tail(&response, 20)),
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An RFC 1123 date (`Sat, 21 Nov 2026 14:28:04 GMT`), as `x-ms-date` wants it.
fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    // Days to civil date (Howard Hinnant's algorithm), for dates after 1970.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!("{weekday}, {day:02} {month} {year} {h:02}:{m:02}:{s:02} GMT")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::StoreKind;
    use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
    use walvault::config::{AzureSettings, Secret};
    use walvault::repo::store::PutNew;
    use walvault::repo::{StoreOptions, WritableStore};

    /// The evidence behind docs/STORES.md: Azure (here Azurite) refuses a second create-only put,
    /// and objects above the multipart threshold go up as block lists and read back whole. Runs
    /// with `WALVAULT_TEST_STORE=azure` only, so other passes need no Azurite.
    #[test]
    fn second_create_is_refused_and_large_objects_go_up_in_blocks() {
        if StoreKind::from_env() != StoreKind::Azure {
            return;
        }
        let azurite = Azurite::shared();
        let prefix = format!("unit-{}", std::process::id());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let raw = object_store::azure::MicrosoftAzureBuilder::new()
            .with_container_name(CONTAINER)
            .with_account(ACCOUNT)
            .with_access_key(ACCOUNT_KEY)
            .with_endpoint(azurite.endpoint())
            .with_allow_http(true)
            .build()
            .unwrap();
        let path = object_store::path::Path::from(format!("{prefix}/raw"));
        let create = || PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        rt.block_on(async {
            raw.put_opts(&path, PutPayload::from_static(b"one"), create())
                .await
                .unwrap();
            let again = raw
                .put_opts(&path, PutPayload::from_static(b"two"), create())
                .await;
            assert!(
                matches!(again, Err(object_store::Error::AlreadyExists { .. })),
                "{again:?}"
            );
            let kept = raw.get(&path).await.unwrap().bytes().await.unwrap();
            assert_eq!(&kept[..], b"one");
        });

        let url = format!("az://{CONTAINER}/{prefix}/repo").parse().unwrap();
        let options = StoreOptions {
            retry_timeout: Duration::from_secs(5),
            azure: AzureSettings {
                account: Some(ACCOUNT.into()),
                access_key: Some(Secret::new(ACCOUNT_KEY)),
                endpoint: Some(azurite.endpoint()),
                allow_http: Some(true),
                ..Default::default()
            },
            ..Default::default()
        };
        let store = WritableStore::open(&url, &options).unwrap();
        let big: Vec<u8> = (0..walvault::repo::store::MULTIPART_THRESHOLD + 5_000_000)
            .map(|i| (i % 251) as u8)
            .collect();
        rt.block_on(async {
            assert_eq!(
                store.put_new("a/small", b"one".to_vec().into()).await.unwrap(),
                PutNew::Created
            );
            assert_eq!(
                store.put_new("a/small", b"two".to_vec().into()).await.unwrap(),
                PutNew::AlreadyExists
            );
            store.put("a/big", big.clone().into()).await.unwrap();
            let back = store.get("a/big").await.unwrap().unwrap();
            assert!(back[..] == big[..], "the multipart object reads back whole");
            assert_eq!(
                store.list("a/").await.unwrap(),
                vec![
                    ("a/big".to_string(), big.len() as u64),
                    ("a/small".to_string(), 3)
                ]
            );
        });
    }

    #[test]
    fn http_dates() {
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_271_284);
        assert_eq!(http_date(t), "Sat, 21 Nov 2026 14:28:04 GMT");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(http_date(leap), "Tue, 29 Feb 2000 00:00:00 GMT");
    }
}
