//! The server the stream comes from: connecting over the host list, identifying the cluster,
//! the replication slot, timeline histories and the start of streaming. A thin layer over
//! `pg_walstream`'s native connection (its TLS, SCRAM and wire protocol); its calls block on
//! the daemon's multi-thread runtime (`block_in_place`), which is what it expects.

use pg_walstream::ReplicationError;
use pg_walstream::connection::PgReplicationConnection;

use super::conninfo::{Host, Target};
use crate::wal::{Lsn, TimelineId};

/// Why the stream could not start or went on no further.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{host}: {message}")]
    Server {
        host: String,
        message: String,
        permanent: bool,
    },
    #[error("no server in {hosts} accepts {wanted} connections: {tried}")]
    NoneSuitable {
        hosts: String,
        wanted: String,
        tried: String,
    },
    #[error("{host} answered {what} with {got:?}, which walvault cannot read")]
    Unreadable {
        host: String,
        what: &'static str,
        got: String,
    },
}

impl SourceError {
    /// Whether retrying later can help (a server down, a failover in progress), as opposed to
    /// a refusal that needs a person (a password, a privilege, `wal_level`).
    pub fn is_permanent(&self) -> bool {
        match self {
            SourceError::Server { permanent, .. } => *permanent,
            SourceError::NoneSuitable { .. } => false,
            SourceError::Unreadable { .. } => true,
        }
    }
}

pub(super) fn server_error(host: &str, e: &ReplicationError) -> SourceError {
    let m = e.to_string();
    // Refusals a retry cannot change: no pg_hba.conf line, a wrong password, no REPLICATION
    // attribute, no such database or object, a server not set up for it. A server starting up,
    // shutting down or full (57P03, 57P01, 53300) is retried.
    let permanent = match sqlstate(&m) {
        Some(code) => ["28000", "28P01", "42501", "3D000", "42704", "55000", "0A000"].contains(&code),
        None => matches!(
            e,
            ReplicationError::Authentication(_)
                | ReplicationError::PermanentConnection(_)
                | ReplicationError::Config(_)
        ),
    };
    let mut message = one_line(&e.to_string());
    // wal_level = minimal requires max_wal_senders = 0: the refusal comes before any question.
    let no_senders = message.contains("max_wal_senders (currently 0)");
    if no_senders {
        message.push_str(
            "; streaming needs wal_level = replica and max_wal_senders > 0 in postgresql.conf, and a restart",
        );
    }
    SourceError::Server {
        host: host.to_string(),
        message,
        permanent: permanent || no_senders,
    }
}

/// The SQLSTATE a server error carries, as pg_walstream spells it (`[28P01] ...` or
/// `... (SQLSTATE 28P01)`).
fn sqlstate(m: &str) -> Option<&str> {
    fn code(s: &str) -> Option<&str> {
        s.get(..5)
            .filter(|c| c.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()))
    }
    if let Some(i) = m.find('[')
        && m.get(i + 6..i + 7) == Some("]")
    {
        return code(&m[i + 1..]);
    }
    m.find("SQLSTATE ").and_then(|i| code(&m[i + 9..]))
}

/// The message on one line, without pg_walstream's wrapper words.
fn one_line(s: &str) -> String {
    let s = s
        .trim_start_matches("Protocol parsing error: ")
        .trim_start_matches("Transient connection error: ")
        .trim_start_matches("Permanent connection error: ");
    s.lines().next().unwrap_or(s).trim().to_string()
}

/// What `IDENTIFY_SYSTEM` and a few settings say about the server.
#[derive(Debug, Clone)]
pub struct Identity {
    pub system_id: u64,
    pub timeline: TimelineId,
    /// The server's flush position (a standby's replay position).
    pub position: Lsn,
    pub segment_size: u32,
    pub in_recovery: bool,
    pub server_version: i32,
}

/// A connection to one server, not streaming yet.
pub struct Source {
    pub(super) conn: PgReplicationConnection,
    pub host: String,
    /// The server's entry in the host list (for the slot watch's own connection).
    pub target: Host,
    pub identity: Identity,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("host", &self.host)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Connect to the first server of `target` that `target_session_attrs` accepts, as libpq does:
/// each host in order; with `prefer-standby`, a second pass takes any.
pub fn connect(target: &Target) -> Result<Source, SourceError> {
    let mut tried = Vec::new();
    let mut fallback = None;
    let mut refusal = None;
    for host in &target.hosts {
        match open(host, &target.application_name) {
            Ok(s) if target.session.accepts(s.identity.in_recovery) => return Ok(s),
            Ok(s) => {
                let role = if s.identity.in_recovery {
                    "a standby"
                } else {
                    "a primary"
                };
                tried.push(format!("{} is {role}", host.label));
                if fallback.is_none() && target.session == super::conninfo::SessionAttrs::PreferStandby {
                    fallback = Some(s);
                }
            }
            // Only one host: its own error says it best.
            Err(e) if target.hosts.len() == 1 => return Err(e),
            Err(e) => {
                tried.push(e.to_string());
                if e.is_permanent() && refusal.is_none() {
                    refusal = Some(e);
                }
            }
        }
    }
    if let Some(s) = fallback {
        return Ok(s);
    }
    // A refusal that needs a person is the error to show, once no other host would do.
    if let Some(e) = refusal {
        return Err(e);
    }
    Err(SourceError::NoneSuitable {
        hosts: target
            .hosts
            .iter()
            .map(|h| h.label.as_str())
            .collect::<Vec<_>>()
            .join(","),
        wanted: format!("{:?}", target.session).to_lowercase(),
        tried: tried.join("; "),
    })
}

fn open(host: &Host, application_name: &str) -> Result<Source, SourceError> {
    let label = host.label.clone();
    let err = |e: ReplicationError| server_error(&label, &e);
    let mut conn = PgReplicationConnection::connect(&host.conninfo).map_err(err)?;
    conn.exec(&format!(
        "SET application_name = {}",
        quote_literal(application_name)
    ))
    .map_err(err)?;
    let wal_level = show(&mut conn, &label, "wal_level")?;
    if wal_level == "minimal" {
        return Err(SourceError::Server {
            host: label,
            message: "wal_level is minimal: streaming needs wal_level = replica (or logical) in postgresql.conf, and a restart".into(),
            permanent: true,
        });
    }
    let in_recovery = query_one(&mut conn, &label, "SELECT pg_is_in_recovery()")? == "t";
    let segment_size =
        parse_size(&show(&mut conn, &label, "wal_segment_size")?).ok_or_else(|| SourceError::Unreadable {
            host: label.clone(),
            what: "SHOW wal_segment_size",
            got: "?".into(),
        })?;
    let r = conn.identify_system().map_err(err)?;
    let field = |i: i32, what: &'static str| {
        r.get_value(0, i).ok_or_else(|| SourceError::Unreadable {
            host: label.clone(),
            what,
            got: String::new(),
        })
    };
    let (sys, tli, pos) = (
        field(0, "IDENTIFY_SYSTEM")?,
        field(1, "IDENTIFY_SYSTEM")?,
        field(2, "IDENTIFY_SYSTEM")?,
    );
    let unreadable = |got: &str| SourceError::Unreadable {
        host: label.clone(),
        what: "IDENTIFY_SYSTEM",
        got: got.to_string(),
    };
    let identity = Identity {
        system_id: sys.parse().map_err(|_| unreadable(&sys))?,
        timeline: tli
            .parse()
            .ok()
            .and_then(TimelineId::new)
            .ok_or_else(|| unreadable(&tli))?,
        position: pos.parse().map_err(|_| unreadable(&pos))?,
        segment_size,
        in_recovery,
        server_version: conn.server_version(),
    };
    Ok(Source {
        conn,
        host: label,
        target: host.clone(),
        identity,
    })
}

/// `wal_segment_size` as SHOW prints it (`16MB`, `1GB`).
fn parse_size(s: &str) -> Option<u32> {
    let (n, mult) = if let Some(n) = s.strip_suffix("MB") {
        (n, 1u32 << 20)
    } else if let Some(n) = s.strip_suffix("GB") {
        (n, 1 << 30)
    } else {
        (s.strip_suffix("kB")?, 1 << 10)
    };
    n.trim().parse::<u32>().ok()?.checked_mul(mult)
}

pub(super) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn show(conn: &mut PgReplicationConnection, host: &str, setting: &str) -> Result<String, SourceError> {
    query_one(conn, host, &format!("SHOW {setting}"))
}

pub(super) fn query_one(
    conn: &mut PgReplicationConnection,
    host: &str,
    sql: &str,
) -> Result<String, SourceError> {
    let r = conn.exec(sql).map_err(|e| server_error(host, &e))?;
    Ok(r.get_value(0, 0).unwrap_or_default())
}

/// The slot's state through an ordinary session to `host` (no walsender, so it counts against
/// neither `max_wal_senders` nor the stream), opened for this one question.
pub fn slot_state(host: &Host, name: &str) -> Result<Option<SlotState>, SourceError> {
    let mut conn =
        PgReplicationConnection::connect(&host.plain_conninfo).map_err(|e| server_error(&host.label, &e))?;
    read_slot(&mut conn, &host.label, name)
}

/// The slot's state as `pg_replication_slots` gives it on `conn`, or `None` when there is no
/// such slot; a slot of that name that is not physical is refused.
fn read_slot(
    conn: &mut PgReplicationConnection,
    host: &str,
    name: &str,
) -> Result<Option<SlotState>, SourceError> {
    let sql = format!(
        "SELECT restart_lsn, wal_status, safe_wal_size, slot_type FROM pg_replication_slots WHERE slot_name = {}",
        quote_literal(name)
    );
    let r = conn.exec(&sql).map_err(|e| server_error(host, &e))?;
    if r.ntuples() == 0 {
        return Ok(None);
    }
    if r.get_value(0, 3).as_deref() != Some("physical") {
        return Err(SourceError::Server {
            host: host.to_string(),
            message: format!("replication slot {name:?} exists but is not a physical slot"),
            permanent: true,
        });
    }
    Ok(Some(SlotState {
        restart_lsn: r.get_value(0, 0).and_then(|s| s.parse().ok()),
        wal_status: r.get_value(0, 1),
        safe_wal_size: r.get_value(0, 2).and_then(|s| s.parse().ok()),
    }))
}

/// What the server says of the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot is in danger (`safe_wal_size`).
    pub safe_wal_size: Option<i64>,
}

impl Source {
    /// The slot's state, or `None` when there is no such slot.
    pub fn slot(&mut self, name: &str) -> Result<Option<SlotState>, SourceError> {
        read_slot(&mut self.conn, &self.host, name)
    }

    /// Create the physical slot, reserving WAL from now on.
    pub fn create_slot(&mut self, name: &str) -> Result<(), SourceError> {
        self.conn
            .exec(&format!(
                "CREATE_REPLICATION_SLOT {} PHYSICAL RESERVE_WAL",
                quote_ident(name)
            ))
            .map_err(|e| server_error(&self.host, &e))?;
        Ok(())
    }

    /// The history file of `timeline` (`TIMELINE_HISTORY`): its name and content.
    pub fn timeline_history(&mut self, timeline: TimelineId) -> Result<(String, Vec<u8>), SourceError> {
        let r = self
            .conn
            .exec(&format!("TIMELINE_HISTORY {}", timeline.get()))
            .map_err(|e| server_error(&self.host, &e))?;
        match (r.get_value(0, 0), r.get_value(0, 1)) {
            (Some(name), Some(content)) => Ok((name, content.into_bytes())),
            _ => Err(SourceError::Unreadable {
                host: self.host.clone(),
                what: "TIMELINE_HISTORY",
                got: String::new(),
            }),
        }
    }

    /// `START_REPLICATION [SLOT s] PHYSICAL start TIMELINE t`; the connection streams from now on.
    pub fn start(
        mut self,
        slot: Option<&str>,
        start: Lsn,
        timeline: TimelineId,
    ) -> Result<Streaming, SourceError> {
        self.conn
            .start_physical_replication(slot, start.0, Some(timeline.get()))
            .map_err(|e| server_error(&self.host, &e))?;
        Ok(Streaming {
            conn: self.conn,
            host: self.host,
            cancel: pg_walstream::CancellationToken::new(),
        })
    }
}

/// A connection in streaming mode.
pub struct Streaming {
    conn: PgReplicationConnection,
    pub host: String,
    cancel: pg_walstream::CancellationToken,
}

impl std::fmt::Debug for Streaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streaming")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Streaming {
    /// The next CopyData payload. Cancel-safe only through the connection being dropped after.
    pub async fn next(&mut self) -> Result<bytes::Bytes, SourceError> {
        self.conn
            .get_copy_data_async(&self.cancel)
            .await
            .map_err(|e| server_error(&self.host, &e))
    }

    /// A standby status update: received, durable (in the repository) and applied (the same:
    /// nothing is replayed here).
    pub async fn status(&mut self, received: Lsn, flushed: Lsn, reply: bool) -> Result<(), SourceError> {
        self.conn
            .send_standby_status_update(received.0, flushed.0, flushed.0, reply)
            .await
            .map_err(|e| server_error(&self.host, &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_segment_sizes_as_show_prints_them() {
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("1024kB"), Some(1 << 20));
        assert_eq!(parse_size("16"), None);
    }

    #[test]
    fn sqlstates_are_found_where_pg_walstream_puts_them() {
        assert_eq!(sqlstate("[28P01] Authentication failed: FATAL: x"), Some("28P01"));
        assert_eq!(
            sqlstate("FATAL: password authentication failed (SQLSTATE 28P01)"),
            Some("28P01")
        );
        assert_eq!(
            sqlstate("requested WAL segment 0/55000000 has been removed"),
            None
        );
    }

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_literal("wal'vault"), "'wal''vault'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
