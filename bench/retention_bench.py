#!/usr/bin/env python3
"""Expire and verify on a large repository on S3 (Garage, one node, loopback): wall time and the
S3 requests each makes, by kind (Garage's own request counters).

Builds a real repository first: a PostgreSQL 15 cluster (initdb --wal-segsize=1, so that 5,000
segments take 5 GB of WAL writes rather than 80 GB; expire and verify list, read and delete
objects, whose number, not size, drives their requests) archives into an s3:// repository with
archive_command = 'archive-agent push %p' and the daemon (--parallel 4), while a DO loop writes
and switches WAL, and `archive-agent backup` runs every --segments/--backups segments. Then, each
timed with the requests counted:

  restore-agent verify                 (listing-based)
  restore-agent verify --deep          (reads and hash-checks every object)
  archive-agent expire --keep-last 7   (deletes the older backups, their WAL, summaries, chunks)
  archive-agent expire --keep-last 7   (again: nothing left to do)
  restore-agent verify                 (after)

Prints a table and writes JSON. Measurements, never pass/fail.
Usage: bench/retention_bench.py [--backups 30] [--segments 5000] [--json bench/results/retention.json]
Needs root (runs PostgreSQL as postgres), PostgreSQL 15, garage 2.5.0 (~/.cargo/bin/garage), and
the agents built with `cargo build --release`.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import archive_bench as ab  # noqa: E402
import s3_bench as sb  # noqa: E402

BIN = os.path.join(ab.ROOT, "target", "release")
ARCHIVE_AGENT = os.path.join(BIN, "archive-agent")
RESTORE_AGENT = os.path.join(BIN, "restore-agent")


def timed(garage, cmd):
    """Run an agent command; return (seconds, requests by kind, stdout)."""
    before = garage.counters()
    t = time.time()
    p = subprocess.run(cmd, shell=True, text=True, capture_output=True)
    secs = time.time() - t
    if p.returncode not in (0, 1):
        raise RuntimeError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    delta = sb.counter_delta(before, garage.counters())
    return secs, delta.get("requests", {}), p.stdout, p.returncode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backups", type=int, default=30)
    ap.add_argument("--segments", type=int, default=5000)
    ap.add_argument("--json", default=os.path.join(ab.ROOT, "bench/results/retention.json"))
    args = ap.parse_args()
    for b in (ARCHIVE_AGENT, RESTORE_AGENT):
        if not os.path.exists(b):
            sys.exit(f"{b} is missing: run cargo build --release first")
    work = tempfile.mkdtemp(prefix="walvault-retention-bench-")
    ab.chown(work)
    garage = sb.Garage(work)
    daemon = None
    src = None
    try:
        garage.start()
        bucket = garage.bucket("retention")
        repo = f"s3://{bucket}/repo"
        env = sb.s3_env(garage)
        with sb.Env(env):
            src = ab.Cluster(work, "source")
            ab.sh(ab.as_pg(f"{ab.PG}/initdb -A trust -U postgres --wal-segsize=1 -D {src.data}"))
            ab.sh(f"{ARCHIVE_AGENT} init --repo {repo}")
            with open(os.path.join(src.data, "postgresql.conf"), "a") as f:
                f.write(f"archive_mode = on\narchive_command = '{ARCHIVE_AGENT} push --repo {repo} %p'\n"
                        "max_wal_size = 2GB\ncheckpoint_timeout = 30min\n")
            src.ctl("start")
            daemon = subprocess.Popen(
                ab.as_pg(f"{ARCHIVE_AGENT} daemon --repo {repo} --pgdata {src.data} --parallel 4"),
                shell=True, stdout=open(os.path.join(work, "daemon.log"), "w"), stderr=subprocess.STDOUT,
                start_new_session=True)
            src.psql("create table t(id bigserial primary key, body text)")
            per_backup = args.segments // args.backups
            build = time.time()
            for i in range(args.backups):
                src.psql(f"do \\$\\$ begin for i in 1..{per_backup} loop "
                         "insert into t(body) values (md5(random()::text)); perform pg_switch_wal(); "
                         "end loop; end \\$\\$")
                ab.sh(f"{ARCHIVE_AGENT} backup --repo {repo} --pgdata {src.data} "
                      f"--pg-url 'host=127.0.0.1 port={src.port} user=postgres dbname=postgres'")
                print(f"backup {i + 1}/{args.backups}", file=sys.stderr)
            src.psql("select pg_switch_wal()")
            status = os.path.join(src.data, "pg_wal/archive_status")
            while [f for f in os.listdir(status) if f.endswith(".ready")]:
                time.sleep(1)
            build = time.time() - build
            info = garage.bucket_info(bucket)
            print(f"repository built in {build:.0f} s: {info['objects']} objects, {info['bytes']} bytes",
                  file=sys.stderr)
            steps = [
                ("verify", f"{RESTORE_AGENT} verify --repo {repo}"),
                ("verify --deep", f"{RESTORE_AGENT} verify --repo {repo} --deep"),
                ("expire --keep-last 7", f"{ARCHIVE_AGENT} expire --repo {repo} --keep-last 7 --json"),
                ("expire --keep-last 7 (again)", f"{ARCHIVE_AGENT} expire --repo {repo} --keep-last 7 --json"),
                ("verify (after expire)", f"{RESTORE_AGENT} verify --repo {repo}"),
            ]
            results = []
            for label, cmd in steps:
                secs, requests, out, code = timed(garage, cmd)
                row = {"step": label, "seconds": round(secs, 2), "requests": requests,
                       "total_requests": sum(requests.values()), "exit": code}
                if label.startswith("expire"):
                    rep = json.loads(out)
                    row["deleted"] = {k: rep[k] for k in ("backups", "wal", "summaries", "chunks")}
                if label.startswith("verify"):
                    row["summary"] = out.strip().splitlines()[-1]
                results.append(row)
            after = garage.bucket_info(bucket)
        doc = {"backups": args.backups, "segments": args.segments, "wal_segment_size": "1 MiB",
               "repository_before": info, "repository_after": after, "build_seconds": round(build),
               "results": results}
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"repository: {args.backups} backups, {info['objects']} objects, {info['bytes']} bytes "
              f"(after expire: {after['objects']} objects, {after['bytes']} bytes)")
        print(f"{'step':<30} {'seconds':>8} {'requests':>9}  by kind")
        for r in results:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["requests"].items()))
            print(f"{r['step']:<30} {r['seconds']:>8.2f} {r['total_requests']:>9}  {kinds}")
        print(f"JSON: {args.json}")
    finally:
        if daemon and daemon.poll() is None:
            subprocess.run(f"pkill -TERM -g {daemon.pid}", shell=True)
            daemon.wait(timeout=60)
        if src:
            try:
                src.ctl("stop", "-m fast")
            except Exception:  # noqa: BLE001 (best effort on the way out)
                pass
        garage.stop()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
