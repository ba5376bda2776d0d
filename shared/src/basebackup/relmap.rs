//! The relation map a backup records: every database's relations with the file that holds each
//! (`pg_relation_filenode`), so `restore-agent find` can name the tables the WAL only knows by
//! file. Stored as `backups/<id>/relations.wvo` (format in docs/FORMAT.md), written before the
//! manifest. Derived data: a backup without one restores the same; `find` then shows file ids.

use serde::{Deserialize, Serialize};

use crate::basebackup::manifest::BackupId;
use crate::repo::layout;
use crate::repo::object::{ObjectKind, Sealer};
use crate::repo::stored::{Envelope, Objects, Opened, ReadError, StoredKind};
use crate::repo::{Store, StoreError, WritableStore};
use crate::wal::decode::RelFileLocator;

pub const FORMAT_NAME: &str = "walvault-relation-map";
pub const FORMAT_VERSION: u32 = 1;

/// One relation (`pg_class` row with storage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relation {
    pub oid: u32,
    /// `pg_relation_filenode()`: the file number the WAL names it by.
    pub filenode: u32,
    /// `relkind`: r table, p partitioned table, m materialized view, i index, t TOAST table, S
    /// sequence.
    pub kind: String,
    pub schema: String,
    pub name: String,
    /// For an index, its table; for a TOAST table, the table it belongs to; 0 otherwise.
    #[serde(default)]
    pub owner: u32,
}

impl Relation {
    /// `schema.name`, as `psql` shows it.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    pub fn kind_word(&self) -> &'static str {
        match self.kind.as_str() {
            "r" | "p" => "table",
            "m" => "materialized view",
            "i" | "I" => "index",
            "t" => "TOAST table",
            "S" => "sequence",
            _ => "relation",
        }
    }

    /// A system catalog or TOAST relation: changes there are PostgreSQL's bookkeeping.
    pub fn is_system(&self) -> bool {
        matches!(
            self.schema.as_str(),
            "pg_catalog" | "pg_toast" | "information_schema"
        )
    }
}

/// One schema (`pg_namespace` row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schema {
    pub oid: u32,
    pub name: String,
}

/// One database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Database {
    pub oid: u32,
    pub name: String,
    #[serde(default)]
    pub relations: Vec<Relation>,
    /// Its schemas, so that a relation created after the backup in one of them (named from the
    /// WAL, which gives the schema's OID) gets its schema's name. Absent in maps written before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schemas: Vec<Schema>,
    /// Why the relations could not be read (no connection allowed, refused by pg_hba.conf...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `backups/<id>/relations.wvo` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationMap {
    pub format: String,
    pub version: u32,
    pub backup: BackupId,
    pub databases: Vec<Database>,
}

#[derive(Debug, thiserror::Error)]
pub enum RelMapError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("relation map {key} is unreadable: {message}")]
    Corrupt { key: String, message: String },
}

impl RelationMap {
    pub fn database(&self, oid: u32) -> Option<&Database> {
        self.databases.iter().find(|d| d.oid == oid)
    }

    /// The relation stored in file `loc` (matched by database and file number: a file number is
    /// unique in a database whatever its tablespace, in practice).
    pub fn relation(&self, loc: &RelFileLocator) -> Option<&Relation> {
        self.database(loc.db)?
            .relations
            .iter()
            .find(|r| r.filenode == loc.rel)
    }

    /// The name of schema `oid` in database `db`.
    pub fn schema_name(&self, db: u32, oid: u32) -> Option<&str> {
        let d = self.database(db)?;
        d.schemas.iter().find(|s| s.oid == oid).map(|s| s.name.as_str())
    }

    pub fn relation_by_oid(&self, db: u32, oid: u32) -> Option<&Relation> {
        self.database(db)?.relations.iter().find(|r| r.oid == oid)
    }

    /// The table an index or TOAST relation belongs to (itself for a table), following owners
    /// (a TOAST index belongs to a TOAST table, which belongs to a table).
    pub fn table_of<'a>(&'a self, db: u32, rel: &'a Relation) -> &'a Relation {
        let mut r = rel;
        for _ in 0..3 {
            match self.relation_by_oid(db, r.owner).filter(|_| r.owner != 0) {
                Some(o) => r = o,
                None => break,
            }
        }
        r
    }

    /// Parse the stored JSON (untrusted) of backup `id`'s map.
    pub fn parse(json: &[u8], id: &BackupId) -> Result<RelationMap, RelMapFormatError> {
        let m: RelationMap = serde_json::from_slice(json)?;
        if m.format != FORMAT_NAME || m.version != FORMAT_VERSION || &m.backup != id {
            return Err(RelMapFormatError::Foreign {
                format: m.format,
                version: m.version,
                backup: m.backup,
            });
        }
        Ok(m)
    }
}

/// Why the JSON of a stored relation map is unusable.
#[derive(Debug, thiserror::Error)]
pub enum RelMapFormatError {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("format {format:?} version {version} for backup {backup}")]
    Foreign {
        format: String,
        version: u32,
        backup: BackupId,
    },
}

impl StoredKind for RelationMap {
    type Id = BackupId;
    type Error = RelMapFormatError;
    // Sealed even in a plain repository: a map can be large, and compresses well.
    const ENVELOPE: Envelope = Envelope::Sealed(ObjectKind::Record);

    fn key(id: &BackupId) -> String {
        layout::relation_map_key(id)
    }

    fn parse(opened: Opened, id: &BackupId) -> Result<RelationMap, RelMapFormatError> {
        RelationMap::parse(&opened.content, id)
    }
}

/// Store backup `id`'s map (compressed, sealed like every object of the repository).
pub async fn store(store: &WritableStore, sealer: &Sealer, map: &RelationMap) -> Result<(), RelMapError> {
    let key = layout::relation_map_key(&map.backup);
    // Serialized into the compressor as it goes: 200,000 relations are some 30 MB of JSON, and
    // held whole with room for their compression they were a backup's peak of memory (73 MiB
    // of heap at 300,963 files, heaptrack).
    let sealed = sealer
        .seal_writer(ObjectKind::Record, &key, 3, |w| {
            serde_json::to_writer(w, map).map_err(std::io::Error::other)
        })
        .map_err(|e| RelMapError::Corrupt {
            key: key.clone(),
            message: e.to_string(),
        })?;
    store.put(&key, sealed.bytes).await?;
    Ok(())
}

/// Read backup `id`'s map; `None` when it recorded none.
pub async fn load(store: &Store, sealer: &Sealer, id: &BackupId) -> Result<Option<RelationMap>, RelMapError> {
    Ok(Objects::new(store, sealer)
        .read_if_present::<RelationMap>(id)
        .await?)
}

/// A map that could not be read, in this module's terms.
impl From<ReadError<RelMapFormatError>> for RelMapError {
    fn from(e: ReadError<RelMapFormatError>) -> RelMapError {
        match e {
            ReadError::Store(e) => RelMapError::Store(e),
            ReadError::Missing { key } => RelMapError::Corrupt {
                key,
                message: "missing".into(),
            },
            ReadError::Damaged { key, reason } => RelMapError::Corrupt {
                key,
                message: reason.to_string(),
            },
        }
    }
}

/// Every relation with storage, with its file number and owner.
const RELATIONS_SQL: &str = "\
SELECT c.oid::int8, pg_relation_filenode(c.oid)::int8, c.relkind::text, n.nspname::text, c.relname::text,
       COALESCE(i.indrelid, t.oid, 0)::int8
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_index i ON i.indexrelid = c.oid
  LEFT JOIN pg_class t ON t.reltoastrelid = c.oid
 WHERE pg_relation_filenode(c.oid) IS NOT NULL AND c.relpersistence <> 't'";

/// Read the map from a running server: the databases from the connection `client` holds, then
/// each database that allows connections through its own connection (`conn` with its name as
/// dbname). A database that cannot be read is recorded with its error; only the first query
/// failing fails the map.
pub async fn read_from_server(
    client: &tokio_postgres::Client,
    conn: &str,
    backup: &BackupId,
) -> Result<RelationMap, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT oid::int8, datname::text, datallowconn FROM pg_database ORDER BY oid",
            &[],
        )
        .await?;
    let base: Option<tokio_postgres::Config> = conn.parse().ok();
    let mut databases = Vec::new();
    for row in rows {
        let (oid, name, allowed): (i64, String, bool) = (row.get(0), row.get(1), row.get(2));
        let mut db = Database {
            oid: oid as u32,
            name: name.clone(),
            relations: Vec::new(),
            schemas: Vec::new(),
            error: None,
        };
        match (&base, allowed) {
            (_, false) => db.error = Some("the database does not allow connections".into()),
            (None, true) => db.error = Some("the connection string could not be parsed".into()),
            (Some(base), true) => match relations_of(base, &name).await {
                Ok((relations, schemas)) => (db.relations, db.schemas) = (relations, schemas),
                Err(e) => {
                    let message = e.as_db_error().map_or(e.to_string(), |d| d.message().to_string());
                    tracing::warn!(database = %name, "relation map: {message}");
                    db.error = Some(message);
                }
            },
        }
        databases.push(db);
    }
    Ok(RelationMap {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        backup: backup.clone(),
        databases,
    })
}

/// Database `dbname`'s relations and schemas. The relations are taken as their rows arrive: a
/// database of 200,000 relations held as rows first took some 55 MB, the peak of a backup of
/// its 300,000 files.
async fn relations_of(
    base: &tokio_postgres::Config,
    dbname: &str,
) -> Result<(Vec<Relation>, Vec<Schema>), tokio_postgres::Error> {
    use futures::TryStreamExt;
    let mut config = base.clone();
    config.dbname(dbname);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    let task = tokio::spawn(connection);
    let read = async {
        let no_params: [&(dyn tokio_postgres::types::ToSql + Sync); 0] = [];
        let rows = client.query_raw(RELATIONS_SQL, no_params).await?;
        futures::pin_mut!(rows);
        let mut relations = Vec::new();
        while let Some(r) = rows.try_next().await? {
            relations.push(Relation {
                oid: r.get::<_, i64>(0) as u32,
                filenode: r.get::<_, i64>(1) as u32,
                kind: r.get(2),
                schema: r.get(3),
                name: r.get(4),
                owner: r.get::<_, i64>(5) as u32,
            });
        }
        relations.shrink_to_fit();
        let schemas = client
            .query(
                "SELECT oid::int8, nspname::text FROM pg_namespace ORDER BY oid",
                &[],
            )
            .await?
            .into_iter()
            .map(|r| Schema {
                oid: r.get::<_, i64>(0) as u32,
                name: r.get(1),
            })
            .collect();
        Ok((relations, schemas))
    };
    let read = read.await;
    drop(client);
    let _ = task.await;
    read
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A relation for tests (here and in `find`).
    pub(crate) fn relation(
        oid: u32,
        filenode: u32,
        kind: &str,
        schema: &str,
        name: &str,
        owner: u32,
    ) -> Relation {
        Relation {
            oid,
            filenode,
            kind: kind.into(),
            schema: schema.into(),
            name: name.into(),
            owner,
        }
    }

    fn rel(oid: u32, filenode: u32, kind: &str, name: &str, owner: u32) -> Relation {
        relation(oid, filenode, kind, "public", name, owner)
    }

    fn map() -> RelationMap {
        RelationMap {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            backup: "20261122T143000Z".parse().unwrap(),
            databases: vec![Database {
                oid: 5,
                name: "app".into(),
                relations: vec![
                    rel(100, 200, "r", "orders", 0),
                    rel(101, 201, "i", "orders_pkey", 100),
                    rel(102, 202, "t", "pg_toast_100", 100),
                    rel(103, 203, "i", "pg_toast_100_index", 102),
                ],
                schemas: vec![],
                error: None,
            }],
        }
    }

    #[test]
    fn files_name_their_relation_and_indexes_their_table() {
        let m = map();
        let loc = |rel| RelFileLocator {
            spc: 1663,
            db: 5,
            rel,
        };
        assert_eq!(m.relation(&loc(200)).unwrap().qualified(), "public.orders");
        let toast_index = m.relation(&loc(203)).unwrap();
        assert_eq!(m.table_of(5, toast_index).name, "orders");
        assert!(m.relation(&loc(999)).is_none());
        assert!(
            m.relation(&RelFileLocator {
                spc: 1663,
                db: 6,
                rel: 200
            })
            .is_none()
        );
    }

    #[test]
    fn frozen_fixture_v1() {
        let json = include_bytes!("../../tests/fixtures/relation-map-v1.json");
        let id: BackupId = "20261122T143000Z".parse().unwrap();
        let m = RelationMap::parse(json, &id).unwrap();
        assert_eq!(m, map());
        assert!(RelationMap::parse(json, &"20261122T143001Z".parse().unwrap()).is_err());
    }

    #[tokio::test]
    async fn stored_sealed_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let url: crate::repo::RepoUrl = format!("file://{}", dir.path().display()).parse().unwrap();
        let w = WritableStore::open(&url, &Default::default()).unwrap();
        let sealer = Sealer::plain();
        let m = map();
        store(&w, &sealer, &m).await.unwrap();
        assert_eq!(load(&w, &sealer, &m.backup).await.unwrap(), Some(m.clone()));
        let other: BackupId = "20261122T143001Z".parse().unwrap();
        assert_eq!(load(&w, &sealer, &other).await.unwrap(), None);
    }
}
