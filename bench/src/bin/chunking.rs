//! Fixed-size versus content-defined chunking on real PostgreSQL data directories: how many bytes
//! a second backup must upload after a small change, how many chunks it takes, and how fast
//! chunking runs. This is the measurement behind walvault's chunking choice.
//!
//! Usage: chunking BEFORE_DIR AFTER_DIR
//! (two copies of the same data directory; `bench/chunking-sample.sh` makes them)

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

fn files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                if e.file_name() != "pg_wal" {
                    stack.push(e.path());
                }
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

#[derive(Clone, Copy)]
enum Scheme {
    Fixed(usize),
    Cdc { min: usize, avg: usize, max: usize },
}

impl Scheme {
    fn name(self) -> String {
        match self {
            Scheme::Fixed(n) => format!("fixed {} KiB", n >> 10),
            Scheme::Cdc { avg, .. } => format!("fastcdc avg {} KiB", avg >> 10),
        }
    }
    /// Chunk ids (blake3) and lengths of one file.
    fn chunks(self, data: &[u8]) -> Vec<([u8; 32], usize)> {
        match self {
            Scheme::Fixed(n) => data
                .chunks(n)
                .map(|c| (*blake3::hash(c).as_bytes(), c.len()))
                .collect(),
            Scheme::Cdc { min, avg, max } => fastcdc::v2020::FastCDC::new(data, min, avg, max)
                .map(|c| {
                    let s = &data[c.offset..c.offset + c.length];
                    (*blake3::hash(s).as_bytes(), s.len())
                })
                .collect(),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let before = PathBuf::from(args.next().context("usage: chunking BEFORE_DIR AFTER_DIR")?);
    let after = PathBuf::from(args.next().context("usage: chunking BEFORE_DIR AFTER_DIR")?);
    let load = |dir: &Path| -> anyhow::Result<Vec<Vec<u8>>> {
        files(dir)?.iter().map(|p| Ok(std::fs::read(p)?)).collect()
    };
    let (a, b) = (load(&before)?, load(&after)?);
    let total_b: usize = b.iter().map(Vec::len).sum();
    println!(
        "{} files, {:.0} MiB in the second copy",
        b.len(),
        total_b as f64 / (1 << 20) as f64
    );
    println!(
        "{:<22} {:>10} {:>14} {:>12} {:>12}",
        "scheme", "chunks", "new MiB (2nd)", "new %", "MiB/s"
    );
    let schemes = [
        Scheme::Fixed(128 << 10),
        Scheme::Fixed(256 << 10),
        Scheme::Fixed(1 << 20),
        Scheme::Fixed(4 << 20),
        Scheme::Cdc {
            min: 256 << 10,
            avg: 1 << 20,
            max: 4 << 20,
        },
        Scheme::Cdc {
            min: 64 << 10,
            avg: 256 << 10,
            max: 1 << 20,
        },
    ];
    for s in schemes {
        let started = Instant::now();
        let mut seen: HashSet<[u8; 32]> = HashSet::new();
        for f in &a {
            seen.extend(s.chunks(f).into_iter().map(|(id, _)| id));
        }
        let (mut chunks, mut new_bytes) = (0usize, 0usize);
        for f in &b {
            for (id, len) in s.chunks(f) {
                chunks += 1;
                if seen.insert(id) {
                    new_bytes += len;
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let mib = (a.iter().map(Vec::len).sum::<usize>() + total_b) as f64 / (1 << 20) as f64;
        println!(
            "{:<22} {:>10} {:>14.1} {:>11.2}% {:>12.0}",
            s.name(),
            chunks,
            new_bytes as f64 / (1 << 20) as f64,
            100.0 * new_bytes as f64 / total_b as f64,
            mib / secs
        );
    }
    Ok(())
}
