//! The physical replication stream's messages, and the segments they fill.
//!
//! A walsender sends `XLogData` (`w`: where the bytes start, the server's WAL end, a send time,
//! the bytes) and primary keepalives (`k`: the server's WAL end, a send time, whether a reply is
//! wanted now): PostgreSQL's `protocol-replication` documentation. Bytes arrive in LSN order
//! with no gap (`receivelog.c` refuses an offset other than the expected one, and so do we), and
//! a message may cross a segment boundary.

use crate::wal::{Lsn, SegmentName, TimelineId};

/// Why a message cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamProtocolError {
    #[error("replication message of {len} bytes is shorter than its {kind} header")]
    Short { kind: &'static str, len: usize },
    #[error("unknown replication message type {0:?}")]
    UnknownType(char),
    #[error("the server sent WAL from {got}, expected it from {expected}")]
    Gap { got: Lsn, expected: Lsn },
}

/// One message of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    XLogData {
        start: Lsn,
        server_end: Lsn,
        data: &'a [u8],
    },
    Keepalive {
        server_end: Lsn,
        reply_requested: bool,
    },
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Parse one CopyData payload of the stream.
pub fn parse(msg: &[u8]) -> Result<Message<'_>, StreamProtocolError> {
    match msg.first() {
        Some(b'w') if msg.len() >= 25 => Ok(Message::XLogData {
            start: Lsn(be_u64(&msg[1..])),
            server_end: Lsn(be_u64(&msg[9..])),
            data: &msg[25..],
        }),
        Some(b'w') => Err(StreamProtocolError::Short {
            kind: "XLogData",
            len: msg.len(),
        }),
        Some(b'k') if msg.len() >= 18 => Ok(Message::Keepalive {
            server_end: Lsn(be_u64(&msg[1..])),
            reply_requested: msg[17] != 0,
        }),
        Some(b'k') => Err(StreamProtocolError::Short {
            kind: "keepalive",
            len: msg.len(),
        }),
        Some(&c) => Err(StreamProtocolError::UnknownType(c as char)),
        None => Err(StreamProtocolError::Short {
            kind: "message",
            len: 0,
        }),
    }
}

/// A segment the stream filled completely.
#[derive(Debug)]
pub struct Completed {
    pub name: SegmentName,
    pub bytes: Vec<u8>,
}

/// The segment being filled: its bytes from its start up to the stream's position.
#[derive(Debug)]
pub struct Assembler {
    timeline: TimelineId,
    segment_size: u32,
    /// Start of the segment being filled.
    segment_start: Lsn,
    buf: Vec<u8>,
}

impl Assembler {
    /// Receive from `start`, which must be a segment's first byte (a stream always restarts at
    /// one, so that every segment stored is whole).
    pub fn new(timeline: TimelineId, segment_size: u32, start: Lsn) -> Assembler {
        debug_assert_eq!(start.0 % u64::from(segment_size), 0);
        Assembler {
            timeline,
            segment_size,
            segment_start: start,
            buf: Vec::with_capacity(segment_size as usize),
        }
    }

    /// The end of what was received.
    pub fn position(&self) -> Lsn {
        Lsn(self.segment_start.0 + self.buf.len() as u64)
    }

    pub fn segment_size(&self) -> u32 {
        self.segment_size
    }

    pub fn timeline(&self) -> TimelineId {
        self.timeline
    }

    /// The segment being filled and its bytes so far.
    pub fn current(&self) -> (SegmentName, &[u8]) {
        (
            SegmentName::containing(self.timeline, self.segment_start, self.segment_size),
            &self.buf,
        )
    }

    /// Take `data`, which starts at `start`: the segments it completes, in order.
    pub fn feed(&mut self, start: Lsn, mut data: &[u8]) -> Result<Vec<Completed>, StreamProtocolError> {
        if start != self.position() {
            return Err(StreamProtocolError::Gap {
                got: start,
                expected: self.position(),
            });
        }
        let mut done = Vec::new();
        while !data.is_empty() {
            let room = self.segment_size as usize - self.buf.len();
            let n = room.min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == self.segment_size as usize {
                let (name, _) = self.current();
                let bytes = std::mem::replace(&mut self.buf, Vec::with_capacity(self.segment_size as usize));
                self.segment_start = Lsn(self.segment_start.0 + u64::from(self.segment_size));
                done.push(Completed { name, bytes });
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u32 = 1 << 20;

    fn xlogdata(start: u64, data: &[u8]) -> Vec<u8> {
        let mut m = vec![b'w'];
        m.extend_from_slice(&start.to_be_bytes());
        m.extend_from_slice(&(start + data.len() as u64).to_be_bytes());
        m.extend_from_slice(&0i64.to_be_bytes());
        m.extend_from_slice(data);
        m
    }

    #[test]
    fn messages_parse_and_short_ones_are_refused() {
        let m = xlogdata(0x1_0000_0000, b"abc");
        assert_eq!(
            parse(&m).unwrap(),
            Message::XLogData {
                start: Lsn(0x1_0000_0000),
                server_end: Lsn(0x1_0000_0003),
                data: b"abc"
            }
        );
        let mut k = vec![b'k'];
        k.extend_from_slice(&7u64.to_be_bytes());
        k.extend_from_slice(&0i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            parse(&k).unwrap(),
            Message::Keepalive {
                server_end: Lsn(7),
                reply_requested: true
            }
        );
        assert!(matches!(parse(&m[..24]), Err(StreamProtocolError::Short { .. })));
        assert!(matches!(parse(&k[..17]), Err(StreamProtocolError::Short { .. })));
        assert!(matches!(parse(b"z"), Err(StreamProtocolError::UnknownType('z'))));
    }

    #[test]
    fn bytes_crossing_a_boundary_complete_the_segment_and_start_the_next() {
        let tli = TimelineId::new(3).unwrap();
        let start = Lsn(u64::from(SEG) * 5);
        let mut a = Assembler::new(tli, SEG, start);
        let first = vec![1u8; SEG as usize - 10];
        assert!(a.feed(start, &first).unwrap().is_empty());
        let done = a.feed(a.position(), &[2u8; 30]).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].name, SegmentName::containing(tli, start, SEG));
        assert_eq!(done[0].bytes.len(), SEG as usize);
        assert_eq!(&done[0].bytes[SEG as usize - 10..], &[2u8; 10]);
        let (cur, bytes) = a.current();
        assert_eq!(cur, SegmentName::containing(tli, Lsn(u64::from(SEG) * 6), SEG));
        assert_eq!(bytes, &[2u8; 20]);
        assert_eq!(a.position(), Lsn(u64::from(SEG) * 6 + 20));
    }

    #[test]
    fn a_message_spanning_several_segments_completes_each() {
        let tli = TimelineId::FIRST;
        let mut a = Assembler::new(tli, SEG, Lsn(0));
        let data: Vec<u8> = (0..(2 * SEG as usize + 5)).map(|i| (i % 251) as u8).collect();
        let done = a.feed(Lsn(0), &data).unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(done[1].bytes, data[SEG as usize..2 * SEG as usize]);
        assert_eq!(a.current().1, &data[2 * SEG as usize..]);
    }

    #[test]
    fn a_gap_or_a_repeat_is_refused() {
        let mut a = Assembler::new(TimelineId::FIRST, SEG, Lsn(0));
        a.feed(Lsn(0), b"12345").unwrap();
        assert_eq!(
            a.feed(Lsn(6), b"x").unwrap_err(),
            StreamProtocolError::Gap {
                got: Lsn(6),
                expected: Lsn(5)
            }
        );
        assert!(a.feed(Lsn(4), b"x").is_err());
        assert_eq!(a.position(), Lsn(5));
    }
}
