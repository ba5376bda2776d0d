#!/usr/bin/env python3
"""Helpers for bench/rivals.py, retention_bench.py and encryption_bench.py; run as a script it
refuses (it compared with Debian's pgBackRest 2.45: see bench/rivals.py). What it measured:

Archive and restore benchmark: walvault (push alone, push + daemon) against pgBackRest
(asynchronous archiving, zst level 3, process-max 2) and plain cp, on the same real WAL, in one run.

1. Prepares real WAL once: a PostgreSQL 15 cluster runs pgbench mixed with inserts of random
   payloads; a base backup is taken first; every segment is copied out by archive_command = cp.
2. Archive: for each tool, a copy of the data directory gets all segments in pg_wal with .ready
   status files, and PostgreSQL's archiver loop is reproduced exactly (one archive_command at a
   time, oldest first, .ready renamed to .done on success). Measured: time until no .ready file is
   left, files/s, MiB/s, per-call latency (p50/p99), repository size, and the daemon's peak RSS.
3. Restore: the base backup replays all the WAL through each tool's restore_command (walvault with
   its prefetcher, pgBackRest archive-get with its async queue, cp), and once with the WAL already
   in pg_wal (the physical limit of recovery). Measured: time from start to end of recovery.

Prints a table and writes JSON. Measurements, never pass/fail.
Usage: bench/archive_bench.py [--wal-mib 1024] [--json bench/results/archive.json]
Needs root (runs PostgreSQL as postgres), PostgreSQL 15, pgbackrest (installed when missing).
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PG = os.environ.get("WALVAULT_PG_BIN", "/usr/lib/postgresql/15/bin")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, text=True, capture_output=True, **kw).stdout


def as_pg(cmd):
    return f"runuser -u postgres -- {cmd}" if os.geteuid() == 0 else cmd


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def chown(path):
    if os.geteuid() == 0:
        sh(f"chown -R postgres: {path}")


class Cluster:
    def __init__(self, work, name, data=None):
        self.dir = os.path.join(work, name)
        self.data = data or os.path.join(self.dir, "data")
        self.port = free_port()
        os.makedirs(self.dir, exist_ok=True)
        chown(self.dir)

    def ctl(self, action, extra=""):
        sh(as_pg(f"{PG}/pg_ctl -D {self.data} -l {self.dir}/log -w -t 3600 "
                 f"-o '-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1' {extra} {action}"))

    def psql(self, sql):
        return sh(f"{PG}/psql -X -q -At -h 127.0.0.1 -p {self.port} -U postgres -d postgres -c \"{sql}\"")


def prepare(work, wal_mib):
    src = Cluster(work, "source")
    walsrc = os.path.join(work, "walsrc")
    os.makedirs(walsrc)
    chown(walsrc)
    sh(as_pg(f"{PG}/initdb -A trust -U postgres -D {src.data}"))
    with open(os.path.join(src.data, "postgresql.conf"), "a") as f:
        f.write(f"archive_mode = on\narchive_command = 'cp %p {walsrc}/%f'\nmax_wal_size = 8GB\n"
                "checkpoint_timeout = 30min\n")
    src.ctl("start")
    src.psql("create table payload(id bigserial primary key, body text)")
    sh(f"{PG}/pgbench -h 127.0.0.1 -p {src.port} -U postgres -i -s 10 -q postgres")
    base = os.path.join(work, "base")
    sh(as_pg(f"{PG}/pg_basebackup -h 127.0.0.1 -p {src.port} -U postgres -D {base} -X none -c fast"))
    script = os.path.join(work, "payload.sql")
    with open(script, "w") as f:
        f.write("insert into payload(body) select string_agg(md5(random()::text), '') "
                "from generate_series(1, 64);\n")
    start_lsn = src.psql("select pg_current_wal_lsn()").strip()
    while True:
        sh(f"{PG}/pgbench -h 127.0.0.1 -p {src.port} -U postgres -c 2 -T 10 -n postgres "
           f"-f {script}@1 -b tpcb-like@4")
        done = int(src.psql(f"select pg_current_wal_lsn() - '{start_lsn}'::pg_lsn").strip())
        if done >= wal_mib << 20:
            break
    src.psql("select pg_switch_wal()")
    deadline = time.time() + 600
    while [f for f in os.listdir(os.path.join(src.data, "pg_wal/archive_status")) if f.endswith(".ready")]:
        if time.time() > deadline:
            sys.exit("source archiving did not finish")
        time.sleep(0.5)
    src.ctl("stop")
    segs = sorted(f for f in os.listdir(walsrc) if len(f) == 24)
    return src, base, walsrc, segs


def restore_run(work, label, base, restore_command=None, walsrc=None, segs=None):
    data = os.path.join(work, f"restore-{label}")
    shutil.copytree(base, data, symlinks=True)
    with open(os.path.join(data, "postgresql.auto.conf"), "a") as f:
        f.write("archive_mode = off\n")
        if restore_command:
            f.write(f"restore_command = '{restore_command}'\n")
    if restore_command:
        open(os.path.join(data, "recovery.signal"), "w").close()
    else:
        for s in segs:  # the physical limit: every segment already local
            shutil.copy(os.path.join(walsrc, s), os.path.join(data, "pg_wal", s))
    chown(data)
    sh("sync")
    c = Cluster(work, f"rc-{label}", data)
    t0 = time.time()
    c.ctl("start")  # -w returns once recovery has ended and connections are accepted
    while c.psql("select pg_is_in_recovery()").strip() == "t":
        time.sleep(0.05)
    elapsed = time.time() - t0
    c.ctl("stop", "-m fast")
    return {"seconds": round(elapsed, 2)}


def archiver_loop(pgdata, command):
    """PostgreSQL's archiver: one archive_command at a time, oldest .ready first, in pgdata."""
    status = os.path.join(pgdata, "pg_wal/archive_status")
    segs = sorted(f[:-6] for f in os.listdir(status) if f.endswith(".ready"))
    lat = []
    t0 = time.time()
    for s in segs:
        cmd = command.replace("%p", f"pg_wal/{s}").replace("%f", s)
        while True:
            # As pgarch.c: a .ready file that vanished (a tool's daemon marked the segment done
            # itself, as WAL-RUS's does) is skipped, and a failed rename to .done only warns.
            if not os.path.exists(os.path.join(status, s + ".ready")):
                break
            t = time.time()
            rc = subprocess.run(cmd, shell=True, cwd=pgdata, capture_output=True).returncode
            lat.append(time.time() - t)
            if rc == 0:
                try:
                    os.rename(os.path.join(status, s + ".ready"), os.path.join(status, s + ".done"))
                except FileNotFoundError:
                    pass
                break
            time.sleep(1)  # PostgreSQL waits before retrying a failed archive_command
    # t0 (Unix time) lets a caller measure from an earlier instant, e.g. when the .ready files appeared.
    print(json.dumps({"elapsed": time.time() - t0, "latencies": lat, "t0": t0}))


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--archiver-loop":
        return archiver_loop(sys.argv[2], sys.argv[3])
    sys.exit("bench/archive_bench.py no longer compares walvault with pgBackRest: it measured Debian's pgBackRest 2.45, "
             "which predates block incremental backups and bundling. Run bench/rivals.py (docs/BENCH.md); "
             "this file keeps the helpers rivals.py, retention_bench.py and encryption_bench.py use.")


if __name__ == "__main__":
    main()
