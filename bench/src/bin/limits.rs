//! The physical limits beside bench/rivals.py's backup and restore figures: what any tool must
//! at least do with the same bytes on this machine, with no chunking, hashing, verification,
//! manifest or store in between.
//!
//! ```text
//! limits backup  --data PGDATA --out DIR [--parallel N] [--piece BYTES]
//! limits restore --from DIR --to DEST [--parallel N] [--writers W]
//! ```
//!
//! `backup` reads every regular file of PGDATA in pieces of `--piece` bytes (1 MiB, walvault's
//! chunk size), `N` threads at once; each compresses its pieces with zstd level 3 and appends them
//! to a pack file of its own, which it syncs at the end; the index (`DIR/index.json`: file,
//! offset, pack, position and compressed length of every piece) is written last. `restore` is
//! its inverse on those bytes, measured in two parts whose larger is the limit (a restore that
//! overlapped them perfectly would take that long): `N` threads read every piece from the packs
//! and decompress it, keeping nothing; then `W` threads (64 by default: as many files as
//! walvault's restore writes at once, since writing and syncing wait on the disk, not on a core)
//! create the same files at the same sizes,
//! each file written front to back in 1 MiB writes by one thread, made durable the cheaper of
//! two ways, both measured: each file and directory synced as it is finished, or the file
//! system synced once at the end (`sync -f`, as a tool that syncs nothing pays after it). WAL (`pg_wal/`) and `postmaster.pid` are left out, as every tool
//! does. Both print one JSON line: seconds, files, bytes (and the parts). Measurements, never
//! pass/fail.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let parallel: usize = arg(&args, "--parallel").map_or(Ok(2), |v| v.parse())?;
    match args.get(1).map(String::as_str) {
        Some("backup") => {
            let data = PathBuf::from(arg(&args, "--data").context("--data")?);
            let out = PathBuf::from(arg(&args, "--out").context("--out")?);
            let piece: u64 = arg(&args, "--piece").map_or(Ok(1 << 20), |v| v.parse())?;
            backup(&data, &out, parallel, piece)
        }
        Some("restore") => {
            let from = PathBuf::from(arg(&args, "--from").context("--from")?);
            let to = PathBuf::from(arg(&args, "--to").context("--to")?);
            let writers: usize = arg(&args, "--writers").map_or(Ok(64), |v| v.parse())?;
            restore(&from, &to, parallel, writers)
        }
        _ => bail!(
            "usage: limits backup --data PGDATA --out DIR | restore --from DIR --to DEST [--parallel N] [--writers W]"
        ),
    }
}

/// Files (relative path, size) and directories (relative path).
type Tree = (Vec<(PathBuf, u64)>, Vec<PathBuf>);

/// Every regular file under `root` (relative path, size), and every directory, in walk order.
fn walk(root: &Path) -> Result<Tree> {
    let (mut files, mut dirs) = (Vec::new(), vec![PathBuf::new()]);
    let mut i = 0;
    while i < dirs.len() {
        let dir = root.join(&dirs[i]);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| dir.display().to_string())?
            .collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let rel = dirs[i].join(e.file_name());
            let t = e.file_type()?;
            if t.is_dir() {
                dirs.push(rel);
            } else if t.is_file() {
                files.push((rel, e.metadata()?.len()));
            }
        }
        i += 1;
    }
    Ok((files, dirs))
}

/// One piece of one file in a pack.
#[derive(Clone)]
struct Piece {
    file: usize,
    offset: u64,
    len: u64,
    pack: usize,
    at: u64,
    clen: u64,
}

fn backup(data: &Path, out: &Path, parallel: usize, piece: u64) -> Result<()> {
    let t0 = Instant::now();
    let (mut files, dirs) = walk(data)?;
    // What no tool backs up: the WAL (archived separately) and the server's lock file.
    files.retain(|(p, _)| !p.starts_with("pg_wal") && p != Path::new("postmaster.pid"));
    std::fs::create_dir_all(out)?;
    let mut work = Vec::new();
    for (i, (_, size)) in files.iter().enumerate() {
        let mut off = 0;
        loop {
            work.push((i, off, piece.min(size - off)));
            off += piece;
            if off >= *size {
                break;
            }
        }
    }
    let next = Arc::new(AtomicUsize::new(0));
    let work = Arc::new(work);
    let files = Arc::new(files);
    let mut threads = Vec::new();
    for t in 0..parallel {
        let (next, work, files, data) = (
            Arc::clone(&next),
            Arc::clone(&work),
            Arc::clone(&files),
            data.to_path_buf(),
        );
        let pack_path = out.join(format!("pack-{t}"));
        threads.push(std::thread::spawn(move || -> Result<Vec<Piece>> {
            let mut pack = std::io::BufWriter::with_capacity(1 << 20, File::create(&pack_path)?);
            let (mut at, mut done) = (0u64, Vec::new());
            let mut buf = Vec::new();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(file, offset, len)) = work.get(k) else {
                    break;
                };
                buf.resize(len as usize, 0);
                // A file removed since the walk (a running server's temporary and statistics
                // files) is left out, as a backup leaves it out.
                let f = match File::open(data.join(&files[file].0)) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e).with_context(|| files[file].0.display().to_string()),
                };
                // A file that shrank since the walk (PostgreSQL truncates) reads short: keep what is there.
                let n = read_at_most(&f, &mut buf, offset)?;
                let z = zstd::bulk::compress(&buf[..n], 3)?;
                pack.write_all(&z)?;
                done.push(Piece {
                    file,
                    offset,
                    len: n as u64,
                    pack: t,
                    at,
                    clen: z.len() as u64,
                });
                at += z.len() as u64;
            }
            pack.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            Ok(done)
        }));
    }
    let mut pieces = Vec::new();
    for t in threads {
        pieces.extend(t.join().expect("backup thread panicked")?);
    }
    let bytes: u64 = pieces.iter().map(|p| p.len).sum();
    let index = serde_json::json!({
        "files": files.iter().map(|(p, s)| serde_json::json!([p, s])).collect::<Vec<_>>(),
        "dirs": dirs,
        "pieces": pieces.iter().map(|p| [p.file as u64, p.offset, p.len, p.pack as u64, p.at, p.clen]).collect::<Vec<_>>(),
    });
    let mut f = File::create(out.join("index.json"))?;
    f.write_all(index.to_string().as_bytes())?;
    f.sync_all()?;
    File::open(out)?.sync_all()?;
    let stored: u64 = pieces.iter().map(|p| p.clen).sum();
    println!(
        "{}",
        serde_json::json!({"seconds": t0.elapsed().as_secs_f64(), "files": files.len(), "bytes": bytes, "stored_bytes": stored})
    );
    Ok(())
}

fn read_at_most(f: &File, buf: &mut [u8], offset: u64) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn restore(from: &Path, to: &Path, parallel: usize, writers: usize) -> Result<()> {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(from.join("index.json"))?)?;
    let files: Vec<(PathBuf, u64)> = index["files"]
        .as_array()
        .context("files")?
        .iter()
        .map(|f| {
            (
                PathBuf::from(f[0].as_str().unwrap_or_default()),
                f[1].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let dirs: Vec<PathBuf> = index["dirs"]
        .as_array()
        .context("dirs")?
        .iter()
        .map(|d| PathBuf::from(d.as_str().unwrap_or_default()))
        .collect();
    let pieces: Vec<Piece> = index["pieces"]
        .as_array()
        .context("pieces")?
        .iter()
        .map(|p| {
            let v = |i: usize| p[i].as_u64().unwrap_or(0);
            Piece {
                file: v(0) as usize,
                offset: v(1),
                len: v(2),
                pack: v(3) as usize,
                at: v(4),
                clen: v(5),
            }
        })
        .collect();
    let packs: Vec<Option<File>> = (0..pieces.iter().map(|p| p.pack + 1).max().unwrap_or(0))
        .map(|t| File::open(from.join(format!("pack-{t}"))).ok())
        .collect();
    // 1. Read and decompress every piece, `parallel` at once, keeping nothing.
    let t0 = Instant::now();
    each_in_parallel(&pieces, parallel, |z, p| {
        z.resize(p.clen as usize, 0);
        packs[p.pack].as_ref().context("pack")?.read_exact_at(z, p.at)?;
        let data = zstd::bulk::decompress(z, p.len as usize)?;
        std::hint::black_box(&data);
        Ok(())
    })?;
    let decompress = t0.elapsed().as_secs_f64();
    // 2. Create and write the same files (the same sizes), each by one thread front to back in
    // 1 MiB writes, `writers` files at once, made durable in the cheaper of two ways: each
    // file synced as it is finished, or none, then the whole file system at once (`sync -f`).
    // The second way writes beside the first (`<to>-once`) rather than over it once removed: on
    // a disk mounted with `discard`, writes right after a large deletion run at a third of their
    // speed for a minute or more, which would be measured, not the way of syncing. Both trees
    // are left for the caller to remove.
    let each = write_files(to, &files, &dirs, writers, true)?;
    std::process::Command::new("sync").status()?;
    let once = write_files(&once_dir(to), &files, &dirs, writers, false)?;
    let write = each.min(once);
    let bytes: u64 = files.iter().map(|f| f.1).sum();
    println!(
        "{}",
        serde_json::json!({"seconds": decompress.max(write), "decompress_seconds": decompress,
                           "write_seconds": write, "write_fsync_each_seconds": each,
                           "write_sync_once_seconds": once, "files": files.len(), "bytes": bytes})
    );
    Ok(())
}

/// Where the restore limit writes its second copy, synced once (`<to>-once`).
fn once_dir(to: &Path) -> PathBuf {
    let mut name = to.as_os_str().to_owned();
    name.push("-once");
    PathBuf::from(name)
}

/// Create `files` under `to` and write them (see `restore`), durable when this returns: each
/// synced when finished (`fsync_each`), or the file system synced once at the end. Returns the
/// seconds it took.
fn write_files(
    to: &Path,
    files: &[(PathBuf, u64)],
    dirs: &[PathBuf],
    parallel: usize,
    fsync_each: bool,
) -> Result<f64> {
    let t = Instant::now();
    for d in dirs {
        std::fs::create_dir_all(to.join(d))?;
    }
    let buf = vec![0x5au8; 1 << 20];
    each_in_parallel(files, parallel, |_, (p, size)| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(to.join(p))?;
        let mut left = *size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        if fsync_each {
            f.sync_all()?;
        }
        Ok(())
    })?;
    if fsync_each {
        for d in dirs {
            File::open(to.join(d))?.sync_all()?;
        }
    } else if !std::process::Command::new("sync")
        .arg("-f")
        .arg(to)
        .status()?
        .success()
    {
        bail!("sync -f {} failed", to.display());
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Run `f` on every item, `parallel` threads taking the next item in order, each with a scratch
/// buffer of its own; the first error ends the run.
fn each_in_parallel<T: Sync>(
    items: &[T],
    parallel: usize,
    f: impl Fn(&mut Vec<u8>, &T) -> Result<()> + Sync,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..parallel.max(1))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut scratch = Vec::new();
                    while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
                        f(&mut scratch, item)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("thread panicked"))
    })
}
