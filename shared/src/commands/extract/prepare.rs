//! The restored copy, made ready to dump: the selection checked against what existed at the
//! target, the rows outside `--where` removed, and for `--into` every name the dump would create
//! moved out of the live database's way (the table or schema, and a table's indexes and owned
//! sequences), foreign keys to tables outside the selection left out (restoring them would add
//! triggers to live tables). All of it happens in the private copy, which is thrown away: the
//! live database only ever receives the dump.

use tokio_postgres::Client;

use super::options::{ExtractOptions, MAX_IDENTIFIER, QualifiedName, Selection, quote_ident, renamed};

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("database {database} did not exist at the target ({target}): it was dropped before it")]
    NoDatabase { database: String, target: String },
    #[error("table {table} did not exist in database {database} at the target ({target})")]
    NoTable {
        table: QualifiedName,
        database: String,
        target: String,
    },
    #[error("{table} is a {kind}, not a table: extract takes tables (and schemas)")]
    NotATable { table: QualifiedName, kind: String },
    #[error("schema {schema} did not exist in database {database} at the target ({target})")]
    NoSchema {
        schema: String,
        database: String,
        target: String,
    },
    #[error("--where {filter:?} on {table}: {source}")]
    Filter {
        filter: String,
        table: QualifiedName,
        source: tokio_postgres::Error,
    },
    #[error("preparing the restored copy: {0}")]
    Query(#[from] tokio_postgres::Error),
}

/// One table extracted.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExtractedTable {
    /// Its name at the target.
    pub recorded: QualifiedName,
    /// Its name in the dump (and the live database, with `--into`).
    pub delivered: QualifiedName,
    pub rows: i64,
}

/// The copy, ready to dump.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Prepared {
    pub tables: Vec<ExtractedTable>,
    /// Schemas extracted whole: (name at the target, name delivered).
    pub schemas: Vec<(String, String)>,
    /// Other objects renamed with their table: `index public.a -> public.a_restored_...`.
    pub renamed: Vec<String>,
    /// What the dump leaves out, and why.
    pub left_out: Vec<String>,
    /// Every relation name the dump creates (`--into` checks none is taken).
    #[serde(skip)]
    pub relations: Vec<QualifiedName>,
    /// `pg_dump`'s selection: `--table=...` or `--schema=...` arguments.
    #[serde(skip)]
    pub dump_args: Vec<String>,
}

/// Whether `database` exists in the recovered copy (a database dropped between the backup and
/// the target is restored from the backup, then dropped by replay). `c` is connected to
/// `postgres`.
pub async fn check_database(c: &Client, database: &str, target: &str) -> Result<(), CopyError> {
    let found = c
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
        .await?;
    match found {
        Some(_) => Ok(()),
        None => Err(CopyError::NoDatabase {
            database: database.to_string(),
            target: target.to_string(),
        }),
    }
}

/// Prepare the copy (connected as `c`) for `opts`; `rename` for `--into`.
pub async fn prepare(
    c: &Client,
    opts: &ExtractOptions,
    target: &str,
    rename: bool,
) -> Result<Prepared, CopyError> {
    let mut p = Prepared::default();
    match &opts.selection {
        Selection::Tables(tables) => {
            let wanted = with_partitions(c, tables, &opts.database, target).await?;
            let oids: Vec<u32> = wanted.iter().map(|w| w.oid).collect();
            let mut new_names: Vec<String> = Vec::new();
            for w in &wanted {
                // A named table gets its new name; a partition follows its parent's.
                let new_name = match w.parent {
                    None => opts.new_name(&w.name.name),
                    Some(i) => dependent_name(&w.name.name, &wanted[i].name.name, &new_names[i]),
                };
                new_names.push(new_name.clone());
                let how = TableWork {
                    oid: w.oid,
                    selected: &oids,
                    new_name: rename.then_some(new_name),
                    filter: w.parent.is_none(),
                };
                let table = prepare_table(c, opts, &w.name, how, &mut p).await?;
                p.relations.push(table.delivered.clone());
                p.dump_args.push(format!("--table={}", table.delivered.quoted()));
                p.tables.push(table);
            }
        }
        Selection::Schemas(schemas) => {
            for s in schemas {
                let delivered = prepare_schema(c, opts, s, schemas, target, rename, &mut p).await?;
                p.dump_args.push(format!("--schema={}", quote_ident(&delivered)));
                p.schemas.push((s.clone(), delivered));
            }
        }
    }
    Ok(p)
}

/// The oid of table `t`, which must have existed at the target.
async fn table_oid(c: &Client, t: &QualifiedName, database: &str, target: &str) -> Result<u32, CopyError> {
    let row = c
        .query_opt(
            "SELECT c.oid, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&t.schema, &t.name],
        )
        .await?;
    let Some(row) = row else {
        return Err(CopyError::NoTable {
            table: t.clone(),
            database: database.to_string(),
            target: target.to_string(),
        });
    };
    let kind: String = row.get(1);
    match kind.as_str() {
        "r" | "p" => Ok(row.get(0)),
        k => Err(CopyError::NotATable {
            table: t.clone(),
            kind: relkind_name(k).to_string(),
        }),
    }
}

fn relkind_name(kind: &str) -> &'static str {
    match kind {
        "v" => "view",
        "m" => "materialized view",
        "i" | "I" => "index",
        "S" => "sequence",
        "f" => "foreign table",
        "c" => "composite type",
        _ => "relation",
    }
}

/// A table to extract: named on the command line, or a partition of one (`parent`: its index
/// in the list).
struct Wanted {
    name: QualifiedName,
    oid: u32,
    parent: Option<usize>,
}

/// `tables` (each checked to have existed at the target) and, after them, every partition of a
/// partitioned one, at any depth: pg_dump's `--table` takes a partitioned table without its
/// partitions, which hold the rows.
async fn with_partitions(
    c: &Client,
    tables: &[QualifiedName],
    database: &str,
    target: &str,
) -> Result<Vec<Wanted>, CopyError> {
    let mut wanted = Vec::new();
    for t in tables {
        let oid = table_oid(c, t, database, target).await?;
        wanted.push(Wanted {
            name: t.clone(),
            oid,
            parent: None,
        });
    }
    let mut i = 0;
    while i < wanted.len() {
        let rows = c
            .query(
                "SELECT c.oid, n.nspname::text, c.relname::text FROM pg_inherits i \
                 JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE i.inhparent = $1 AND c.relispartition ORDER BY 3",
                &[&wanted[i].oid],
            )
            .await?;
        for r in rows {
            let oid: u32 = r.get(0);
            if wanted.iter().all(|w| w.oid != oid) {
                wanted.push(Wanted {
                    name: QualifiedName {
                        schema: r.get(1),
                        name: r.get(2),
                    },
                    oid,
                    parent: Some(i),
                });
            }
        }
        i += 1;
    }
    Ok(wanted)
}

/// What to do to one table: its `oid` among the `selected`, its `new_name` for `--into`, and
/// whether `--where` applies (to the tables named; their partitions are filtered with them).
struct TableWork<'a> {
    oid: u32,
    selected: &'a [u32],
    new_name: Option<String>,
    filter: bool,
}

/// Filter, count and (for `--into`) rename one table and what carries its name.
async fn prepare_table(
    c: &Client,
    opts: &ExtractOptions,
    t: &QualifiedName,
    how: TableWork<'_>,
    p: &mut Prepared,
) -> Result<ExtractedTable, CopyError> {
    if let Some(filter) = opts.row_filter.as_ref().filter(|_| how.filter) {
        c.batch_execute(&format!(
            "DELETE FROM {} WHERE NOT coalesce(({filter}), false)",
            t.quoted()
        ))
        .await
        .map_err(|source| CopyError::Filter {
            filter: filter.clone(),
            table: t.clone(),
            source,
        })?;
    }
    let rows: i64 = c
        .query_one(&format!("SELECT count(*) FROM {}", t.quoted()), &[])
        .await?
        .get(0);
    let mut delivered = t.clone();
    if let Some(new_name) = how.new_name {
        p.left_out
            .extend(drop_outside_foreign_keys(c, &[how.oid], how.selected).await?);
        delivered.name = new_name;
        for (kind, name) in dependents(c, how.oid).await? {
            let new = dependent_name(&name, &t.name, &delivered.name);
            let sql_kind = if kind == "index" { "INDEX" } else { "SEQUENCE" };
            c.batch_execute(&format!(
                "ALTER {sql_kind} {}.{} RENAME TO {}",
                quote_ident(&t.schema),
                quote_ident(&name),
                quote_ident(&new)
            ))
            .await?;
            p.renamed
                .push(format!("{kind} {}.{name} -> {}.{new}", t.schema, t.schema));
            p.relations.push(QualifiedName {
                schema: t.schema.clone(),
                name: new,
            });
        }
        c.batch_execute(&format!(
            "ALTER TABLE {} RENAME TO {}",
            t.quoted(),
            quote_ident(&delivered.name)
        ))
        .await?;
    }
    Ok(ExtractedTable {
        recorded: t.clone(),
        delivered,
        rows,
    })
}

/// The new name of an index or sequence `name` of table `table` renamed `new_table`: the
/// table's name in it replaced (`orders_pkey` of `orders_back`: `orders_back_pkey`), else the new
/// table's name appended; within PostgreSQL's identifier length.
pub fn dependent_name(name: &str, table: &str, new_table: &str) -> String {
    match name.strip_prefix(table) {
        Some(rest) => {
            let room = MAX_IDENTIFIER.saturating_sub(rest.len());
            let mut cut = new_table.len().min(room);
            while !new_table.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{}{rest}", &new_table[..cut])
        }
        None => renamed(name, new_table),
    }
}

/// The indexes of table `oid` and the sequences it owns (serial and identity columns), whose
/// names would collide with the live table's: (kind, name).
async fn dependents(c: &Client, oid: u32) -> Result<Vec<(String, String)>, CopyError> {
    let rows = c
        .query(
            "SELECT 'index', i.relname::text FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid \
             WHERE x.indrelid = $1 \
             UNION ALL \
             SELECT 'sequence', s.relname::text FROM pg_depend d JOIN pg_class s ON s.oid = d.objid \
             WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass \
             AND d.refobjid = $1 AND s.relkind = 'S' AND d.deptype IN ('a', 'i') \
             ORDER BY 1, 2",
            &[&oid],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Drop the foreign keys of tables `oids` that reference tables outside `selected`; what was
/// left out, for the report.
async fn drop_outside_foreign_keys(
    c: &Client,
    oids: &[u32],
    selected: &[u32],
) -> Result<Vec<String>, CopyError> {
    let rows = c
        .query(
            "SELECT conname::text, conrelid::regclass::text, confrelid::regclass::text \
             FROM pg_constraint WHERE contype = 'f' AND conrelid = ANY($1) AND NOT confrelid = ANY($2) \
             ORDER BY 2, 1",
            &[&oids, &selected],
        )
        .await?;
    let mut left = Vec::new();
    for r in rows {
        let (name, table, referenced): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        // regclass prints the name quoted, and schema-qualified unless on the search path.
        c.batch_execute(&format!(
            "ALTER TABLE {table} DROP CONSTRAINT {}",
            quote_ident(&name)
        ))
        .await?;
        left.push(format!(
            "foreign key {name} of {table} referencing {referenced} (restoring it would add a trigger to that live table)"
        ));
    }
    Ok(left)
}

/// Check, filter-free, and (for `--into`) rename schema `s`; its delivered name.
async fn prepare_schema(
    c: &Client,
    opts: &ExtractOptions,
    s: &str,
    selected: &[String],
    target: &str,
    rename: bool,
    p: &mut Prepared,
) -> Result<String, CopyError> {
    let exists = c
        .query_opt("SELECT oid FROM pg_namespace WHERE nspname = $1", &[&s])
        .await?;
    if exists.is_none() {
        return Err(CopyError::NoSchema {
            schema: s.to_string(),
            database: opts.database.clone(),
            target: target.to_string(),
        });
    }
    let tables = c
        .query(
            "SELECT c.oid, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') ORDER BY 2",
            &[&s],
        )
        .await?;
    let delivered = if rename { opts.new_name(s) } else { s.to_string() };
    if rename {
        let oids: Vec<u32> = tables.iter().map(|r| r.get(0)).collect();
        let inside: Vec<u32> = c
            .query(
                "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p')",
                &[&selected],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        p.left_out
            .extend(drop_outside_foreign_keys(c, &oids, &inside).await?);
        c.batch_execute(&format!(
            "ALTER SCHEMA {} RENAME TO {}",
            quote_ident(s),
            quote_ident(&delivered)
        ))
        .await?;
    }
    for r in &tables {
        let name: String = r.get(1);
        let delivered_table = QualifiedName {
            schema: delivered.clone(),
            name: name.clone(),
        };
        let rows: i64 = c
            .query_one(&format!("SELECT count(*) FROM {}", delivered_table.quoted()), &[])
            .await?
            .get(0);
        p.tables.push(ExtractedTable {
            recorded: QualifiedName {
                schema: s.to_string(),
                name,
            },
            delivered: delivered_table,
            rows,
        });
    }
    Ok(delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_and_sequences_follow_their_table_s_new_name() {
        assert_eq!(
            dependent_name("orders_pkey", "orders", "orders_back"),
            "orders_back_pkey"
        );
        assert_eq!(
            dependent_name("orders_id_seq", "orders", "orders_back"),
            "orders_back_id_seq"
        );
        assert_eq!(
            dependent_name("by_customer", "orders", "orders_back"),
            "by_customer_orders_back"
        );
        let long = "o".repeat(60);
        let n = dependent_name("orders_customer_idx", "orders", &long);
        assert_eq!(n.len(), MAX_IDENTIFIER);
        assert!(n.ends_with("_customer_idx"));
    }
}
