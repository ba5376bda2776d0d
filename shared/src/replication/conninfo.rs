//! The `--pg-url` of a streaming daemon: libpq's two spellings (`key=value ...` and
//! `postgresql://...`), with several hosts and `target_session_attrs`, which the replication
//! client (`pg_walstream`) does not honour itself. Parsed here into one connection string per
//! host, which the client does understand, and the rule each host must pass.
//!
//! Each host's string asks for a database walsender (`replication=database`): it runs physical
//! replication commands like any walsender, and it also takes `SET application_name`, which the
//! client does not send at startup, so that `synchronous_standby_names` can name the daemon.

use std::fmt;

/// Why a connection string is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid connection string: {0}")]
pub struct ConnInfoError(String);

/// Which servers a connection may settle on (libpq's `target_session_attrs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAttrs {
    Any,
    /// `read-write` and `primary`: a server not in recovery.
    ReadWrite,
    /// `read-only` and `standby`: a server in recovery.
    Standby,
    /// A standby if one answers, else any.
    PreferStandby,
}

impl SessionAttrs {
    fn parse(s: &str) -> Result<SessionAttrs, ConnInfoError> {
        match s {
            "any" => Ok(SessionAttrs::Any),
            "read-write" | "primary" => Ok(SessionAttrs::ReadWrite),
            "read-only" | "standby" => Ok(SessionAttrs::Standby),
            "prefer-standby" => Ok(SessionAttrs::PreferStandby),
            other => Err(ConnInfoError(format!(
                "target_session_attrs={other:?} (expected any, read-write, primary, read-only, standby or prefer-standby)"
            ))),
        }
    }

    /// Whether a server in recovery (`in_recovery`) is acceptable on the first pass over the
    /// hosts (`PreferStandby` takes anything on the second).
    pub fn accepts(self, in_recovery: bool) -> bool {
        match self {
            SessionAttrs::Any => true,
            SessionAttrs::ReadWrite => !in_recovery,
            SessionAttrs::Standby | SessionAttrs::PreferStandby => in_recovery,
        }
    }
}

/// One server of the list.
#[derive(Clone, PartialEq, Eq)]
pub struct Host {
    /// `host:port` as written, for logs (never a password).
    pub label: String,
    /// The connection string for this server alone, in `key='value'` form.
    pub conninfo: String,
    /// The same for an ordinary session (no walsender), for questions asked beside the stream.
    pub plain_conninfo: String,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection string may hold a password.
        f.debug_struct("Host")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// A parsed `--pg-url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub hosts: Vec<Host>,
    pub session: SessionAttrs,
    /// `application_name` from the string, else `walvault`.
    pub application_name: String,
}

/// Keywords this module consumes rather than passes on.
const OWN: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "target_session_attrs",
    "application_name",
    "fallback_application_name",
    "replication",
    "load_balance_hosts",
];

/// Parse `s` (either spelling).
pub fn parse(s: &str) -> Result<Target, ConnInfoError> {
    let s = s.trim();
    let pairs = if s.starts_with("postgresql://") || s.starts_with("postgres://") {
        parse_uri(s)?
    } else {
        parse_keywords(s)?
    };
    let get = |k: &str| {
        pairs
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let session = get("target_session_attrs")
        .map(|v| SessionAttrs::parse(&v))
        .transpose()?
        .unwrap_or(SessionAttrs::Any);
    let application_name = get("application_name")
        .or_else(|| get("fallback_application_name"))
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "walvault".to_string());
    let hosts_value = get("hostaddr").or_else(|| get("host")).unwrap_or_default();
    let hosts: Vec<&str> = hosts_value.split(',').collect();
    let ports_value = get("port").unwrap_or_default();
    let ports: Vec<&str> = ports_value.split(',').collect();
    if ports.len() > 1 && ports.len() != hosts.len() {
        return Err(ConnInfoError(format!(
            "{} ports for {} hosts (give one port, or one per host)",
            ports.len(),
            hosts.len()
        )));
    }
    let mut common = String::new();
    for (k, v) in pairs.iter().filter(|(k, _)| !OWN.contains(&k.as_str())) {
        push_pair(&mut common, k, v);
    }
    if get("dbname").is_none() {
        // A database walsender needs a database; every cluster has this one.
        push_pair(&mut common, "dbname", "postgres");
    }
    let plain = common.clone();
    push_pair(&mut common, "replication", "database");
    let mut out = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let host = if host.is_empty() { "localhost" } else { host };
        let port = match ports.len() {
            1 => ports[0],
            _ => ports[i],
        };
        let port = if port.is_empty() { "5432" } else { port };
        port.parse::<u16>()
            .map_err(|_| ConnInfoError(format!("port {port:?} is not a port number")))?;
        if host.starts_with('/') {
            return Err(ConnInfoError(format!(
                "host {host:?} is a Unix socket directory; the replication client connects over TCP only"
            )));
        }
        let mut conninfo = common.clone();
        let mut plain_conninfo = plain.clone();
        for c in [&mut conninfo, &mut plain_conninfo] {
            push_pair(c, "host", host);
            push_pair(c, "port", port);
        }
        let label = match host.contains(':') {
            true => format!("[{host}]:{port}"),
            false => format!("{host}:{port}"),
        };
        out.push(Host {
            label,
            conninfo,
            plain_conninfo,
        });
    }
    Ok(Target {
        hosts: out,
        session,
        application_name,
    })
}

/// Append ` key='value'` with libpq's quoting.
fn push_pair(out: &mut String, key: &str, value: &str) {
    if !out.is_empty() {
        out.push(' ');
    }
    out.push_str(key);
    out.push_str("='");
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
}

/// `key = value ...`, values bare or single-quoted with backslash escapes (libpq's
/// `conninfo_parse`).
fn parse_keywords(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ConnInfoError(format!("missing \"=\" after {key:?}")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(ConnInfoError(format!("unterminated quoted value of {key:?}"))),
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(ConnInfoError(format!("unterminated quoted value of {key:?}"))),
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if key.is_empty() {
            return Err(ConnInfoError("an empty keyword".into()));
        }
        out.push((key, value));
    }
}

/// `postgresql://[user[:password]@][host[:port][,...]][/dbname][?key=value&...]`.
fn parse_uri(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let rest = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
        .unwrap_or(s);
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, dbname) = match rest.split_once('/') {
        Some((a, d)) => (a, Some(d)),
        None => (rest, None),
    };
    let mut out = Vec::new();
    let hostlist = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.push(("user".to_string(), decode(user)?));
            }
            if let Some(p) = password {
                out.push(("password".to_string(), decode(p)?));
            }
            hosts
        }
        None => authority,
    };
    if !hostlist.is_empty() {
        let (mut hosts, mut ports) = (Vec::new(), Vec::new());
        for item in hostlist.split(',') {
            let (host, port) = if let Some(inner) = item.strip_prefix('[') {
                let (h, after) = inner
                    .split_once(']')
                    .ok_or_else(|| ConnInfoError(format!("unterminated IPv6 address in {item:?}")))?;
                (h.to_string(), after.strip_prefix(':').unwrap_or("").to_string())
            } else {
                match item.split_once(':') {
                    Some((h, p)) => (decode(h)?, p.to_string()),
                    None => (decode(item)?, String::new()),
                }
            };
            hosts.push(host);
            ports.push(port);
        }
        out.push(("host".to_string(), hosts.join(",")));
        if ports.iter().any(|p| !p.is_empty()) {
            out.push(("port".to_string(), ports.join(",")));
        }
    }
    if let Some(d) = dbname.filter(|d| !d.is_empty()) {
        out.push(("dbname".to_string(), decode(d)?));
    }
    for pair in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| ConnInfoError(format!("missing \"=\" in URI parameter {pair:?}")))?;
        out.push((decode(k)?, decode(v)?));
    }
    Ok(out)
}

fn decode(s: &str) -> Result<String, ConnInfoError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ConnInfoError(format!("{s:?} is not UTF-8 once decoded")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_hosts_in_keyword_form_give_one_string_each() {
        let t =
            parse("host=a,b port=5433,5434 user=wv password='se cr\\'et' target_session_attrs=read-write")
                .unwrap();
        assert_eq!(t.session, SessionAttrs::ReadWrite);
        assert_eq!(t.application_name, "walvault");
        let labels: Vec<&str> = t.hosts.iter().map(|h| h.label.as_str()).collect();
        assert_eq!(labels, ["a:5433", "b:5434"]);
        assert_eq!(
            t.hosts[1].conninfo,
            "user='wv' password='se cr\\'et' dbname='postgres' replication='database' host='b' port='5434'"
        );
        assert!(
            !format!("{:?}", t.hosts[0]).contains("cr"),
            "no password in Debug"
        );
    }

    #[test]
    fn uri_form_with_hosts_ports_and_parameters() {
        let t =
            parse("postgresql://rep:p%40ss@h1:6000,[::1]:6001,h3/app?application_name=vault&sslmode=require")
                .unwrap();
        let labels: Vec<&str> = t.hosts.iter().map(|h| h.label.as_str()).collect();
        assert_eq!(labels, ["h1:6000", "[::1]:6001", "h3:5432"]);
        assert_eq!(t.application_name, "vault");
        assert_eq!(
            t.hosts[2].conninfo,
            "user='rep' password='p@ss' dbname='app' sslmode='require' replication='database' host='h3' port='5432'"
        );
    }

    #[test]
    fn refusals_are_one_line_each() {
        for (bad, why) in [
            ("host=a,b port=1,2,3", "3 ports for 2 hosts"),
            ("host=a target_session_attrs=maybe", "target_session_attrs"),
            ("host=/var/run/postgresql", "Unix socket"),
            ("host=a port=x", "not a port"),
            ("host='a", "unterminated"),
            ("host", "missing"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn session_attrs_pick_servers() {
        assert!(SessionAttrs::ReadWrite.accepts(false));
        assert!(!SessionAttrs::ReadWrite.accepts(true));
        assert!(SessionAttrs::Standby.accepts(true));
        assert!(SessionAttrs::Any.accepts(true) && SessionAttrs::Any.accepts(false));
    }
}
