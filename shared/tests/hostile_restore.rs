//! A repository crafted to attack a restore: someone who can write to the bucket but not to the
//! database host writes a manifest (`backups/<id>/manifest.wvo`, sealed like every object) meant
//! to make restore write outside the target directory, create special files, or allocate and
//! write without bound. Each test builds a real `file://` repository with the library's own
//! sealing, runs the library's restore into a fresh target, and checks that the restore is
//! refused with a message naming the backup and the cause, that the target directory was never
//! created, and that nothing appeared next to it (a sentinel directory stays empty).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};
use walvault::basebackup::chunk::chunk_id;
use walvault::commands::restore::{
    self, NoProgress, RestoreError, RestoreOptions, RestoreReport, TablespacePlacement,
};
use walvault::config::{RepoArgs, Settings};
use walvault::repo::layout::chunk_key;
use walvault::repo::layout::wal_key;
use walvault::repo::object::{ObjectKind, SealedObject};
use walvault::repo::{ClusterIdentity, RepoDescriptor};
use walvault::wal::WalFileName;
use walvault::wal::page::synthetic_segment;

const SEG: u32 = 1 << 20;
const SYSID: u64 = 7_441_000_000_000_000_042;
const ID: &str = "20261121T143200Z";
const FILE: &[u8] = &[7u8; 8192];

struct Env {
    dir: tempfile::TempDir,
    settings: Settings,
}

impl Env {
    /// A repository with a descriptor and the WAL the backup needs (segments 1 and 2 of
    /// timeline 1), one chunk, and no manifest yet.
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings::resolve(
            &RepoArgs {
                repo: Some(format!("file://{}/repo", dir.path().display())),
                ..Default::default()
            },
            None,
            Default::default(),
            &dir.path().join("no-config.toml"),
        )
        .unwrap();
        let env = Env { dir, settings };
        let descriptor = RepoDescriptor::new(
            Some(ClusterIdentity {
                system_identifier: SYSID,
                wal_segment_size: SEG,
                wal_block_size: 8192,
                pg_version: 15,
            }),
            0,
        );
        env.put("walvault.json", &descriptor.to_json());
        for name in ["000000010000000000000001", "000000010000000000000002"] {
            let wal: WalFileName = name.parse().unwrap();
            let WalFileName::Segment(seg) = &wal else { panic!() };
            let sealed =
                SealedObject::seal(ObjectKind::WalFile, name, &synthetic_segment(seg, SYSID, SEG), 1)
                    .unwrap();
            env.put(&wal_key(&wal), &sealed.bytes);
        }
        let id = chunk_id(&walvault::repo::object::Sealer::plain(), FILE);
        env.put(
            &chunk_key(&id),
            &SealedObject::seal(ObjectKind::Chunk, &id.to_string(), FILE, 1)
                .unwrap()
                .bytes,
        );
        std::fs::create_dir(env.outside()).unwrap();
        env
    }

    fn put(&self, key: &str, bytes: &[u8]) {
        let path = self.dir.path().join("repo").join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// Where restores go; never created beforehand.
    fn target(&self) -> PathBuf {
        self.dir.path().join("target")
    }

    /// A sentinel next to the target: hostile paths aim here.
    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    /// A well-formed manifest, as JSON to tamper with.
    fn manifest(&self) -> Value {
        json!({
            "format": "walvault-backup-manifest",
            "version": 1,
            "id": ID,
            "system_identifier": SYSID.to_string(),
            "pg_version": 15,
            "timeline": 1,
            "start_lsn": "0/100028",
            "stop_lsn": "0/100100",
            "start_time_us": 1_795_271_520_000_000i64,
            "stop_time_us": 1_795_271_530_000_000i64,
            "start_wal": "000000010000000000000001",
            "stop_wal": "000000010000000000000001",
            "chunk_size": 1 << 20,
            "backup_label": "START WAL LOCATION: 0/100028 (file 000000010000000000000001)\nSTART TIMELINE: 1\n",
            "tablespaces": [],
            "entries": [
                { "path": "base", "kind": "dir", "mode": 0o700 },
                { "path": "base/1", "kind": "dir", "mode": 0o700 },
                { "path": "base/1/1259", "kind": "file", "mode": 0o600, "size": FILE.len(), "chunks": [chunk_id(&walvault::repo::object::Sealer::plain(), FILE)] },
            ],
            "stats": { "logical_bytes": 8192, "files": 1, "chunks": 1, "new_chunks": 1, "new_bytes": 0, "stored_bytes": 0 }
        })
    }

    /// Seal `manifest` as backup `ID` and store it where restore reads it.
    fn put_manifest(&self, manifest: &Value) {
        let json = serde_json::to_vec(manifest).unwrap();
        let sealed = SealedObject::seal(ObjectKind::Manifest, ID, &json, 1).unwrap();
        self.put(&format!("backups/{ID}/manifest.wvo"), &sealed.bytes);
    }

    async fn restore_with(&self, tablespaces: TablespacePlacement) -> Result<RestoreReport, RestoreError> {
        let opts = RestoreOptions {
            parallel: 4,
            tablespaces,
            ..RestoreOptions::new(self.target(), "restore-agent fetch %f %p")
        };
        restore::restore(&self.settings, &opts, Arc::new(NoProgress)).await
    }

    /// Store `manifest`, restore, and return the refusal after checking that nothing was
    /// written: no target, an empty sentinel, nothing else beside them.
    async fn refused(&self, manifest: &Value, tablespaces: TablespacePlacement, cause: &str) -> String {
        self.put_manifest(manifest);
        let err = match self.restore_with(tablespaces).await {
            Ok(r) => panic!("restored {} files of a hostile manifest", r.files),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(ID), "the message names the backup: {err}");
        assert!(
            err.contains(cause),
            "the message names the cause {cause:?}: {err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
        self.assert_untouched();
        err
    }

    fn assert_untouched(&self) {
        assert!(!self.target().exists(), "the target directory was created");
        let outside: Vec<_> = std::fs::read_dir(self.outside()).unwrap().collect();
        assert!(outside.is_empty(), "written outside the target: {outside:?}");
        let beside: BTreeSet<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            beside,
            BTreeSet::from(["outside".to_string(), "repo".to_string()]),
            "something was created next to the target"
        );
    }
}

fn entry(path: &str, kind: &str, mode: u32) -> Value {
    json!({ "path": path, "kind": kind, "mode": mode })
}

fn file_entry(path: &str) -> Value {
    json!({ "path": path, "kind": "file", "mode": 0o600, "size": FILE.len(), "chunks": [chunk_id(&walvault::repo::object::Sealer::plain(), FILE)] })
}

/// The control: the untampered manifest restores, so every refusal below is its tampering's.
#[tokio::test]
async fn the_untampered_repository_restores() {
    let env = Env::new();
    env.put_manifest(&env.manifest());
    let report = env.restore_with(TablespacePlacement::default()).await.unwrap();
    assert_eq!((report.files, report.bytes), (1, FILE.len() as u64));
    assert_eq!(std::fs::read(env.target().join("base/1/1259")).unwrap(), FILE);
    assert!(env.target().join("backup_label").is_file());
    assert!(env.target().join("recovery.signal").is_file());
    assert!(std::fs::read_dir(env.outside()).unwrap().next().is_none());
}

#[tokio::test]
async fn a_dotdot_path_is_refused() {
    let env = Env::new();
    let mut m = env.manifest();
    m["entries"][2]["path"] = "base/../../outside/evil".into();
    env.refused(&m, TablespacePlacement::default(), "'..' component")
        .await;
}

#[tokio::test]
async fn an_absolute_path_is_refused() {
    let env = Env::new();
    let mut m = env.manifest();
    m["entries"][2]["path"] = env.outside().join("evil").display().to_string().into();
    env.refused(&m, TablespacePlacement::default(), "absolute path")
        .await;
}

#[tokio::test]
async fn a_symlink_entry_is_refused() {
    // The manifest format has no links: a link entry pointing outside is not a manifest.
    let env = Env::new();
    let mut m = env.manifest();
    let link = json!({ "path": "base/link", "kind": "symlink", "mode": 0o777, "target": env.outside() });
    m["entries"].as_array_mut().unwrap().insert(1, link);
    env.refused(&m, TablespacePlacement::default(), "unknown variant `symlink`")
        .await;
}

#[tokio::test]
async fn a_tablespace_the_dba_did_not_place_is_refused() {
    // A tablespace is the only link restore (through PostgreSQL) makes; its location in the
    // manifest is never used unless the DBA says --tablespace-original.
    let env = Env::new();
    let mut m = env.manifest();
    m["tablespaces"] = json!([{ "oid": 16400, "location": env.outside() }]);
    m["tablespace_map"] = format!("16400 {}\n", env.outside().display()).into();
    let entries = m["entries"].as_array_mut().unwrap();
    entries.push(entry("pg_tblspc", "dir", 0o700));
    entries.push(entry("pg_tblspc/16400", "dir", 0o700));
    entries.push(file_entry("pg_tblspc/16400/evil"));
    env.refused(&m, TablespacePlacement::default(), "choose where they go")
        .await;
}

#[tokio::test]
async fn the_manifests_tablespace_map_is_never_written() {
    // Before: a manifest declaring no tablespace but carrying a tablespace_map had that map
    // written verbatim, and PostgreSQL would have linked pg_tblspc/16400 to the sentinel.
    let env = Env::new();
    let mut m = env.manifest();
    m["tablespace_map"] = format!("16400 {}\n", env.outside().display()).into();
    env.put_manifest(&m);
    env.restore_with(TablespacePlacement::default()).await.unwrap();
    assert!(!env.target().join("tablespace_map").exists());
    assert!(std::fs::read_dir(env.outside()).unwrap().next().is_none());
}

#[tokio::test]
async fn a_path_through_a_file_or_a_tablespace_root_file_is_refused() {
    let env = Env::new();
    let mut m = env.manifest();
    // base/1/1259 is a file; base/1/1259/x would be written through it.
    m["entries"]
        .as_array_mut()
        .unwrap()
        .push(file_entry("base/1/1259/x"));
    env.refused(
        &m,
        TablespacePlacement::default(),
        "goes through \"base/1/1259\", which is a file",
    )
    .await;

    // A mapped tablespace whose root is a file (it would be created as the location itself).
    let mut m = env.manifest();
    m["tablespaces"] = json!([{ "oid": 16400, "location": "/srv/ts1" }]);
    let entries = m["entries"].as_array_mut().unwrap();
    entries.push(entry("pg_tblspc", "dir", 0o700));
    entries.push(file_entry("pg_tblspc/16400"));
    let plan = TablespacePlacement {
        all_under: Some(env.outside()),
        ..Default::default()
    };
    env.refused(&m, plan, "a tablespace's root is a directory").await;
}

#[tokio::test]
async fn an_absurd_file_size_is_refused() {
    let env = Env::new();
    let mut m = env.manifest();
    m["entries"][2]["size"] = (1u64 << 63).into();
    env.refused(
        &m,
        TablespacePlacement::default(),
        "9223372036854775808 bytes, more than the limit",
    )
    .await;
}

#[tokio::test]
async fn a_chunk_count_that_does_not_match_the_size_is_refused() {
    let env = Env::new();
    let mut m = env.manifest();
    m["entries"][2]["size"] = (3u64 << 20).into();
    env.refused(&m, TablespacePlacement::default(), "1 chunks for 3145728 bytes")
        .await;
}

#[tokio::test]
async fn a_huge_entry_count_is_refused_before_entries_are_parsed() {
    // Ten million and one `null`s: the count alone is refused, before anything is allocated
    // per entry (and before the entries' contents would be found invalid).
    let env = Env::new();
    let mut m = env.manifest();
    m["entries"] = Value::Array(vec![Value::Null; walvault::basebackup::manifest::MAX_ENTRIES + 1]);
    env.refused(
        &m,
        TablespacePlacement::default(),
        "10000001 entries, more than the limit",
    )
    .await;
}

#[tokio::test]
async fn a_bad_chunk_id_is_refused() {
    let env = Env::new();
    for bad in [
        "../../../outside/evil".to_string(),
        chunk_id(&walvault::repo::object::Sealer::plain(), FILE)
            .to_string()
            .to_uppercase(),
    ] {
        let mut m = env.manifest();
        m["entries"][2]["chunks"] = json!([bad]);
        env.refused(
            &m,
            TablespacePlacement::default(),
            "is not 64 lower-case hex digits",
        )
        .await;
    }
}

#[tokio::test]
async fn special_modes_are_refused() {
    let env = Env::new();
    for (mode, cause) in [
        (0o4755, "setuid"),
        (0o2755, "setgid"),
        (0o020_600, "file type bits"),
    ] {
        let mut m = env.manifest();
        m["entries"][2]["mode"] = mode.into();
        env.refused(&m, TablespacePlacement::default(), cause).await;
    }
}

#[tokio::test]
async fn files_restore_writes_itself_and_duplicates_are_refused() {
    let env = Env::new();
    let mut m = env.manifest();
    m["entries"]
        .as_array_mut()
        .unwrap()
        .insert(0, file_entry("backup_label")); // sorted, as a careful attacker would
    env.refused(
        &m,
        TablespacePlacement::default(),
        "backup_label is written by restore itself",
    )
    .await;

    let mut m = env.manifest();
    m["entries"]
        .as_array_mut()
        .unwrap()
        .push(entry("postgresql.auto.conf", "dir", 0o700));
    env.refused(&m, TablespacePlacement::default(), "can only be a file")
        .await;

    let mut m = env.manifest();
    m["entries"]
        .as_array_mut()
        .unwrap()
        .push(file_entry("base/1/1259"));
    env.refused(&m, TablespacePlacement::default(), "listed twice")
        .await;
}

#[tokio::test]
async fn a_backup_of_another_cluster_is_refused() {
    let env = Env::new();
    let mut m = env.manifest();
    m["system_identifier"] = (SYSID + 1).to_string().into();
    env.refused(&m, TablespacePlacement::default(), "the repository holds system")
        .await;
}

/// A chunk object whose header claims 1 GiB where the manifest expects 8 KiB. Chunk contents
/// can only be checked as they are fetched, so this one refusal comes after writing began: the
/// header is checked before decompressing (the payload is not even zstd, so decompressing
/// would fail differently), and the partial restore is removed.
#[tokio::test]
async fn a_chunk_claiming_a_huge_length_is_refused_before_decompressing() {
    let env = Env::new();
    let id = "0f".repeat(32);
    let mut bytes = SealedObject::seal(ObjectKind::Chunk, &id, b"small", 1)
        .unwrap()
        .bytes
        .to_vec();
    let header_end = 64 + id.len();
    bytes[16..24].copy_from_slice(&(1u64 << 30).to_le_bytes());
    let crc = crc32fast::hash(&bytes[..header_end]);
    bytes[header_end..header_end + 4].copy_from_slice(&crc.to_le_bytes());
    env.put(&chunk_key(&id.parse().unwrap()), &bytes);
    let mut m = env.manifest();
    m["entries"][2]["chunks"] = json!([id]);
    env.put_manifest(&m);
    let err = env
        .restore_with(TablespacePlacement::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("holds 1073741824 bytes, the manifest says 8192"),
        "{err}"
    );
    assert!(
        err.contains(&id) && err.contains("base/1/1259"),
        "names the chunk and the file: {err}"
    );
    env.assert_untouched();
}
