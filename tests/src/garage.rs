//! Garage, a real S3-compatible server, run by the harness on loopback ports: a throwaway layout,
//! access key and bucket per [`Garage`], stopped when the value goes away (or, for the one shared
//! by a test process, when that process ends).
//!
//! Garage ignores `If-None-Match: *`, like several S3-compatible stores, which is exactly what the
//! push rules must survive. The binary comes from `cargo install --locked garage@2.5.0`
//! (`scripts/ensure-deps.sh` installs it into the cargo home when missing); `WALVAULT_GARAGE`
//! names another one.

use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::Rng;

use crate::cluster::pick_port;
use crate::host::{self, ScratchDir};

/// The S3 region Garage is configured with.
pub const REGION: &str = "garage";
/// The bucket every [`Garage`] creates.
pub const BUCKET: &str = "walvault-test";
/// How long a node may take to answer after it was started.
const START_LIMIT: Duration = Duration::from_secs(60);

/// The `garage` binary: `WALVAULT_GARAGE`, else `$CARGO_HOME/bin/garage`, else `~/.cargo/bin`.
pub fn garage_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WALVAULT_GARAGE") {
        return Ok(PathBuf::from(p));
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(bin) = cargo_home.map(|h| h.join("bin").join("garage"))
        && bin.is_file()
    {
        return Ok(bin);
    }
    bail!(
        "garage not found: run scripts/ensure-deps.sh (it runs `cargo install --locked garage@2.5.0`), \
         or set WALVAULT_GARAGE"
    )
}

/// One Garage server process.
#[derive(Debug)]
struct Node {
    config: PathBuf,
    s3_port: u16,
    rpc_port: u16,
    child: Option<Child>,
}

/// A Garage cluster of one or more nodes on loopback, with one access key and one bucket.
#[derive(Debug)]
pub struct Garage {
    nodes: Vec<Node>,
    key_id: String,
    secret: String,
    _scratch: ScratchDir,
}

impl Garage {
    /// The Garage shared by every repository of this test process, started on first use.
    pub fn shared() -> &'static Garage {
        static SHARED: OnceLock<Garage> = OnceLock::new();
        SHARED.get_or_init(|| Garage::start(1).unwrap_or_else(|e| panic!("starting Garage: {e:#}")))
    }

    /// A fresh cluster of `nodes` nodes with replication factor `nodes` (1 or 3).
    pub fn start(nodes: usize) -> Result<Garage> {
        let bin = garage_bin()?;
        let scratch = ScratchDir::new("garage")?;
        let mut rng = rand::rng();
        let rpc_secret: String = (0..32).fold(String::new(), |mut s, _| {
            let _ = write!(s, "{:02x}", rng.random::<u8>());
            s
        });
        let mut garage = Garage {
            nodes: Vec::new(),
            key_id: format!("GK{}", &hex24(&mut rng)),
            secret: (0..32).fold(String::new(), |mut s, _| {
                let _ = write!(s, "{:02x}", rng.random::<u8>());
                s
            }),
            _scratch: scratch,
        };
        for i in 0..nodes {
            let dir = garage._scratch.subdir(&format!("node{i}"))?;
            let (s3_port, rpc_port, admin_port) = (pick_port()?, pick_port()?, pick_port()?);
            let config = dir.join("garage.toml");
            let text = format!(
                "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = {nodes}\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\nrpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_secret = \"{rpc_secret}\"\n\n[s3_api]\ns3_region = \"{REGION}\"\n\
                 api_bind_addr = \"127.0.0.1:{s3_port}\"\nroot_domain = \".s3.garage.localhost\"\n\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin_port}\"\n",
                meta = dir.join("meta").display(),
                data = dir.join("data").display(),
            );
            fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
            host::set_mode(&config, 0o600)?;
            garage.nodes.push(Node {
                config,
                s3_port,
                rpc_port,
                child: None,
            });
        }
        for i in 0..nodes {
            garage.start_node(i)?;
        }
        garage.configure(&bin)?;
        Ok(garage)
    }

    fn configure(&self, bin: &Path) -> Result<()> {
        let ids: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                let out = self.cli_on(bin, n, &["node", "id", "-q"])?;
                Ok(out.trim().to_string())
            })
            .collect::<Result<_>>()?;
        for id in ids.iter().skip(1) {
            self.cli(bin, &["node", "connect", id])?;
        }
        for (i, id) in ids.iter().enumerate() {
            let short = id.split('@').next().unwrap_or(id);
            self.cli(
                bin,
                &["layout", "assign", "-z", &format!("dc{i}"), "-c", "1G", short],
            )?;
        }
        self.cli(bin, &["layout", "apply", "--version", "1"])?;
        self.cli(
            bin,
            &[
                "key",
                "import",
                "--yes",
                "-n",
                "walvault",
                &self.key_id,
                &self.secret,
            ],
        )?;
        // The layout takes a moment to reach every node: retry bucket creation until it does.
        let started = Instant::now();
        loop {
            match self.cli(bin, &["bucket", "create", BUCKET]) {
                Ok(_) => break,
                Err(e) if started.elapsed() > START_LIMIT => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        self.cli(
            bin,
            &[
                "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "walvault",
            ],
        )?;
        Ok(())
    }

    fn cli(&self, bin: &Path, args: &[&str]) -> Result<String> {
        self.cli_on(bin, &self.nodes[0], args)
    }

    fn cli_on(&self, bin: &Path, node: &Node, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&node.config).args(args);
        host::run(&mut cmd, Duration::from_secs(30))?
            .check()
            .map(|f| f.stdout)
    }

    /// Start node `i` (again), on the same ports and data, and wait until it answers S3 requests.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        let bin = garage_bin()?;
        let node = &mut self.nodes[i];
        if node.child.is_some() {
            return Ok(());
        }
        let log_path = node.config.with_file_name("garage.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        host::kill_with_this_process(child.id());
        node.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", node.s3_port)).is_err()
            || TcpStream::connect(("127.0.0.1", node.rpc_port)).is_err()
        {
            if started.elapsed() > START_LIMIT {
                bail!(
                    "garage node {i} did not listen within {START_LIMIT:?}:\n{}",
                    host::tail(&fs::read_to_string(&log_path).unwrap_or_default(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Kill node `i` (SIGKILL: a crash, not a shutdown).
    pub fn stop_node(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.kill().context("killing garage")?;
            child.wait().context("reaping garage")?;
        }
        Ok(())
    }

    /// The S3 endpoint of node 0, where clients send requests.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.nodes[0].s3_port)
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The `AWS_*` environment a client needs, by the usual conventions.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
    }

    /// The `[s3]` table of a walvault configuration file for this Garage.
    pub fn config_toml(&self) -> String {
        format!(
            "[s3]\nendpoint = \"{}\"\nregion = \"{REGION}\"\naccess_key_id = \"{}\"\n\
             secret_access_key = \"{}\"\nallow_http = true\n",
            self.endpoint(),
            self.key_id,
            self.secret
        )
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.stop_node(i);
        }
    }
}

fn hex24(rng: &mut impl Rng) -> String {
    (0..12).fold(String::new(), |mut s, _| {
        let _ = write!(s, "{:02x}", rng.random::<u8>());
        s
    })
}
