//! The tar stream `BASE_BACKUP` sends (PostgreSQL's `src/port/tar.c`: ustar headers, names of at
//! most 99 bytes, sizes in octal or, past 8 GiB, base-256), read incrementally as `d` messages
//! arrive: members and their bytes, never buffered whole. Every name is checked before use: no
//! absolute path, no `..`, no empty or NUL-bearing component.

/// Why the stream cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TarError {
    #[error("tar header {0} has a bad checksum")]
    Checksum(u64),
    #[error("tar header {at}: {what}")]
    Field { at: u64, what: String },
    #[error("tar member name {0:?} would leave the data directory")]
    Name(String),
    #[error("the tar stream ended inside a member or header")]
    Truncated,
}

/// What a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// A member's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub kind: Kind,
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
    /// A symlink's target (tablespaces: `pg_tblspc/<oid>`).
    pub link: String,
}

/// What reading found, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Start(Member),
    Data(&'a [u8]),
    /// The member started last is complete.
    End,
}

#[derive(Debug)]
enum State {
    Header(Vec<u8>),
    Data { left: u64, pad: usize },
    Finished,
}

/// An incremental reader of one tar stream.
#[derive(Debug)]
pub struct Reader {
    state: State,
    /// Bytes read so far (for messages).
    offset: u64,
}

impl Default for Reader {
    fn default() -> Self {
        Reader {
            state: State::Header(Vec::with_capacity(512)),
            offset: 0,
        }
    }
}

impl Reader {
    /// Read `input`, handing each event to `each` (data slices borrow from `input`).
    pub fn feed<'a, E: From<TarError>>(
        &mut self,
        mut input: &'a [u8],
        mut each: impl FnMut(Event<'a>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !input.is_empty() {
            match &mut self.state {
                State::Finished => return Ok(()),
                State::Header(buf) => {
                    let n = (512 - buf.len()).min(input.len());
                    buf.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.offset += n as u64;
                    if buf.len() < 512 {
                        continue;
                    }
                    let block = std::mem::replace(buf, Vec::with_capacity(512));
                    if block.iter().all(|&b| b == 0) {
                        // The first of the two zero blocks that end the archive.
                        self.state = State::Finished;
                        continue;
                    }
                    let member = parse_header(&block, self.offset - 512)?;
                    let size = if member.kind == Kind::File { member.size } else { 0 };
                    each(Event::Start(member))?;
                    if size == 0 {
                        each(Event::End)?;
                    } else {
                        self.state = State::Data {
                            left: size,
                            pad: ((512 - size % 512) % 512) as usize,
                        };
                    }
                }
                State::Data { left, pad } => {
                    if *left > 0 {
                        let n = (*left).min(input.len() as u64) as usize;
                        each(Event::Data(&input[..n]))?;
                        input = &input[n..];
                        *left -= n as u64;
                        self.offset += n as u64;
                        if *left == 0 {
                            each(Event::End)?;
                        }
                        continue;
                    }
                    let n = (*pad).min(input.len());
                    input = &input[n..];
                    *pad -= n;
                    self.offset += n as u64;
                    if *pad == 0 {
                        self.state = State::Header(Vec::with_capacity(512));
                    }
                }
            }
        }
        // A member whose size is a multiple of 512 has no padding: go on to the next header.
        if let State::Data { left: 0, pad: 0 } = self.state {
            self.state = State::Header(Vec::with_capacity(512));
        }
        Ok(())
    }

    /// Whether the stream ended where an archive may end (between members, or at its end mark).
    pub fn finish(&self) -> Result<(), TarError> {
        match &self.state {
            State::Finished => Ok(()),
            State::Header(b) if b.is_empty() => Ok(()),
            State::Data { left: 0, pad: 0 } => Ok(()),
            _ => Err(TarError::Truncated),
        }
    }
}

fn field_str(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

fn octal(b: &[u8], at: u64, what: &str) -> Result<u64, TarError> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        // base-256, big-endian, the first byte's top bit the marker.
        let mut v: u64 = u64::from(b[0] & 0x7f);
        for &c in &b[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(c)))
                .ok_or_else(|| TarError::Field {
                    at,
                    what: format!("{what} overflows"),
                })?;
        }
        return Ok(v);
    }
    let s = std::str::from_utf8(field_str(b)).map_err(|_| TarError::Field {
        at,
        what: format!("{what} is not text"),
    })?;
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8).map_err(|_| TarError::Field {
        at,
        what: format!("{what} {s:?} is not octal"),
    })
}

fn parse_header(h: &[u8], at: u64) -> Result<Member, TarError> {
    let stored = octal(&h[148..156], at, "checksum")?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) })
        .sum();
    if sum != stored {
        return Err(TarError::Checksum(at));
    }
    let text = |b: &[u8], what: &str| {
        String::from_utf8(field_str(b).to_vec()).map_err(|_| TarError::Field {
            at,
            what: format!("{what} is not UTF-8"),
        })
    };
    let mut name = text(&h[0..100], "name")?;
    if &h[257..262] == b"ustar" && h[345] != 0 {
        name = format!("{}/{name}", text(&h[345..500], "prefix")?);
    }
    let kind = match h[156] {
        b'0' | 0 => Kind::File,
        b'5' => Kind::Dir,
        b'2' => Kind::Symlink,
        t => {
            return Err(TarError::Field {
                at,
                what: format!("member type {:?} is not a file, directory or symlink", t as char),
            });
        }
    };
    // PostgreSQL names the directories it makes up (pg_wal, its archive_status) "./pg_wal":
    // a `.` component is dropped, anything else must be a plain relative path.
    let name = name
        .trim_end_matches('/')
        .split('/')
        .filter(|c| *c != ".")
        .collect::<Vec<_>>()
        .join("/");
    check_name(&name)?;
    Ok(Member {
        size: octal(&h[124..136], at, "size")?,
        mode: octal(&h[100..108], at, "mode")? as u32,
        mtime: octal(&h[136..148], at, "mtime")? as i64,
        link: text(&h[157..257], "link")?,
        kind,
        name,
    })
}

/// A relative path of plain components.
fn check_name(name: &str) -> Result<(), TarError> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\0') || c.contains('\\'));
    if bad {
        Err(TarError::Name(name.to_string()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, kind: u8, size: u64, link: &str) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000600\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"14707055263\0");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn archive() -> Vec<u8> {
        let mut a = header("backup_label", b'0', 5, "");
        a.extend_from_slice(b"hello");
        a.extend(vec![0u8; 507]);
        a.extend(header("./pg_wal/archive_status", b'5', 0, ""));
        a.extend(header("base/1", b'5', 0, ""));
        a.extend(header("pg_tblspc/16384", b'2', 0, "/srv/ts"));
        a.extend(header("global/pg_control", b'0', 1024, ""));
        a.extend((0..1024).map(|i| (i % 251) as u8));
        a.extend(vec![0u8; 1024]);
        a
    }

    fn read_in(pieces: usize) -> Vec<(Member, Vec<u8>)> {
        let a = archive();
        let mut r = Reader::default();
        let mut out: Vec<(Member, Vec<u8>)> = Vec::new();
        for chunk in a.chunks(pieces) {
            r.feed::<TarError>(chunk, |e| {
                match e {
                    Event::Start(m) => out.push((m, Vec::new())),
                    Event::Data(d) => out.last_mut().unwrap().1.extend_from_slice(d),
                    Event::End => {}
                }
                Ok(())
            })
            .unwrap();
        }
        r.finish().unwrap();
        out
    }

    #[test]
    fn members_and_bytes_come_out_the_same_however_the_stream_is_cut() {
        let whole = read_in(usize::MAX);
        assert_eq!(whole.len(), 5);
        assert_eq!(whole[0].0.name, "backup_label");
        assert_eq!(whole[0].1, b"hello");
        assert_eq!(whole[1].0.name, "pg_wal/archive_status");
        assert_eq!(whole[2].0.kind, Kind::Dir);
        assert_eq!(whole[3].0.link, "/srv/ts");
        assert_eq!(whole[4].1.len(), 1024);
        assert_eq!(whole[4].0.mode, 0o600);
        for cut in [1, 7, 511, 512, 513, 4096] {
            assert_eq!(read_in(cut), whole, "cut every {cut} bytes");
        }
    }

    #[test]
    fn names_that_leave_the_directory_and_bad_checksums_are_refused() {
        for bad in ["../etc/passwd", "/etc/passwd", "base/../../x", "a//b"] {
            let h = header(bad, b'0', 0, "");
            let err = Reader::default().feed::<TarError>(&h, |_| Ok(())).unwrap_err();
            assert!(matches!(err, TarError::Name(_)), "{bad}: {err}");
        }
        let mut h = header("base/1/1259", b'0', 0, "");
        h[0] ^= 1;
        let err = Reader::default().feed::<TarError>(&h, |_| Ok(())).unwrap_err();
        assert_eq!(err, TarError::Checksum(0));
    }

    #[test]
    fn a_stream_cut_inside_a_member_is_truncated() {
        let a = archive();
        let mut r = Reader::default();
        r.feed::<TarError>(&a[..600], |_| Ok(())).unwrap();
        assert_eq!(r.finish(), Err(TarError::Truncated));
    }
}
