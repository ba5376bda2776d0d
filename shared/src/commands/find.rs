//! `restore-agent find`: the destructive transactions in the archived WAL, newest first, each
//! with the restore that recovers the moment before it.
//!
//! The archiver records every transaction that unlinked relation files, truncated, dropped a
//! database or changed many rows of one relation in the time index as it archives
//! ([`crate::wal::changes`]). This module reads those events back, names their relations from
//! the relation map of the newest backup before them ([`crate::basebackup::relmap`]), or, for
//! relations created after that backup, from the `pg_class` rows the WAL carries ([`names`]), and
//! says what the WAL can tell of each. The pure part is [`describe`]: event + names in, actions
//! out. Each event comes with the commands that recover the moment before it: the whole cluster
//! (`restore`), each table it destroyed rows of (`extract`), a dropped database on its own
//! (`restore --database`).

mod names;

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::basebackup::manifest::BackupId;
use crate::basebackup::relmap::{RelMapError, RelationMap};
use crate::catalog::Catalog;
use crate::invocation::AgentCommand;
use crate::repo::ReadError;
use crate::repo::Reader;
use crate::report::Report;
use crate::wal::TimelineId;
use crate::wal::changes::{ChangeEvent, ROW_FLOOR};
use crate::wal::decode::RelFileLocator;
pub use names::{WalCatalog, WalNames, WalRelation};

/// What to look for.
#[derive(Debug, Clone)]
pub struct FindOptions {
    /// Only events at or after this time (unix microseconds).
    pub since: Option<i64>,
    /// Only events at or before this time.
    pub until: Option<i64>,
    /// Only events touching this table (`name` or `schema.name`).
    pub table: Option<String>,
    /// Rows one relation must lose to a `DELETE` or `UPDATE` for the transaction to be listed.
    pub min_rows: u64,
}

impl Default for FindOptions {
    fn default() -> Self {
        FindOptions {
            since: None,
            until: None,
            table: None,
            min_rows: 1000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    RelMap(#[from] RelMapError),
    #[error(
        "--min-rows {0}: the time index records transactions from {ROW_FLOOR} rows of one relation; use {ROW_FLOOR} or more"
    )]
    MinRows(u64),
    #[error(transparent)]
    Repo(#[from] crate::repo::RepoError),
}

/// What happened to one relation (or database).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Its files were unlinked and its `pg_class` row deleted: `DROP`.
    Drop,
    /// A `TRUNCATE` record named it (`wal_level = logical`).
    Truncate,
    /// Its files were replaced by new ones: `TRUNCATE`, `VACUUM FULL`, `CLUSTER`, a rewriting
    /// `ALTER TABLE` or `REFRESH MATERIALIZED VIEW`; the WAL at `wal_level = replica` does not
    /// tell which.
    TruncateOrRewrite,
    /// Its files were unlinked; whether it was dropped or given new files cannot be told (its
    /// database's catalogs are not in the relation map, or the transaction did both).
    DropOrRewrite,
    Delete,
    Update,
    DropDatabase,
}

impl ActionKind {
    fn verb(self) -> &'static str {
        match self {
            ActionKind::Drop => "DROP",
            ActionKind::Truncate => "TRUNCATE",
            ActionKind::TruncateOrRewrite => "TRUNCATE or rewrite (VACUUM FULL, CLUSTER, ALTER TABLE)",
            ActionKind::DropOrRewrite => "DROP, TRUNCATE or rewrite",
            ActionKind::Delete => "DELETE",
            ActionKind::Update => "UPDATE",
            ActionKind::DropDatabase => "DROP DATABASE",
        }
    }
}

/// One thing a transaction did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Action {
    pub kind: ActionKind,
    /// `schema.name`, a database name, or `file <tablespace>/<database>/<filenode>` for a
    /// relation neither the map nor the WAL's `pg_class` rows name.
    pub object: String,
    /// table, index, materialized view, sequence, database...
    pub object_kind: String,
    /// Rows deleted or updated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// Named from the `pg_class` row the WAL carries, inserted at this LSN (the relation was
    /// created after the backup whose relation map names the others).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub named_from_wal: Option<String>,
    /// `object` is a whole name (schema and table, or database) a command can be given.
    #[serde(skip)]
    pub named: bool,
}

impl Action {
    /// An action on an object named `object`, of kind `object_kind`, known by name.
    fn on(kind: ActionKind, object: String, object_kind: &str) -> Action {
        Action {
            kind,
            object,
            object_kind: object_kind.into(),
            rows: None,
            named_from_wal: None,
            named: true,
        }
    }

    /// An action on a relation (see [`Named`]).
    fn on_relation(kind: ActionKind, r: &Named) -> Action {
        Action {
            named_from_wal: r.from_wal.map(|l| l.to_string()),
            named: r.schema_known,
            ..Action::on(kind, r.rel.qualified(), r.rel.kind_word())
        }
    }

    /// An action on a relation known only by name of file or OID.
    fn unnamed(kind: ActionKind, object: String) -> Action {
        Action {
            named: false,
            ..Action::on(kind, object, "relation")
        }
    }

    /// A table whose rows an `extract` from before the event gives back.
    fn extractable_table(&self) -> bool {
        self.named && self.object_kind == "table" && self.kind != ActionKind::DropDatabase
    }

    pub fn describe(&self) -> String {
        match (self.kind, self.rows) {
            (ActionKind::Delete, Some(n)) => {
                format!("DELETE of {n} rows from {} {}", self.object_kind, self.object)
            }
            (ActionKind::Update, Some(n)) => {
                format!("UPDATE of {n} rows of {} {}", self.object_kind, self.object)
            }
            (ActionKind::DropDatabase, _) => format!("DROP DATABASE {}", self.object),
            (k, _) => format!("{} {} {}", k.verb(), self.object_kind, self.object),
        }
    }
}

/// One destructive transaction, as `find` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct FoundEvent {
    /// Commit time, as PostgreSQL prints it.
    pub time: String,
    pub time_us: i64,
    pub xid: u32,
    /// The commit record.
    pub lsn: String,
    pub timeline: TimelineId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// `database` is its name (not `database <oid>`).
    #[serde(skip)]
    pub database_named: bool,
    pub actions: Vec<Action>,
    /// The backup whose relation map named the relations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub names_from: Option<BackupId>,
    /// A backup before it exists, so the moment before it can be restored.
    pub restorable: bool,
    /// `restore-agent restore` arguments that recover the moment just before the commit.
    pub restore_args: Vec<String>,
    /// Notes on what the WAL could not tell.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// What `find` found, and what limits it.
#[derive(Debug, Clone, Serialize)]
pub struct Found {
    pub events: Vec<FoundEvent>,
    /// Segments whose summary was written by a walvault that did not look for events.
    pub segments_not_searched: u64,
    /// Archived segments without a summary.
    pub segments_without_summary: u64,
}

/// Search the repository.
pub async fn find(repo: &Reader, opts: &FindOptions) -> Result<Found, FindError> {
    if opts.min_rows < ROW_FLOOR {
        return Err(FindError::MinRows(opts.min_rows));
    }
    let cat = Catalog::load_outlines_and_changes(repo).await?;
    // Read as events need them: one GET per backup that names an event, not per backup.
    let mut maps: HashMap<BackupId, Option<RelationMap>> = HashMap::new();
    let latest = cat.latest_timeline();
    let latest_history = cat.history(latest);
    let wal = WalCatalog::from_catalog(&cat);

    // The same WAL can sit in two timelines' copies of the segment where they fork: keep the
    // copy on the latest timeline's history.
    let mut chosen: BTreeMap<(u64, u32), (TimelineId, &ChangeEvent)> = BTreeMap::new();
    let (mut not_searched, mut without) = (0, 0);
    for (tli, segs) in cat.segments() {
        without += segs
            .iter()
            .filter(|no| cat.summary((tli, **no)).is_none())
            .count() as u64;
    }
    for ((tli, _), summary) in cat.summaries() {
        let Some(events) = &summary.events else {
            not_searched += 1;
            continue;
        };
        for e in events {
            let slot = chosen.entry((e.lsn.0, e.xid)).or_insert((tli, e));
            if latest_history.timeline_at(e.lsn) == tli {
                *slot = (tli, e);
            }
        }
    }

    let mut found = Vec::new();
    for (tli, e) in chosen.into_values() {
        let Some(time_us) = e.time.to_unix_micros() else {
            continue;
        };
        if opts.since.is_some_and(|s| time_us < s) || opts.until.is_some_and(|u| time_us > u) {
            continue;
        }
        let on_history: Vec<_> = cat.backups().iter().filter(|m| cat.on_history(m, tli)).collect();
        let map = map_for(repo, &mut maps, &on_history, e).await?;
        let names = wal.before(&cat.history(tli), e.lsn);
        let Description {
            database,
            database_named,
            actions,
            notes,
        } = describe(e, map, &names, opts.min_rows);
        if actions.is_empty() {
            continue;
        }
        if let Some(t) = &opts.table
            && !actions.iter().any(|a| names_table(&a.object, t))
        {
            continue;
        }
        let restorable = on_history.iter().any(|m| m.stop_lsn <= e.lsn);
        let mut restore_args = match (e.dropped_database, e.drop_from) {
            // The database is gone before the commit: stop where that began.
            (Some(_), Some(at)) => vec!["--target-lsn".to_string(), at.to_string()],
            _ => vec!["--target-xid".to_string(), e.xid.to_string()],
        };
        restore_args.push("--target-exclusive".to_string());
        if latest_history.timeline_at(e.lsn) != tli {
            restore_args.extend(["--target-timeline".to_string(), tli.to_string()]);
        }
        found.push(FoundEvent {
            time: crate::time::format_micros(time_us),
            time_us,
            xid: e.xid,
            lsn: e.lsn.to_string(),
            timeline: tli,
            database,
            database_named,
            actions,
            names_from: map.map(|m| m.backup.clone()),
            restorable,
            restore_args,
            notes,
        });
    }
    found.sort_by(|a, b| b.time_us.cmp(&a.time_us).then(b.lsn.cmp(&a.lsn)));
    Ok(Found {
        events: found,
        segments_not_searched: not_searched,
        segments_without_summary: without,
    })
}

/// The relation map that names `e`'s relations: that of the newest backup that started before
/// it on its history, else of the oldest one after it (read once per backup, kept in `maps`).
async fn map_for<'m>(
    repo: &Reader,
    maps: &'m mut HashMap<BackupId, Option<RelationMap>>,
    on_history: &[&crate::basebackup::manifest::Manifest],
    e: &ChangeEvent,
) -> Result<Option<&'m RelationMap>, FindError> {
    let namer = on_history
        .iter()
        .filter(|m| m.start_lsn <= e.lsn)
        .max_by_key(|m| m.start_lsn)
        .or_else(|| on_history.iter().min_by_key(|m| m.start_lsn));
    let Some(m) = namer else { return Ok(None) };
    if !maps.contains_key(&m.id) {
        maps.insert(m.id.clone(), load_map(repo, &m.id).await?);
    }
    Ok(maps.get(&m.id).and_then(Option::as_ref))
}

/// Backup `id`'s relation map; `None` when it has none or it is damaged (names are then file
/// numbers), an error only when the store cannot be read.
async fn load_map(repo: &Reader, id: &BackupId) -> Result<Option<RelationMap>, FindError> {
    match repo.read_if_present::<RelationMap>(id).await {
        Ok(map) => Ok(map),
        Err(ReadError::Store(e)) => Err(RelMapError::Store(e).into()),
        Err(e) => {
            tracing::warn!("{}", RelMapError::from(e));
            Ok(None)
        }
    }
}

/// Whether `object` (`schema.name`) is `table` (`name` or `schema.name`).
fn names_table(object: &str, table: &str) -> bool {
    object == table || object.rsplit_once('.').is_some_and(|(_, name)| name == table)
}

/// What [`describe`] says of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// The database, by name when known, else `database <oid>`.
    pub database: Option<String>,
    /// `database` is a name.
    pub database_named: bool,
    pub actions: Vec<Action>,
    /// What cannot be told, and where names came from when not from the map.
    pub notes: Vec<String>,
}

/// What an event did, in the words of `map` (the relation map of a backup near it) and, for
/// what the map does not know, of `wal` (the relations the WAL says were created before the
/// event): the database name, the actions, and notes on what cannot be told. Pure.
pub fn describe(e: &ChangeEvent, map: Option<&RelationMap>, wal: &WalNames, min_rows: u64) -> Description {
    let words = Words { e, map, wal };
    let mut actions = Vec::new();
    let mut notes = Vec::new();
    if let Some(d) = e.dropped_database {
        let mut a = Action::on(ActionKind::DropDatabase, words.database_name(d), "database");
        a.named = words.database_named(d);
        actions.push(a);
        notes.push(match e.drop_from {
            Some(at) => format!(
                "DROP DATABASE destroys the database before its transaction commits (it marks it invalid, then removes its files): the restore stops before {at}, where that began"
            ),
            None => "recorded by an older walvault, which did not note where DROP DATABASE began: a restore to just before the commit brings the database back invalid (it was marked so, and its files removed, before the commit); use --target-time or --target-lsn earlier than the drop".into(),
        });
    }
    let truncated_tables = words.truncates(&mut actions);
    if !e.unlinked.is_empty() {
        words.unlinked_files(&truncated_tables, &mut actions, &mut notes);
    }
    words.many_rows(min_rows, &mut actions);
    words.wal_names_note(&actions, &mut notes);
    let db = words.database_oid();
    Description {
        database: db.map(|d| words.database_name(d)),
        database_named: db.is_some_and(|d| words.database_named(d)),
        actions,
        notes,
    }
}

/// A relation as `find` names it: from the relation map, or from the WAL's `pg_class` rows.
#[derive(Debug, Clone)]
struct Named {
    rel: crate::basebackup::relmap::Relation,
    /// Where the WAL's row that named it was inserted, when not from the map.
    from_wal: Option<crate::wal::Lsn>,
    /// Its schema's name is known.
    schema_known: bool,
}

impl Named {
    fn from_map(r: &crate::basebackup::relmap::Relation) -> Named {
        Named {
            rel: r.clone(),
            from_wal: None,
            schema_known: true,
        }
    }

    /// A relation the WAL named in database `db`; its schema's name from `map` when the WAL
    /// did not carry it (a schema created before the backup).
    fn from_wal(w: WalRelation, db: u32, map: Option<&RelationMap>) -> Named {
        let mut rel = w.relation;
        let schema = map.and_then(|m| m.schema_name(db, w.namespace));
        let schema_known = match (w.schema_known, schema) {
            (false, Some(name)) => {
                rel.schema = name.to_string();
                true
            }
            (known, _) => known,
        };
        Named {
            rel,
            from_wal: Some(w.lsn),
            schema_known,
        }
    }
}

/// One event told in the words of a relation map and the WAL's catalog rows (see [`describe`]).
#[derive(Clone, Copy)]
struct Words<'a> {
    e: &'a ChangeEvent,
    map: Option<&'a RelationMap>,
    wal: &'a WalNames,
}

impl Words<'_> {
    /// The database the event happened in.
    fn database_oid(&self) -> Option<u32> {
        let e = self.e;
        e.db.or_else(|| e.unlinked.first().map(|l| l.db).filter(|&d| d != 0))
            .or_else(|| e.rows.first().map(|r| r.rel.db))
            .or(e.dropped_database)
    }

    fn database_name(&self, oid: u32) -> String {
        self.map
            .and_then(|m| m.database(oid))
            .map_or(format!("database {oid}"), |d| d.name.clone())
    }

    fn database_named(&self, oid: u32) -> bool {
        self.map.and_then(|m| m.database(oid)).is_some()
    }

    /// The relation in file `loc`: the map's, else the WAL's.
    fn relation(&self, loc: &RelFileLocator) -> Option<Named> {
        self.map
            .and_then(|m| m.relation(loc))
            .map(Named::from_map)
            .or_else(|| {
                let w = self.wal.relation(loc.db, loc.rel)?;
                Some(Named::from_wal(w, loc.db, self.map))
            })
    }

    /// The relation `oid` of database `db`: the map's, else the WAL's.
    fn relation_by_oid(&self, db: u32, oid: u32) -> Option<Named> {
        self.map
            .and_then(|m| m.relation_by_oid(db, oid))
            .map(Named::from_map)
            .or_else(|| {
                let w = self.wal.relation_by_oid(db, oid)?;
                Some(Named::from_wal(w, db, self.map))
            })
    }

    /// The table an index or TOAST relation belongs to (itself for a table), following owners
    /// through the map and the WAL (a TOAST index belongs to a TOAST table, which belongs to a
    /// table).
    fn table_of(&self, db: u32, rel: Named) -> Named {
        let mut r = rel;
        for _ in 0..3 {
            match self.relation_by_oid(db, r.rel.owner).filter(|_| r.rel.owner != 0) {
                Some(o) => r = o,
                None => break,
            }
        }
        r
    }

    /// TRUNCATE records (wal_level = logical) name relations by OID: an action each; returns the
    /// tables named (database, OID).
    fn truncates(&self, actions: &mut Vec<Action>) -> Vec<(u32, u32)> {
        let mut truncated_tables = Vec::new();
        for &(db, oid) in &self.e.truncated {
            match self.relation_by_oid(db, oid) {
                Some(r) => {
                    truncated_tables.push((db, r.rel.oid));
                    actions.push(Action::on_relation(ActionKind::Truncate, &r));
                }
                None => actions.push(Action::unnamed(
                    ActionKind::Truncate,
                    format!("relation {oid} in {}", self.database_name(db)),
                )),
            }
        }
        truncated_tables
    }

    /// Unlinked files: an action per table they belong to (those not truncated already), then
    /// per file nothing names; notes on what the WAL cannot tell.
    fn unlinked_files(
        &self,
        truncated_tables: &[(u32, u32)],
        actions: &mut Vec<Action>,
        notes: &mut Vec<String>,
    ) {
        let mut tables: Vec<(u32, Named)> = Vec::new();
        let mut unknown = Vec::new();
        for loc in &self.e.unlinked {
            match self.relation(loc) {
                Some(r) => {
                    let t = self.table_of(loc.db, r);
                    if !tables.iter().any(|(d, x)| *d == loc.db && x.rel.oid == t.rel.oid)
                        && !truncated_tables.contains(&(loc.db, t.rel.oid))
                    {
                        tables.push((loc.db, t));
                    }
                }
                None => unknown.push(loc),
            }
        }
        for (db, t) in &tables {
            actions.push(Action::on_relation(self.unlink_kind(*db), t));
        }
        for loc in unknown {
            actions.push(Action::unnamed(
                self.unlink_kind(loc.db),
                format!("file {}/{}/{}", loc.spc, loc.db, loc.rel),
            ));
        }
        if actions.iter().any(|a| a.kind == ActionKind::TruncateOrRewrite) {
            notes.push(
                "at wal_level = replica the WAL does not tell a TRUNCATE from a rewrite (VACUUM FULL, CLUSTER, ALTER TABLE ... TYPE, REFRESH MATERIALIZED VIEW): both give the table new files".into(),
            );
        }
        if self.e.unlinked_cut {
            notes.push(
                "the commit record lists more files than walvault keeps: some may be missing here".into(),
            );
        }
        if self.map.is_none() && actions.iter().any(|a| a.object.starts_with("file ")) {
            notes.push("no backup before it recorded a relation map: relations are shown by file".into());
        }
    }

    /// What unlinking files in database `db` was: pg_class rows deleted tell a drop; updated
    /// only, a new file for the same relation. `pg_class`'s file is the map's when it knows the
    /// database's catalogs, else initdb's when the WAL's `pg_class` rows were read there.
    fn unlink_kind(&self, db: u32) -> ActionKind {
        let from_map = self
            .map
            .and_then(|m| m.database(db))
            .filter(|d| d.error.is_none())
            .and_then(|d| {
                d.relations
                    .iter()
                    .find(|r| r.schema == "pg_catalog" && r.name == "pg_class")
            })
            .map(|r| r.filenode);
        let from_wal = self
            .wal
            .knows_database(db)
            .then_some(crate::wal::catalog_rows::PG_CLASS);
        let Some(pg_class) = from_map.or(from_wal) else {
            return ActionKind::DropOrRewrite;
        };
        let (deleted, updated) = self
            .e
            .rows
            .iter()
            .filter(|r| r.rel.db == db && r.rel.rel == pg_class)
            .fold((0, 0), |(d, u), r| (d + r.deleted, u + r.updated));
        let files = self.e.unlinked.iter().filter(|l| l.db == db).count() as u64;
        match (deleted, updated) {
            (d, _) if d >= files => ActionKind::Drop,
            (0, u) if u > 0 => ActionKind::TruncateOrRewrite,
            _ => ActionKind::DropOrRewrite,
        }
    }

    /// Many rows of one relation (not a system catalog): a `DELETE` or `UPDATE` action each
    /// from `min_rows` rows.
    fn many_rows(&self, min_rows: u64, actions: &mut Vec<Action>) {
        for r in &self.e.rows {
            let rel = self.relation(&r.rel);
            if rel.as_ref().is_some_and(|x| x.rel.is_system()) {
                continue;
            }
            for (kind, n) in [(ActionKind::Delete, r.deleted), (ActionKind::Update, r.updated)] {
                if n >= min_rows {
                    let mut a = match &rel {
                        Some(x) => Action::on_relation(kind, x),
                        None => {
                            Action::unnamed(kind, format!("file {}/{}/{}", r.rel.spc, r.rel.db, r.rel.rel))
                        }
                    };
                    a.rows = Some(n);
                    actions.push(a);
                }
            }
        }
    }

    /// Which relations were named from the WAL, and why.
    fn wal_names_note(&self, actions: &[Action], notes: &mut Vec<String>) {
        let from_wal: Vec<&str> = actions
            .iter()
            .filter(|a| a.named_from_wal.is_some())
            .map(|a| a.object.as_str())
            .collect();
        if from_wal.is_empty() {
            return;
        }
        // Backup ids are start times to the second, which sort as the times do. Within the same
        // second the map is taken as the backup's before the event: find names from the newest
        // backup before the event, and from one after it only when there is none before.
        let event_second = self
            .e
            .time
            .to_unix_micros()
            .map(|us| BackupId::from_unix(us.div_euclid(1_000_000)));
        let whence = match self.map {
            Some(m) if event_second.is_some_and(|s| m.backup <= s) => format!(
                "created after backup {}, whose relation map does not know them",
                m.backup
            ),
            Some(m) => format!("the relation map of backup {} does not know them", m.backup),
            None => "no backup before it recorded a relation map".to_string(),
        };
        notes.push(format!(
            "{} named from the pg_class rows the WAL carries ({whence})",
            from_wal.join(", ")
        ));
    }
}

/// The restore that recovers the moment just before `e`, when a backup before it exists:
/// `command` (`restore-agent restore --pgdata ...` with the repository settings this `find` was
/// given, the program as it was invoked so that it runs where this one did) with the event's
/// target flags.
fn restore_for(command: &AgentCommand, e: &FoundEvent) -> Option<String> {
    e.restorable
        .then(|| command.clone().args(&e.restore_args).shell_line())
}

/// The narrower recoveries of the moment before `e`, when a backup before it exists: for each
/// table it dropped, truncated, deleted from or updated, an `extract` of that table from that
/// moment (the program and repository settings of `command`, without its data directory); for
/// a dropped database, a `restore --database` of it alone (`command`'s, data directory and all).
fn extracts_for(command: &AgentCommand, e: &FoundEvent) -> Vec<Narrower> {
    if !e.restorable {
        return Vec::new();
    }
    let mut lines = Vec::new();
    let mut tables: Vec<&str> = Vec::new();
    for a in &e.actions {
        if a.kind == ActionKind::DropDatabase && a.named {
            let restore = command.clone().args(["--database", a.object.as_str()]);
            lines.push(Narrower {
                database: true,
                command: restore.args(&e.restore_args).shell_line(),
            });
        } else if a.extractable_table() && e.database_named && !tables.contains(&a.object.as_str()) {
            tables.push(&a.object);
        }
    }
    let database = e.database.as_deref().unwrap_or_default();
    for t in tables {
        let extract = command
            .sibling("extract")
            .args(["--database", database, "--table", t])
            .args(&e.restore_args)
            .args(["--to".to_string(), format!("{t}.dump")]);
        lines.push(Narrower {
            database: false,
            command: extract.shell_line(),
        });
    }
    lines
}

/// What `restore-agent find` prints: the events, each with its restore command.
#[derive(Debug, Clone, Serialize)]
pub struct FindReport {
    pub events: Vec<ReportedEvent>,
    pub segments_not_searched: u64,
    pub segments_without_summary: u64,
}

/// One event and the command that restores the moment before it (`None`: not restorable).
#[derive(Debug, Clone, Serialize)]
pub struct ReportedEvent {
    #[serde(flatten)]
    pub event: FoundEvent,
    pub restore_command: Option<String>,
    /// `extract` of each table the event destroyed rows of, and `restore --database` of a
    /// dropped database, from just before it.
    pub extract_commands: Vec<Narrower>,
}

/// A recovery narrower than the whole cluster's: written as its command line.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct Narrower {
    /// A `restore --database` of a dropped database, not an `extract` of a table.
    #[serde(skip)]
    pub database: bool,
    pub command: String,
}

impl FindReport {
    pub fn new(found: Found, command: &AgentCommand) -> FindReport {
        FindReport {
            events: found
                .events
                .into_iter()
                .map(|event| ReportedEvent {
                    restore_command: restore_for(command, &event),
                    extract_commands: extracts_for(command, &event),
                    event,
                })
                .collect(),
            segments_not_searched: found.segments_not_searched,
            segments_without_summary: found.segments_without_summary,
        }
    }
}

/// Open the repository read-only and search it: `restore-agent find`.
pub async fn find_in(
    settings: &crate::config::Settings,
    opts: &FindOptions,
    command: &AgentCommand,
) -> Result<FindReport, FindError> {
    let repo = settings.open_reader().await?;
    Ok(FindReport::new(find(&repo, opts).await?, command))
}

impl Report for FindReport {
    fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        if self.events.is_empty() {
            out.push_str("no destructive transactions found in the archived WAL\n");
        }
        for ReportedEvent {
            event: e,
            restore_command,
            extract_commands,
        } in &self.events
        {
            let _ = writeln!(
                out,
                "{}  xid {}  {}  (commit at {}, timeline {})",
                e.time,
                e.xid,
                e.database.as_deref().unwrap_or("database unknown"),
                e.lsn,
                e.timeline
            );
            for a in &e.actions {
                let _ = writeln!(out, "    {}", a.describe());
            }
            for n in &e.notes {
                let _ = writeln!(out, "    note: {n}");
            }
            let _ = match restore_command {
                Some(c) => writeln!(out, "    restore just before it:  {c}"),
                None => writeln!(
                    out,
                    "    not restorable: no backup of this timeline was taken before it"
                ),
            };
            for n in extract_commands {
                let what = match n.database {
                    true => "restore just the database:",
                    false => "extract just before it:",
                };
                let _ = writeln!(out, "    {what}  {}", n.command);
            }
            out.push('\n');
        }
        if self.segments_not_searched > 0 {
            let _ = writeln!(
                out,
                "{} segments were indexed by an older walvault, which did not record these events: they were not searched",
                self.segments_not_searched
            );
        }
        if self.segments_without_summary > 0 {
            let _ = writeln!(
                out,
                "{} archived segments have no time index summary: they were not searched",
                self.segments_without_summary
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::basebackup::relmap::tests::relation;
    use crate::basebackup::relmap::{Database, FORMAT_NAME, FORMAT_VERSION};
    use crate::wal::Lsn;
    use crate::wal::changes::RelRows;
    use crate::wal::decode::RelFileLocator;
    use crate::wal::pgtime::PgTime;

    fn loc(rel: u32) -> RelFileLocator {
        RelFileLocator {
            spc: 1663,
            db: 5,
            rel,
        }
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
                    relation(1259, 1259, "r", "pg_catalog", "pg_class", 0),
                    relation(100, 200, "r", "public", "orders", 0),
                    relation(101, 201, "i", "public", "orders_pkey", 100),
                ],
                schemas: vec![crate::basebackup::relmap::Schema {
                    oid: 16399,
                    name: "sales".into(),
                }],
                error: None,
            }],
        }
    }

    fn event(unlinked: Vec<RelFileLocator>, rows: Vec<RelRows>) -> ChangeEvent {
        ChangeEvent {
            lsn: Lsn(0x3000148),
            xid: 900,
            time: PgTime(0),
            db: Some(5),
            unlinked,
            unlinked_cut: false,
            truncated: vec![],
            dropped_database: None,
            drop_from: None,
            rows,
        }
    }

    fn none() -> WalNames {
        WalNames::default()
    }

    fn rows(rel: u32, deleted: u64, updated: u64) -> RelRows {
        RelRows {
            rel: loc(rel),
            deleted,
            updated,
        }
    }

    #[test]
    fn a_drop_names_the_table_once_for_all_its_files() {
        let e = event(vec![loc(200), loc(201)], vec![rows(1259, 2, 0), rows(2608, 5, 0)]);
        let Description {
            database: db,
            actions,
            notes,
            ..
        } = describe(&e, Some(&map()), &none(), 1000);
        assert_eq!(db.as_deref(), Some("app"));
        assert_eq!(actions.len(), 1);
        assert_eq!(actions[0].describe(), "DROP table public.orders");
        assert!(notes.is_empty());
    }

    #[test]
    fn new_files_for_the_same_relation_read_as_truncate_or_rewrite_and_say_why() {
        let e = event(vec![loc(200), loc(201)], vec![rows(1259, 0, 2)]);
        let Description { actions, notes, .. } = describe(&e, Some(&map()), &none(), 1000);
        assert_eq!(actions[0].kind, ActionKind::TruncateOrRewrite);
        assert_eq!(actions[0].object, "public.orders");
        assert!(notes[0].contains("does not tell a TRUNCATE from a rewrite"));
    }

    #[test]
    fn without_a_map_files_are_shown_by_number_and_drop_is_not_claimed() {
        let e = event(vec![loc(300)], vec![rows(1259, 1, 0)]);
        let Description {
            database: db,
            actions,
            ..
        } = describe(&e, None, &none(), 1000);
        assert_eq!(db.as_deref(), Some("database 5"));
        assert_eq!(actions[0].object, "file 1663/5/300");
        assert_eq!(actions[0].kind, ActionKind::DropOrRewrite);
        // A file created after the map was recorded, in a database it knows: pg_class says drop.
        let actions = describe(&e, Some(&map()), &none(), 1000).actions;
        assert_eq!(
            (actions[0].kind, actions[0].object.as_str()),
            (ActionKind::Drop, "file 1663/5/300")
        );
    }

    #[test]
    fn mass_deletes_and_updates_from_the_threshold_up_and_never_of_catalogs() {
        let e = event(
            vec![],
            vec![rows(200, 5000, 0), rows(1259, 3000, 0), rows(999, 10, 1500)],
        );
        let actions = describe(&e, Some(&map()), &none(), 1000).actions;
        let said: Vec<String> = actions.iter().map(Action::describe).collect();
        assert_eq!(
            said,
            vec![
                "DELETE of 5000 rows from table public.orders",
                "UPDATE of 1500 rows of relation file 1663/5/999"
            ]
        );
        let actions = describe(&e, Some(&map()), &none(), 6000).actions;
        assert!(actions.is_empty());
    }

    /// The rows the WAL carried for a table created after the map's backup, with its index
    /// and TOAST table.
    fn created_after_the_backup() -> WalNames {
        use crate::wal::catalog_rows::{CatalogRow, ClassRow, IndexRow};
        let row = |lsn: u64, oid: u32, name: &str, nsp: u32, kind: &str| CatalogRow {
            lsn: Lsn(lsn),
            xid: 800,
            db: 5,
            class: Some(ClassRow {
                oid,
                name: name.into(),
                namespace: nsp,
                filenode: oid,
                tablespace: 0,
                kind: kind.into(),
            }),
            namespace: None,
            index: None,
        };
        let mut index = row(0x2000300, 0, "", 0, "r");
        (index.class, index.index) = (
            None,
            Some(IndexRow {
                index: 16405,
                table: 16400,
            }),
        );
        let tli = crate::wal::lsn::tl(1);
        let cat = WalCatalog::of(vec![
            (tli, row(0x2000050, 16450, "invoices", 16399, "r")),
            (tli, row(0x2000100, 16400, "orders_2026", 2200, "r")),
            (tli, row(0x2000200, 16410, "pg_toast_16400", 99, "t")),
            (tli, index),
            (tli, row(0x2000300, 16405, "orders_2026_pkey", 2200, "i")),
        ]);
        let history = crate::timeline::TimelineHistory {
            timeline: tli,
            ancestors: vec![],
        };
        cat.before(&history, Lsn(0x3000148))
    }

    #[test]
    fn a_table_created_after_the_backup_is_named_from_the_wal_once_for_all_its_files() {
        let mut e = event(vec![loc(16400), loc(16405), loc(16410)], vec![rows(1259, 3, 0)]);
        // Minutes after the map's backup (20261122T143000Z).
        e.time = PgTime::from_unix_micros(1_795_358_000_000_000).unwrap();
        let d = describe(&e, Some(&map()), &created_after_the_backup(), 1000);
        let said: Vec<String> = d.actions.iter().map(Action::describe).collect();
        assert_eq!(said, ["DROP table public.orders_2026"]);
        assert_eq!(d.actions[0].named_from_wal.as_deref(), Some("0/2000100"));
        assert!(d.actions[0].extractable_table());
        assert!(
            d.notes[0].contains("public.orders_2026 named from the pg_class rows the WAL carries")
                && d.notes[0].contains("created after backup 20261122T143000Z"),
            "{:?}",
            d.notes
        );
        // Without a map, the WAL still names it, and tells a drop by pg_class's initdb file.
        let d = describe(&e, None, &created_after_the_backup(), 1000);
        assert_eq!(d.actions[0].describe(), "DROP table public.orders_2026");
        assert!(d.notes[0].contains("no backup before it recorded a relation map"));
        assert!(!d.database_named);
        // Named by the map of a backup taken after the event (none before it): said so.
        e.time = PgTime(0);
        let d = describe(&e, Some(&map()), &created_after_the_backup(), 1000);
        assert!(
            d.notes[0].contains("(the relation map of backup 20261122T143000Z does not know them)"),
            "{:?}",
            d.notes
        );
    }

    #[test]
    fn a_table_created_after_the_backup_in_an_older_schema_gets_the_schema_name_from_the_map() {
        let e = event(vec![loc(16450)], vec![rows(1259, 1, 0)]);
        let d = describe(&e, Some(&map()), &created_after_the_backup(), 1000);
        assert_eq!(d.actions[0].describe(), "DROP table sales.invoices");
        assert!(d.actions[0].extractable_table());
        let d = describe(&e, None, &created_after_the_backup(), 1000);
        assert_eq!(d.actions[0].describe(), "DROP table <schema 16399>.invoices");
        assert!(
            !d.actions[0].extractable_table(),
            "no extract of a table without its schema"
        );
    }

    #[test]
    fn each_table_gets_an_extract_and_a_dropped_database_a_restore_of_its_own() {
        let repo = crate::invocation::RepoInvocation {
            repo: "file:///var/lib/walvault".into(),
            config: None,
            retry_timeout: None,
            fallback_repo: None,
            key_file: None,
            key_command_left_out: false,
        };
        let command =
            AgentCommand::new("/usr/bin/restore-agent", "restore", &repo).args(["--pgdata", "/srv/new"]);
        let e = event(
            vec![loc(16400), loc(200)],
            vec![rows(1259, 2, 0), rows(999, 5000, 0)],
        );
        let d = describe(&e, Some(&map()), &created_after_the_backup(), 1000);
        let mut dropped = event(vec![], vec![]);
        dropped.dropped_database = Some(5);
        let dd = describe(&dropped, Some(&map()), &none(), 1000);
        assert!(
            dd.notes[0].contains("recorded by an older walvault"),
            "{:?}",
            dd.notes
        );
        dropped.drop_from = Some(Lsn(0x3000010));
        let notes = describe(&dropped, Some(&map()), &none(), 1000).notes;
        assert!(
            notes[0].contains("the restore stops before 0/3000010"),
            "{notes:?}"
        );
        let found = |d: Description, xid: u32| FoundEvent {
            time: "2026-11-22 14:40:00+00".into(),
            time_us: 0,
            xid,
            lsn: "0/3000148".into(),
            timeline: crate::wal::lsn::tl(1),
            database: d.database,
            database_named: d.database_named,
            actions: d.actions,
            names_from: None,
            restorable: true,
            restore_args: vec![
                "--target-xid".into(),
                xid.to_string(),
                "--target-exclusive".into(),
            ],
            notes: d.notes,
        };
        let report = FindReport::new(
            Found {
                events: vec![found(d, 900), found(dd, 901)],
                segments_not_searched: 0,
                segments_without_summary: 0,
            },
            &command,
        );
        let text = report.render();
        let target = "--target-xid 900 --target-exclusive";
        for t in ["public.orders", "public.orders_2026"] {
            let line = format!(
                "    extract just before it:  /usr/bin/restore-agent extract --repo file:///var/lib/walvault --database app --table {t} {target} --to {t}.dump\n"
            );
            assert!(text.contains(&line), "{line}\nin\n{text}");
        }
        assert!(
            !text.contains("--table file"),
            "no extract of what has no name:\n{text}"
        );
        let db = "    restore just the database:  /usr/bin/restore-agent restore --repo file:///var/lib/walvault --pgdata /srv/new --database app --target-xid 901 --target-exclusive\n";
        assert!(text.contains(db), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["events"][0]["extract_commands"].as_array().unwrap().len(), 2);
        assert!(
            json["events"][1]["extract_commands"][0]
                .as_str()
                .unwrap()
                .contains("--database app")
        );
        assert_eq!(json["events"][0]["actions"][0]["named_from_wal"], "0/2000100");
    }

    #[test]
    fn tables_match_with_or_without_their_schema() {
        assert!(names_table("public.orders", "orders"));
        assert!(names_table("public.orders", "public.orders"));
        assert!(!names_table("public.orders", "order"));
        assert!(!names_table("public.orders", "other.orders"));
    }
}
