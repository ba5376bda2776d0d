//! What a command tells its user: one report value per command, rendered either as aligned text
//! for a person or as JSON (`--json`) for a program, from the same serde type. The binaries hand
//! every result here; nothing else in walvault prints to standard output.

use std::io::Write;

use serde::Serialize;

/// A command's result as its user sees it.
pub trait Report: Serialize {
    /// The text a person reads: aligned columns, one fact a line, ending without a newline.
    fn render(&self) -> String;
}

/// How a report is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    /// `--json` or not.
    pub fn from_json_flag(json: bool) -> Self {
        if json { Format::Json } else { Format::Text }
    }
}

/// The report as the format wants it, with a final newline.
pub fn to_string<R: Report + ?Sized>(report: &R, format: Format) -> String {
    let mut s = match format {
        // Serializing a report cannot fail: no maps with non-string keys, no custom errors.
        Format::Json => serde_json::to_string_pretty(report)
            .unwrap_or_else(|e| format!("{{\"error\": \"report not serializable: {e}\"}}")),
        Format::Text => report.render(),
    };
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// Write the report to standard output. A closed pipe (`| head`) is not an error worth a panic.
pub fn emit<R: Report + ?Sized>(report: &R, format: Format) -> std::io::Result<()> {
    let out = std::io::stdout();
    let mut out = out.lock();
    match out
        .write_all(to_string(report, format).as_bytes())
        .and_then(|()| out.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// A one-line report (`pinned 20261123T...`): its text is the line, its JSON `{"message": ...}`.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub message: String,
}

impl Message {
    pub fn new(message: impl Into<String>) -> Self {
        Message {
            message: message.into(),
        }
    }
}

impl Report for Message {
    fn render(&self) -> String {
        self.message.clone()
    }
}

/// Columns padded to the widest cell of each, separated by two spaces; the last column is not
/// padded. For the tables of `list`, `info`, `find`.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if c + 1 < row.len() {
                line.extend(std::iter::repeat_n(' ', widths[c] - cell.chars().count()));
            }
        }
        out.push_str(line.trim_end());
    }
    out
}

/// A size for people: `512 B`, `1.5 MiB`, `2.0 GiB` (binary units, one decimal).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json_come_from_the_same_value() {
        let m = Message::new("pinned 1");
        assert_eq!(to_string(&m, Format::Text), "pinned 1\n");
        let v: serde_json::Value = serde_json::from_str(&to_string(&m, Format::Json)).unwrap();
        assert_eq!(v["message"], "pinned 1");
    }

    #[test]
    fn tables_align_every_column_but_the_last() {
        let t = table(&[
            vec!["id".into(), "size".into(), "note".into()],
            vec!["20261123T101010Z".into(), "1 MiB".into(), "kept".into()],
        ]);
        assert_eq!(t, "id                size   note\n20261123T101010Z  1 MiB  kept");
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(16 << 20), "16.0 MiB");
        assert_eq!(human_bytes(3 << 40), "3.0 TiB");
        assert_eq!(human_bytes(u64::MAX), "16777216.0 TiB");
    }
}
