//! Measure what verifying page checksums costs a backup: the pages of a data directory's
//! relation files, held in memory, checked as `archive-agent backup` checks them (one core), set
//! beside the blake3 content hash every backup already computes over the same bytes.
//!
//! Usage: page-checksums PGDATA [ROUNDS]
//! PGDATA is a cluster initdb'd with --data-checksums (stopped, or idle: a page written meanwhile
//! shows as "recent").

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use walvault::basebackup::page_checksum::{RelationFile, check_buffer};
use walvault::wal::Lsn;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let pgdata = PathBuf::from(args.next().context("usage: page-checksums PGDATA [ROUNDS]")?);
    let rounds: u32 = args.next().map_or(Ok(5), |r| r.parse())?;
    let files = relation_files(&pgdata)?;
    let bytes: usize = files.iter().map(|(_, _, b)| b.len()).sum();
    println!(
        "{} relation files, {:.1} MiB",
        files.len(),
        bytes as f64 / 1048576.0
    );

    let (mut pages, mut bad) = (0u64, 0usize);
    let started = Instant::now();
    for _ in 0..rounds {
        for (_, file, buf) in &files {
            // Every LSN is "old": each page is judged on its checksum alone.
            let c = check_buffer(buf, file, 0, Lsn(u64::MAX), |_| None);
            pages += c.pages;
            bad += c.bad.len();
        }
    }
    let checked = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for _ in 0..rounds {
        for (_, _, buf) in &files {
            std::hint::black_box(blake3::hash(buf));
        }
    }
    let hashed = started.elapsed().as_secs_f64();
    let mb = (bytes as f64 * f64::from(rounds)) / 1e6;
    println!(
        "page checks: {pages} pages in {checked:.3}s, {:.0} MB/s, {bad} failed",
        mb / checked
    );
    println!("blake3 (for scale): {:.0} MB/s", mb / hashed);
    Ok(())
}

/// Every relation file under `pgdata`, read whole.
fn relation_files(pgdata: &Path) -> anyhow::Result<Vec<(String, RelationFile, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut dirs = vec![pgdata.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let rel = path.strip_prefix(pgdata)?.to_string_lossy().into_owned();
            if let Some(file) = RelationFile::parse(&rel) {
                out.push((rel, file, std::fs::read(&path)?));
            }
        }
    }
    Ok(out)
}
