//! The live database `--into` restores into, reached with the client programs (`psql`,
//! `pg_restore`) so that every libpq setting the DBA relies on applies (`PGPASSWORD`,
//! `~/.pgpass`, `sslmode`, service files): which of the names extract would create are taken,
//! and loading the dump in one transaction.

use std::path::Path;

use super::options::{QualifiedName, quote_literal};
use super::tools::{ClientTools, ToolError, run};

/// The relations and schemas among `relations` and `schemas` that exist in the live database:
/// as `schema.name` and `schema <name>`.
pub async fn taken(
    tools: &ClientTools,
    conninfo: &str,
    relations: &[QualifiedName],
    schemas: &[String],
) -> Result<Vec<String>, ToolError> {
    let mut probes = vec!["SELECT NULL::text WHERE false".to_string()];
    for r in relations {
        probes.push(format!(
            "SELECT {} WHERE to_regclass(quote_ident({}) || '.' || quote_ident({})) IS NOT NULL",
            quote_literal(&r.to_string()),
            quote_literal(&r.schema),
            quote_literal(&r.name)
        ));
    }
    for s in schemas {
        probes.push(format!(
            "SELECT {} FROM pg_namespace WHERE nspname = {}",
            quote_literal(&format!("schema {s}")),
            quote_literal(s)
        ));
    }
    let out = psql(tools, conninfo, &probes.join(" UNION ALL ")).await?;
    Ok(out
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Run one query with `psql` against `conninfo`; its unaligned output.
async fn psql(tools: &ClientTools, conninfo: &str, sql: &str) -> Result<String, ToolError> {
    let mut c = tools.command("psql");
    c.args([
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        conninfo,
        "-c",
        sql,
    ]);
    run("psql", c).await
}

/// Load `dump` into the live database in one transaction: everything or nothing. Owned by the
/// role connecting, without the recorded grants (a copy beside the live objects is the DBA's
/// to look at before anyone else).
pub async fn load(tools: &ClientTools, conninfo: &str, dump: &Path) -> Result<(), ToolError> {
    let mut c = tools.command("pg_restore");
    c.args([
        "--single-transaction",
        "--exit-on-error",
        "--no-owner",
        "--no-acl",
        "-d",
        conninfo,
    ])
    .arg(dump);
    run("pg_restore", c).await.map(|_| ())
}

/// Row counts of `tables` in the live database, in order.
pub async fn rows(
    tools: &ClientTools,
    conninfo: &str,
    tables: &[QualifiedName],
) -> Result<Vec<i64>, ToolError> {
    let mut counts = Vec::new();
    for t in tables {
        let out = psql(tools, conninfo, &format!("SELECT count(*) FROM {}", t.quoted())).await?;
        counts.push(out.trim().parse().unwrap_or(-1));
    }
    Ok(counts)
}

/// `conninfo` without its password, for messages and reports: `password=...` in a key/value
/// string, `user:password@` in a URI.
pub fn redact(conninfo: &str) -> String {
    if let Some(rest) = conninfo
        .strip_prefix("postgresql://")
        .or_else(|| conninfo.strip_prefix("postgres://"))
    {
        let scheme = &conninfo[..conninfo.len() - rest.len()];
        let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        if let Some((userinfo, host)) = authority.rsplit_once('@')
            && let Some((user, _)) = userinfo.split_once(':')
        {
            return format!("{scheme}{user}:***@{host}{tail}");
        }
        return conninfo.to_string();
    }
    conninfo
        .split_whitespace()
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.trim() == "password" => "password=***".to_string(),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_a_report() {
        assert_eq!(
            redact("host=db dbname=shop password=s3cret"),
            "host=db dbname=shop password=***"
        );
        assert_eq!(
            redact("postgresql://app:s3cret@db:5432/shop?sslmode=require"),
            "postgresql://app:***@db:5432/shop?sslmode=require"
        );
        assert_eq!(redact("postgresql://app@db/shop"), "postgresql://app@db/shop");
        assert_eq!(redact("dbname=shop"), "dbname=shop");
    }
}
