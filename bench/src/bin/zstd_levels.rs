//! Measure zstd levels on real WAL segments: compression ratio and single-core compress and
//! decompress throughput. This is the measurement behind walvault's default `compress_level`.
//!
//! Usage: zstd-levels DIR [--json OUT]
//! DIR holds WAL segments (24-hex names), for example the `cp %p DIR/%f` archive of a cluster
//! under a production-like workload; `bench/wal-sample.sh` makes one.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};

const LEVELS: [i32; 9] = [1, 2, 3, 4, 5, 6, 9, 12, 19];

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().context("usage: zstd-levels DIR [--json OUT]")?);
    let json_out = match (args.next().as_deref(), args.next()) {
        (Some("--json"), Some(out)) => Some(PathBuf::from(out)),
        (None, _) => None,
        _ => bail!("usage: zstd-levels DIR [--json OUT]"),
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no WAL segments in {}", dir.display());
    }
    let segments: Vec<Vec<u8>> = files.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    let total: usize = segments.iter().map(Vec::len).sum();
    let mib = total as f64 / (1 << 20) as f64;
    println!(
        "{} segments, {:.0} MiB of WAL from {}",
        segments.len(),
        mib,
        dir.display()
    );
    println!(
        "{:>5} {:>8} {:>14} {:>16} {:>12}",
        "level", "ratio", "compress MiB/s", "decompress MiB/s", "ms/segment"
    );
    let mut rows = vec![];
    for level in LEVELS {
        let started = Instant::now();
        let compressed: Vec<Vec<u8>> = segments
            .iter()
            .map(|s| zstd::bulk::compress(s, level))
            .collect::<Result<_, _>>()?;
        let c_secs = started.elapsed().as_secs_f64();
        let stored: usize = compressed.iter().map(Vec::len).sum();
        let started = Instant::now();
        for (c, s) in compressed.iter().zip(&segments) {
            let d = zstd::bulk::decompress(c, s.len())?;
            // Verify as fetch does, so the decompress figure includes the hash it pays for.
            assert_eq!(blake3::hash(&d), blake3::hash(s));
        }
        let d_secs = started.elapsed().as_secs_f64();
        let ratio = total as f64 / stored as f64;
        let per_segment_ms = c_secs * 1000.0 / segments.len() as f64;
        println!(
            "{level:>5} {ratio:>8.2} {:>14.0} {:>16.0} {per_segment_ms:>12.1}",
            mib / c_secs,
            mib / d_secs
        );
        rows.push(serde_json::json!({
            "level": level, "ratio": ratio, "stored_bytes": stored,
            "compress_mib_s": mib / c_secs, "decompress_verify_mib_s": mib / d_secs,
            "compress_ms_per_segment": per_segment_ms,
        }));
    }
    if let Some(out) = json_out {
        let doc = serde_json::json!({ "segments": segments.len(), "wal_bytes": total, "levels": rows });
        std::fs::write(&out, serde_json::to_vec_pretty(&doc)?)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
