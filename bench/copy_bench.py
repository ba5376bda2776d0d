#!/usr/bin/env python3
"""What `archive-agent copy --to URL` achieves, and how far it is from what the machine allows.

1. A real source repository on file:// (a temporary directory on the local disk): a PostgreSQL 15
   cluster archiving through `archive-agent push`, `pgbench -i -s --scale`, one `archive-agent
   backup`, then pgbench (tpcb-like mixed with inserts of random payloads, as
   bench/archive_bench.py, but 8 KB payloads and synchronous_commit = off so that the WAL comes
   quickly on a shared machine) until the repository holds --repo-mib (or --max-wal-mib of WAL
   were written after the backup). The cluster is then stopped and removed: only the repository stays.
2. --repeat rounds, each with a fresh Garage (one node, loopback, plain HTTP, bench/s3_bench.py's
   Garage class) and fresh targets made by `archive-agent --repo TARGET init --copy-of SOURCE`:
   a. file:// -> S3 (`copy --to s3://...`, --parallel 8, the default),
   c. the same copy again right after (a): nothing to copy, the cost of the two listings,
   b. S3 -> file:// (the S3 copy of (a) copied to a fresh local directory, --parallel 8),
   a16. file:// -> S3 into another fresh bucket with --parallel 16.
   The page cache is dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before (a), (b) and (a16),
   so file:// reads come from disk (Garage's files are dropped too).
3. The physical limits, measured in the same round on the same objects without walvault:
   the source directory read cold (tar | cat, sequential; and 8 threads reading whole files),
   Garage accepting PUTs of the source's files (boto3, 8 and 16 threads, objects held in memory),
   Garage answering GETs of every object of the walvault copy (boto3, 8 threads, cold cache), and
   the local disk writing the same files as file:// does (temporary file, write, fsync, rename,
   fsync of the directory; 8 threads).
   The limit of file -> S3 is the slower of the cold read and the PUTs; of S3 -> file the slower
   of the GETs and the write+fsync. (Each is measured alone: doing both at once on 2 shared cores
   can only be slower.)

Measured for each copy: seconds (wall time of the command), the report's copied objects and bytes,
MB/s = copied bytes / seconds (MB = 10^6 bytes), CPU seconds (user+sys) of archive-agent and of
Garage during the copy, how busy the machine's CPUs were meanwhile (all processes, /proc/stat: near
100 % says the copy waited for CPU, not for requests), Garage's S3 requests by kind. Prints a markdown table (median and min-max
of the rounds) and writes JSON. Measurements, never pass/fail.

Usage: bench/copy_bench.py [--scale 50] [--repeat 3] [--repo-mib 1000] [--max-wal-mib 3072]
                           [--json bench/results/copy.json] [--keep]
Needs root (PostgreSQL runs as postgres; drop_caches), PostgreSQL 15, boto3 (pip install boto3),
the agents built (cargo build --release --workspace --bins) and garage 2.5.0 (~/.cargo/bin/garage,
or GARAGE_BIN). Stops everything it started on exit, failure or signal.
"""
import argparse
import concurrent.futures as cf
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import archive_bench as ab  # noqa: E402  (same directory; cluster helpers)
import encryption_bench as eb  # noqa: E402  (run, as_pg, wait_archived, du, stats, loadavg)
import s3_bench as sb  # noqa: E402  (Garage)

PG = ab.PG
ROOT = ab.ROOT
RELEASE = os.path.join(ROOT, "target", "release")
MB = 1e6


def drop_caches():
    """Write back and drop the page cache, so reads come from disk; False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def proc_cpu(pid):
    """CPU seconds (user + system) of a running process (its waited-for children included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(x) for x in fields[11:15]) / ticks


def machine_busy():
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def files_of(root):
    """Every regular file under root: (relative path, size), sorted."""
    out = []
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append((os.path.relpath(p, root), os.path.getsize(p)))
    return sorted(out)


class Agent:
    """archive-agent from a copy of target/release taken at start (a rebuild changes nothing)."""

    def __init__(self, path, config):
        self.path, self.config = path, config

    def argv(self, repo, *rest):
        return [self.path, "--repo", repo, "--config", self.config, *rest]

    def init_copy(self, target, source):
        eb.run(self.argv(target, "init", "--copy-of", source))

    def copy(self, source, target, parallel, garage):
        """One `copy --to`, timed, with its report and the CPU it and Garage spent."""
        c0, g0, m0, t0 = eb.children_cpu(), proc_cpu(garage.proc.pid), machine_busy(), time.time()
        k0 = garage.counters()
        p = subprocess.run(self.argv(source, "copy", "--to", target, "--parallel", str(parallel), "--json"),
                           text=True, capture_output=True)
        seconds = time.time() - t0
        cpu, gcpu, m1 = eb.children_cpu() - c0, proc_cpu(garage.proc.pid) - g0, machine_busy()
        if p.returncode != 0:
            raise RuntimeError(f"copy {source} -> {target} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        rep = json.loads(p.stdout)
        copied = rep["copied"]
        return {"seconds": round(seconds, 3), "report_seconds": round(rep["seconds"], 3),
                "objects": copied["objects"], "bytes": copied["bytes"],
                "present_objects": rep["present"]["objects"],
                "mb_per_s": round(copied["bytes"] / MB / seconds, 1),
                "agent_cpu_seconds": round(cpu, 2), "garage_cpu_seconds": round(gcpu, 2),
                "machine_cpu_busy": round((m1[0] - m0[0]) / max(1, m1[1] - m0[1]), 3),
                "s3": sb.counter_delta(k0, garage.counters())}


def s3_client(garage, threads):
    import boto3  # noqa: PLC0415  (only here)
    from botocore.config import Config  # noqa: PLC0415
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{garage.s3_port}", region_name=sb.REGION,
                        aws_access_key_id=garage.key_id, aws_secret_access_key=garage.secret,
                        config=Config(max_pool_connections=threads + 4, s3={"addressing_style": "path"},
                                      retries={"max_attempts": 5, "mode": "standard"},
                                      request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required"))


def timed_pool(threads, fn, items):
    t0 = time.time()
    with cf.ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(fn, items))
    return time.time() - t0, total


def raw_put(garage, bucket, objects, threads):
    """PUT every (key, bytes) with `threads` at once; objects are in memory already."""
    s3 = s3_client(garage, threads)
    g0 = proc_cpu(garage.proc.pid)
    seconds, total = timed_pool(threads, lambda kv: (s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]),
                                                     len(kv[1]))[1], objects)
    return {"seconds": round(seconds, 3), "objects": len(objects), "bytes": total,
            "mb_per_s": round(total / MB / seconds, 1),
            "garage_cpu_seconds": round(proc_cpu(garage.proc.pid) - g0, 2)}


def raw_get(garage, bucket, threads):
    """GET every object of a bucket (listed first, untimed) with `threads` at once, cold cache."""
    s3 = s3_client(garage, threads)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    drop_caches()
    g0 = proc_cpu(garage.proc.pid)
    seconds, total = timed_pool(threads, lambda k: len(s3.get_object(Bucket=bucket, Key=k)["Body"].read()), keys)
    return {"seconds": round(seconds, 3), "objects": len(keys), "bytes": total,
            "mb_per_s": round(total / MB / seconds, 1),
            "garage_cpu_seconds": round(proc_cpu(garage.proc.pid) - g0, 2)}


def raw_write(dest, objects, threads):
    """Write every (relative path, bytes) under dest as a durable local write: temporary file,
    write, fsync, rename, fsync of the directory. Directories are made first (untimed)."""
    for d in sorted({os.path.dirname(k) for k, _ in objects}):
        os.makedirs(os.path.join(dest, d), exist_ok=True)
    drop_caches()

    def write(kv):
        path = os.path.join(dest, kv[0])
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(kv[1])
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        dfd = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return len(kv[1])

    seconds, total = timed_pool(threads, write, objects)
    return {"seconds": round(seconds, 3), "objects": len(objects), "bytes": total,
            "mb_per_s": round(total / MB / seconds, 1)}


def read_sequential(src, nbytes):
    """The source directory read once, cold: tar | cat > /dev/null (tar alone skips reading
    when its output is /dev/null)."""
    drop_caches()
    t0 = time.time()
    subprocess.run(f"tar cf - -C {src} . | cat > /dev/null", shell=True, check=True)
    seconds = time.time() - t0
    return {"seconds": round(seconds, 3), "bytes": nbytes, "mb_per_s": round(nbytes / MB / seconds, 1)}


def read_parallel(src, files, threads):
    """Every source file read whole, cold, `threads` at once."""
    drop_caches()

    def read(rel):
        with open(os.path.join(src, rel[0]), "rb") as f:
            return len(f.read())

    seconds, total = timed_pool(threads, read, files)
    return {"seconds": round(seconds, 3), "bytes": total, "mb_per_s": round(total / MB / seconds, 1)}


def build_source(work, agent, scale, repo_mib, max_wal_mib):
    """The file:// repository to copy: a cluster archiving through push, a backup, more WAL."""
    repos = os.path.join(work, "repos")
    os.makedirs(repos)
    ab.chown(repos)
    src = os.path.join(repos, "source")
    url = f"file://{src}"
    db = ab.Cluster(work, "db")
    try:
        eb.run(eb.as_pg([f"{PG}/initdb", "-A", "trust", "-U", "postgres", "-D", db.data]))
        eb.run(eb.as_pg([agent, "--repo", url, "init", "--pgdata", db.data]))
        with open(os.path.join(db.data, "postgresql.conf"), "a") as f:
            f.write(f"archive_mode = on\narchive_command = '{agent} push --repo {url} %p'\n"
                    "max_wal_size = 1GB\ncheckpoint_timeout = 30min\nsynchronous_commit = off\n")
        db.ctl("start")
        pgbench = [f"{PG}/pgbench", "-h", "127.0.0.1", "-p", str(db.port), "-U", "postgres"]
        log(f"pgbench -i -s {scale} ...")
        eb.run(pgbench + ["-i", "-s", str(scale), "-q", "postgres"])
        db.psql("vacuum analyze")
        db.psql("checkpoint")
        db_bytes = int(db.psql("select sum(pg_database_size(oid)) from pg_database").strip())
        conn = f"host=127.0.0.1 port={db.port} user=postgres dbname=postgres"
        log("backup ...")
        t = time.time()
        eb.run(eb.as_pg([agent, "--repo", url, "backup", "--pgdata", db.data, "--pg-url", conn, "--json"]))
        log(f"backup took {time.time() - t:.1f} s; more WAL until the repository holds {repo_mib} MiB ...")
        db.psql("create table payload(id bigserial primary key, body text)")
        script = os.path.join(db.dir, "payload.sql")
        with open(script, "w") as f:
            f.write("insert into payload(body) select string_agg(md5(random()::text), '') "
                    "from generate_series(1, 256);\n")
        start = db.psql("select pg_current_wal_lsn()").strip()
        wal = 0
        while eb.du(src) < repo_mib << 20 and wal < max_wal_mib << 20:
            eb.run(pgbench + ["-c", "2", "-T", "15", "-n", "-f", f"{script}@1", "-b", "tpcb-like@4", "postgres"])
            wal = int(db.psql(f"select pg_current_wal_lsn() - '{start}'::pg_lsn").strip())
            log(f"  {wal >> 20} MiB more WAL, repository {eb.du(src) >> 20} MiB")
        db.psql("select pg_switch_wal()")
        eb.wait_archived(db.data, timeout=1800)
    finally:
        subprocess.run(eb.as_pg([f"{PG}/pg_ctl", "-D", db.data, "-m", "fast", "-w", "stop"]), capture_output=True)
    shutil.rmtree(db.dir, ignore_errors=True)
    return src, {"pgbench_scale": scale, "database_bytes": db_bytes, "wal_after_backup_bytes": wal}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=50, help="pgbench scale of the backed-up database")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--repo-mib", type=int, default=1000, help="grow the source repository to this size with WAL")
    ap.add_argument("--max-wal-mib", type=int, default=3072, help="... or stop after this much WAL")
    ap.add_argument("--json", default=os.path.join(ROOT, "bench/results/copy.json"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: PostgreSQL runs as postgres, and the page cache is dropped")
    if not os.path.exists(os.path.join(RELEASE, "archive-agent")):
        sys.exit(f"{RELEASE}/archive-agent is missing: cargo build --release --workspace --bins")
    try:
        import boto3  # noqa: F401,PLC0415
    except ImportError:
        sys.exit("boto3 is missing: pip install boto3")
    for k in list(os.environ):
        if k.startswith("AWS_") and k != "AWS_CA_BUNDLE":
            del os.environ[k]  # the [s3] table of the configuration file says everything

    # A signal ends the run through the finally blocks below (Garage and PostgreSQL stopped).
    def stop(signum, _frame):
        raise SystemExit(f"signal {signum}")
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, stop)

    load_start = eb.loadavg()
    work = tempfile.mkdtemp(prefix="walvault-copy-bench.")
    os.chmod(work, 0o755)
    binp = os.path.join(work, "bin")
    os.makedirs(binp)
    shutil.copy(os.path.join(RELEASE, "archive-agent"), binp)
    agent_path = os.path.join(binp, "archive-agent")
    ab.chown(work)
    version = eb.run([agent_path, "--version"]).strip()
    head = eb.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], check=False).strip()
    dirty = eb.run(["git", "-C", ROOT, "status", "--short", "--untracked-files=no"], check=False).strip()
    built = time.strftime("%Y-%m-%d %H:%M:%S",
                          time.localtime(os.path.getmtime(os.path.join(RELEASE, "archive-agent"))))
    config = os.path.join(work, "walvault.toml")
    garage = None
    rounds = []
    try:
        src, source_info = build_source(work, agent_path, args.scale, args.repo_mib, args.max_wal_mib)
        files = files_of(src)
        src_bytes = sum(n for _, n in files)
        source_info.update(files=len(files), bytes=src_bytes,
                           largest_file_bytes=max(n for _, n in files),
                           by_directory={})
        for rel, n in files:
            top = rel.split("/")[0] if "/" in rel else "(root)"
            d = source_info["by_directory"].setdefault(top, {"files": 0, "bytes": 0})
            d["files"] += 1
            d["bytes"] += n
        log(f"source repository: {len(files)} files, {src_bytes / MB:.1f} MB: {source_info['by_directory']}")
        # The same objects, in memory, for the raw PUT and write baselines (keys as walvault's).
        objects = []
        for rel, _ in files:
            with open(os.path.join(src, rel), "rb") as f:
                objects.append((rel, f.read()))
        can_drop = drop_caches()
        if not can_drop:
            log("warning: cannot drop the page cache: file:// reads may come from memory")

        for rnd in range(args.repeat):
            r = {"loadavg_start": eb.loadavg()}
            log(f"round {rnd + 1}/{args.repeat}, load {r['loadavg_start']}")
            gdir = os.path.join(work, f"garage-r{rnd}")
            os.makedirs(gdir)
            garage = sb.Garage(gdir)
            garage.start()
            with open(config, "w") as f:
                f.write(f'[s3]\nendpoint = "http://127.0.0.1:{garage.s3_port}"\nregion = "{sb.REGION}"\n'
                        f'access_key_id = "{garage.key_id}"\nsecret_access_key = "{garage.secret}"\n'
                        "allow_http = true\n")
            os.chmod(config, 0o600)
            agent = Agent(agent_path, config)
            srcurl = f"file://{src}"

            r["read_sequential"] = read_sequential(src, src_bytes)
            r["read_8_threads"] = read_parallel(src, files, 8)
            log(f"  cold read: sequential {r['read_sequential']['mb_per_s']} MB/s, "
                f"8 threads {r['read_8_threads']['mb_per_s']} MB/s")

            a = f"s3://{garage.bucket(f'copy-a-r{rnd}')}/repo"
            agent.init_copy(a, srcurl)
            drop_caches()
            r["file_to_s3"] = agent.copy(srcurl, a, 8, garage)
            log(f"  file -> S3 --parallel 8: {r['file_to_s3']['seconds']} s, {r['file_to_s3']['mb_per_s']} MB/s, "
                f"agent CPU {r['file_to_s3']['agent_cpu_seconds']} s, Garage CPU {r['file_to_s3']['garage_cpu_seconds']} s")
            r["again"] = agent.copy(srcurl, a, 8, garage)
            log(f"  again: {r['again']['seconds']} s, {r['again']['objects']} objects copied")
            if r["again"]["objects"]:
                log("  warning: the second copy copied objects")

            b = f"file://{os.path.join(work, f'copy-b-r{rnd}')}"
            agent.init_copy(b, a)
            drop_caches()
            r["s3_to_file"] = agent.copy(a, b, 8, garage)
            log(f"  S3 -> file --parallel 8: {r['s3_to_file']['seconds']} s, {r['s3_to_file']['mb_per_s']} MB/s, "
                f"agent CPU {r['s3_to_file']['agent_cpu_seconds']} s, Garage CPU {r['s3_to_file']['garage_cpu_seconds']} s")
            shutil.rmtree(b[len("file://"):])

            a16 = f"s3://{garage.bucket(f'copy-a16-r{rnd}')}/repo"
            agent.init_copy(a16, srcurl)
            drop_caches()
            r["file_to_s3_p16"] = agent.copy(srcurl, a16, 16, garage)
            log(f"  file -> S3 --parallel 16: {r['file_to_s3_p16']['seconds']} s, {r['file_to_s3_p16']['mb_per_s']} MB/s")

            # Limits: the same objects without walvault.
            r["raw_put_8"] = raw_put(garage, garage.bucket(f"raw8-r{rnd}"), objects, 8)
            r["raw_put_16"] = raw_put(garage, garage.bucket(f"raw16-r{rnd}"), objects, 16)
            r["raw_get_8"] = raw_get(garage, f"copy-a-r{rnd}", 8)
            wdir = os.path.join(work, f"raw-write-r{rnd}")
            r["raw_write_fsync_8"] = raw_write(wdir, objects, 8)
            shutil.rmtree(wdir)
            log(f"  raw PUT 8 {r['raw_put_8']['mb_per_s']} MB/s, 16 {r['raw_put_16']['mb_per_s']} MB/s; "
                f"GET 8 {r['raw_get_8']['mb_per_s']} MB/s; write+fsync 8 {r['raw_write_fsync_8']['mb_per_s']} MB/s")
            r["loadavg_end"] = eb.loadavg()
            rounds.append(r)
            garage.stop()
            garage = None
            shutil.rmtree(gdir, ignore_errors=True)
    finally:
        if garage:
            garage.stop()
        sb.kill_own(work, "archive-agent")
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    load_end = eb.loadavg()

    def summary(key, field):
        vals = [r[key][field] for r in rounds]
        return eb.stats(vals)

    def cell(key, field, fmt="{:.1f}"):
        s = summary(key, field)
        f = fmt.format
        return f"{f(s['median'])} ({f(s['min'])}-{f(s['max'])})" if len(s["runs"]) > 1 else f(s["median"])

    keys = ["file_to_s3", "file_to_s3_p16", "again", "s3_to_file", "read_sequential", "read_8_threads",
            "raw_put_8", "raw_put_16", "raw_get_8", "raw_write_fsync_8"]
    results = {k: {f: summary(k, f) for f in rounds[0][k] if isinstance(rounds[0][k][f], (int, float))}
               for k in keys}
    med = {k: results[k]["mb_per_s"]["median"] for k in keys if "mb_per_s" in results[k]}
    limit_up = min(med["read_sequential"], med["raw_put_8"])
    limit_up_by = "cold sequential read of the source" if med["read_sequential"] < med["raw_put_8"] else "Garage PUTs (8 at once)"
    limit_down = min(med["raw_get_8"], med["raw_write_fsync_8"])
    limit_down_by = "Garage GETs (8 at once)" if med["raw_get_8"] < med["raw_write_fsync_8"] else "local write+fsync (8 at once)"

    limit_16 = min(med["read_sequential"], med["raw_put_16"])
    limit_16_by = "cold sequential read of the source" if med["read_sequential"] < med["raw_put_16"] else "Garage PUTs (16 at once)"
    lines = ["| copy | seconds | MB/s | objects copied | archive-agent CPU s | Garage CPU s | machine CPU busy | "
             "limit MB/s (what) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for label, k, lim in [("file:// -> S3, --parallel 8", "file_to_s3", f"{limit_up:.1f} ({limit_up_by})"),
                          ("file:// -> S3, --parallel 16", "file_to_s3_p16", f"{limit_16:.1f} ({limit_16_by})"),
                          ("again right after, nothing to copy", "again", "-"),
                          ("S3 -> file://, --parallel 8", "s3_to_file", f"{limit_down:.1f} ({limit_down_by})")]:
        mbps = cell(k, "mb_per_s") if k != "again" else "-"
        busy = f"{results[k]['machine_cpu_busy']['median'] * 100:.0f} %"
        lines.append(f"| {label} | {cell(k, 'seconds', '{:.2f}')} | {mbps} | {cell(k, 'objects', '{:.0f}')} | "
                     f"{cell(k, 'agent_cpu_seconds')} | {cell(k, 'garage_cpu_seconds')} | {busy} | {lim} |")
    lines += ["", "| physical limit, same objects, no walvault | seconds | MB/s | Garage CPU s |", "|---|---:|---:|---:|"]
    for label, k in [("source read cold, sequential (tar \\| cat)", "read_sequential"),
                     ("source read cold, 8 threads", "read_8_threads"),
                     ("Garage PUT, boto3, 8 at once (from memory)", "raw_put_8"),
                     ("Garage PUT, boto3, 16 at once (from memory)", "raw_put_16"),
                     ("Garage GET, boto3, 8 at once (cold)", "raw_get_8"),
                     ("local write+fsync+rename+dir fsync, 8 at once", "raw_write_fsync_8")]:
        g = cell(k, "garage_cpu_seconds") if "garage_cpu_seconds" in results[k] else "-"
        lines.append(f"| {label} | {cell(k, 'seconds', '{:.2f}')} | {cell(k, 'mb_per_s')} | {g} |")
    table = "\n".join(lines)
    header = (f"source repository: {source_info['files']} files, {source_info['bytes'] / MB:.1f} MB "
              f"(pgbench scale {args.scale}, one backup, {source_info['wal_after_backup_bytes'] >> 20} MiB WAL after it); "
              f"{args.repeat} rounds, median (min-max); MB = 10^6 bytes; page cache dropped: {can_drop}; "
              f"{os.cpu_count()} CPUs, load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; "
              f"Garage one node on loopback, plain HTTP; {version} ({head}{', tree modified' if dirty else ''})")
    print(f"\n{header}\n\n{table}\n")
    doc = {"settings": {"scale": args.scale, "repeat": args.repeat, "repo_mib": args.repo_mib,
                        "max_wal_mib": args.max_wal_mib, "page_cache_dropped": can_drop},
           "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname()), "loadavg_start": load_start,
                       "loadavg_end": load_end},
           "binaries": {"version": version, "git_head": head, "tree_modified": bool(dirty), "built": built},
           "source": source_info, "results": results,
           "limits": {"file_to_s3_mb_per_s": limit_up, "file_to_s3_by": limit_up_by,
                      "file_to_s3_parallel_16_mb_per_s": limit_16, "file_to_s3_parallel_16_by": limit_16_by,
                      "s3_to_file_mb_per_s": limit_down, "s3_to_file_by": limit_down_by},
           "rounds": rounds, "table": table}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
