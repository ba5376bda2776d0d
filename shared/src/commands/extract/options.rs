//! What `extract` is asked for ([`ExtractOptions`]): which tables or schemas of which database,
//! at which target, delivered where, and the names the copies get in the live database. Pure:
//! checked before anything is read or created.

use std::path::PathBuf;

use crate::commands::restore::{RecoveryTarget, TimelineTarget};

/// PostgreSQL's longest identifier, in bytes (`NAMEDATALEN - 1`).
pub const MAX_IDENTIFIER: usize = 63;

/// What `extract` refuses before reading anything.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectionError {
    #[error("name at least one --table or --schema")]
    Nothing,
    #[error("--table and --schema cannot be combined: extract tables, or whole schemas")]
    Both,
    #[error(
        "{0:?}: not a table name (SCHEMA.NAME, NAME for public.NAME; double quotes for other characters)"
    )]
    BadTable(String),
    #[error("{0:?}: not a schema name")]
    BadSchema(String),
    #[error("{0:?}: longer than PostgreSQL's {MAX_IDENTIFIER}-byte names")]
    TooLong(String),
    #[error("--rename-to names one table or schema; {0} are extracted")]
    RenameMany(usize),
    #[error("--where filters the rows of tables; it does not go with --schema")]
    WhereWithSchemas,
    #[error("--to {0}: the file exists; extract never overwrites")]
    DumpExists(PathBuf),
}

/// A schema-qualified relation name, as PostgreSQL stores it (unquoted).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct QualifiedName {
    pub schema: String,
    pub name: String,
}

impl QualifiedName {
    /// `name` (in public), `schema.name`, either part double-quoted (`""` for a quote); unquoted
    /// parts fold to lower case, as PostgreSQL folds them.
    pub fn parse(text: &str) -> Result<QualifiedName, SelectionError> {
        let bad = || SelectionError::BadTable(text.to_string());
        let parts = split_identifiers(text).ok_or_else(bad)?;
        let (schema, name) = match parts.as_slice() {
            [name] => ("public".to_string(), name.clone()),
            [schema, name] => (schema.clone(), name.clone()),
            _ => return Err(bad()),
        };
        for part in [&schema, &name] {
            if part.len() > MAX_IDENTIFIER {
                return Err(SelectionError::TooLong(part.clone()));
            }
        }
        Ok(QualifiedName { schema, name })
    }

    /// Quoted for SQL and for pg_dump's `--table` (where quotes make every character literal).
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl std::fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// A schema name from the command line, folded and unquoted as PostgreSQL reads it.
pub fn parse_schema(text: &str) -> Result<String, SelectionError> {
    match split_identifiers(text).as_deref() {
        Some([one]) if one.len() <= MAX_IDENTIFIER => Ok(one.clone()),
        Some([one]) => Err(SelectionError::TooLong(one.clone())),
        _ => Err(SelectionError::BadSchema(text.to_string())),
    }
}

/// The dot-separated identifiers of `text`, unquoted; `None` when it is not a list of them.
fn split_identifiers(text: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    '"' => break,
                    c => part.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if !(c.is_alphanumeric() || c == '_' || c == '$') {
                    return None;
                }
                part.extend(c.to_lowercase());
                chars.next();
            }
            if part.is_empty() || part.starts_with(|c: char| c.is_ascii_digit() || c == '$') {
                return None;
            }
        }
        if part.is_empty() {
            return None;
        }
        parts.push(part);
        match chars.next() {
            None => return Some(parts),
            Some('.') => continue,
            Some(_) => return None,
        }
    }
}

/// `name` quoted as an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` quoted as an SQL string literal (standard_conforming_strings, PostgreSQL's default).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// What is extracted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    Tables(Vec<QualifiedName>),
    Schemas(Vec<String>),
}

impl Selection {
    /// From `--table` and `--schema` as given.
    pub fn parse(tables: &[String], schemas: &[String]) -> Result<Selection, SelectionError> {
        match (tables.is_empty(), schemas.is_empty()) {
            (true, true) => Err(SelectionError::Nothing),
            (false, false) => Err(SelectionError::Both),
            (false, true) => {
                let mut parsed = tables
                    .iter()
                    .map(|t| QualifiedName::parse(t))
                    .collect::<Result<Vec<_>, _>>()?;
                parsed.sort();
                parsed.dedup();
                Ok(Selection::Tables(parsed))
            }
            (true, false) => {
                let mut parsed = schemas
                    .iter()
                    .map(|s| parse_schema(s))
                    .collect::<Result<Vec<_>, _>>()?;
                parsed.sort();
                parsed.dedup();
                Ok(Selection::Schemas(parsed))
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Selection::Tables(t) => t.len(),
            Selection::Schemas(s) => s.len(),
        }
    }
}

/// Where the extracted objects go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A custom-format dump (`pg_restore` reads it), names as recorded.
    File(PathBuf),
    /// Into a live database (a libpq connection string), under new names, in one transaction.
    Into {
        conninfo: String,
        /// The new name of the one table or schema [default: `<name>_restored_<target>`].
        rename_to: Option<String>,
    },
}

/// How to extract.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// The database (a name, or an oid) holding the selection.
    pub database: String,
    pub selection: Selection,
    /// Only the rows for which this SQL condition holds, as evaluated in the restored copy.
    pub row_filter: Option<String>,
    pub destination: Destination,
    pub target: RecoveryTarget,
    pub timeline: TimelineTarget,
    pub exclusive: bool,
    /// Directory holding `postgres` and `pg_ctl` of the backup's version (and perhaps pg_dump).
    pub pg_bin: Option<PathBuf>,
    /// Where the scratch directory is made [default: the temp dir].
    pub scratch: Option<PathBuf>,
    /// The OS user PostgreSQL runs as when extract runs as root.
    pub run_as: Option<String>,
    /// Longest wait for the private server's recovery.
    pub timeout: std::time::Duration,
    pub parallel: usize,
    /// The restore_command the private server runs.
    pub restore_command: String,
    /// Keep the scratch directory (for a look after a failure).
    pub keep: bool,
}

impl ExtractOptions {
    /// Everything that can be refused from the options alone.
    pub fn check(&self) -> Result<(), SelectionError> {
        if self.row_filter.is_some() && matches!(self.selection, Selection::Schemas(_)) {
            return Err(SelectionError::WhereWithSchemas);
        }
        if let Destination::Into {
            rename_to: Some(name),
            ..
        } = &self.destination
        {
            if self.selection.len() != 1 {
                return Err(SelectionError::RenameMany(self.selection.len()));
            }
            if name.is_empty() || name.len() > MAX_IDENTIFIER {
                return Err(SelectionError::TooLong(name.clone()));
            }
        }
        if let Destination::File(path) = &self.destination
            && std::fs::symlink_metadata(path).is_ok()
        {
            return Err(SelectionError::DumpExists(path.clone()));
        }
        Ok(())
    }

    /// The suffix of the default names: `restored_<what the target names>`.
    pub fn suffix(&self) -> String {
        let what = match &self.target {
            RecoveryTarget::Time(us) => crate::time::format_compact(us.div_euclid(1_000_000)),
            RecoveryTarget::Lsn(lsn) => format!("lsn_{}", lsn.to_string().replace('/', "_")),
            RecoveryTarget::Xid(x) => format!("xid_{x}"),
            RecoveryTarget::Name(n) => n.clone(),
            RecoveryTarget::Immediate => "backup".into(),
            RecoveryTarget::End => "latest".into(),
        };
        let what: String = what
            .chars()
            .map(|c| match c.is_ascii_alphanumeric() {
                true => c.to_ascii_lowercase(),
                false => '_',
            })
            .collect();
        format!("restored_{what}")
    }

    /// The name `name` gets in the live database: `--rename-to`, else `<name>_<suffix>`.
    pub fn new_name(&self, name: &str) -> String {
        match &self.destination {
            Destination::Into {
                rename_to: Some(r), ..
            } => r.clone(),
            _ => renamed(name, &self.suffix()),
        }
    }
}

/// `<name>_<suffix>` within PostgreSQL's identifier length: `name` is cut (at a character
/// boundary) so that the suffix, which tells what the copy is, stays whole.
pub fn renamed(name: &str, suffix: &str) -> String {
    let room = MAX_IDENTIFIER.saturating_sub(suffix.len() + 1);
    let mut cut = name.len().min(room);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{suffix}", &name[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(destination: Destination, selection: Selection, target: RecoveryTarget) -> ExtractOptions {
        ExtractOptions {
            database: "shop".into(),
            selection,
            row_filter: None,
            destination,
            target,
            timeline: TimelineTarget::Latest,
            exclusive: false,
            pg_bin: None,
            scratch: None,
            run_as: None,
            timeout: std::time::Duration::from_secs(60),
            parallel: 4,
            restore_command: "true".into(),
            keep: false,
        }
    }

    #[test]
    fn table_names_read_as_postgresql_reads_them() {
        let q = |s: &str| QualifiedName::parse(s).map(|n| n.to_string());
        assert_eq!(q("orders").unwrap(), "public.orders");
        assert_eq!(q("Sales.Orders").unwrap(), "sales.orders");
        assert_eq!(q("\"Sales\".\"Or.ders\"").unwrap(), "Sales.Or.ders");
        assert_eq!(q("s.\"a\"\"b\"").unwrap(), "s.a\"b");
        for bad in ["", ".x", "a.b.c", "a b", "x;drop", "1x", "\"open", "a.", "\"\""] {
            assert!(q(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(matches!(
            QualifiedName::parse(&"x".repeat(64)),
            Err(SelectionError::TooLong(_))
        ));
        let n = QualifiedName::parse("\"We\"\"ird\".t").unwrap();
        assert_eq!(n.quoted(), "\"We\"\"ird\".\"t\"");
    }

    #[test]
    fn a_selection_is_tables_or_schemas_never_both_never_nothing() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(Selection::parse(&[], &[]), Err(SelectionError::Nothing));
        assert_eq!(
            Selection::parse(&s(&["a"]), &s(&["b"])),
            Err(SelectionError::Both)
        );
        assert_eq!(
            Selection::parse(&s(&["b", "public.a", "a"]), &[]).unwrap(),
            Selection::Tables(vec![
                QualifiedName::parse("a").unwrap(),
                QualifiedName::parse("b").unwrap()
            ])
        );
        assert_eq!(
            Selection::parse(&[], &s(&["Sales"])).unwrap(),
            Selection::Schemas(vec!["sales".into()])
        );
    }

    #[test]
    fn default_names_say_which_moment_the_copy_is_of_and_fit_postgresql() {
        let into = Destination::Into {
            conninfo: "dbname=shop".into(),
            rename_to: None,
        };
        let tables = Selection::Tables(vec![QualifiedName::parse("orders").unwrap()]);
        // 2026-11-25 14:31:59 UTC.
        let at = RecoveryTarget::Time(1_795_617_119_000_000);
        let o = opts(into.clone(), tables.clone(), at);
        assert_eq!(o.new_name("orders"), "orders_restored_20261125t143159z");
        let long = o.new_name(&"x".repeat(63));
        assert_eq!(long.len(), 63);
        assert!(long.ends_with("_restored_20261125t143159z"));
        let o = opts(into, tables, RecoveryTarget::Lsn("0/16B3748".parse().unwrap()));
        assert_eq!(o.new_name("orders"), "orders_restored_lsn_0_16b3748");
    }

    #[test]
    fn rename_to_names_exactly_one_object_and_a_dump_never_overwrites() {
        let into = |r: &str| Destination::Into {
            conninfo: "dbname=shop".into(),
            rename_to: Some(r.into()),
        };
        let two = Selection::Tables(vec![
            QualifiedName::parse("a").unwrap(),
            QualifiedName::parse("b").unwrap(),
        ]);
        let one = Selection::Schemas(vec!["sales".into()]);
        assert_eq!(
            opts(into("x"), two, RecoveryTarget::End).check(),
            Err(SelectionError::RenameMany(2))
        );
        let o = opts(into("sales_then"), one.clone(), RecoveryTarget::End);
        assert_eq!(o.check(), Ok(()));
        assert_eq!(o.new_name("sales"), "sales_then");
        let existing = std::env::temp_dir();
        assert_eq!(
            opts(Destination::File(existing.clone()), one, RecoveryTarget::End).check(),
            Err(SelectionError::DumpExists(existing))
        );
    }
}
