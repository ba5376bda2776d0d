#!/usr/bin/env python3
"""Helpers for bench/rivals.py, retention_bench.py and encryption_bench.py; run as a script it
refuses (it compared with Debian's pgBackRest 2.45: see bench/rivals.py). What it measured:

WAL archive, WAL restore, base backup and restore to an S3 store (Garage, one node, loopback):
walvault against pgBackRest 2.45 writing to the same Garage, each measurement repeated.

The method is bench/archive_bench.py's, with its functions: one real WAL backlog (pgbench mixed
with inserts of random payloads) is drained by PostgreSQL's archiver loop reproduced exactly (one
archive_command at a time, oldest first) through each tool into its own fresh bucket, then
replayed into a base backup through each tool's restore_command. pgBackRest needs TLS for S3, so
stunnel (self-signed certificate) sits in front of Garage; walvault is measured both over plain
HTTP and through the same stunnel (AWS_ALLOW_INVALID_CERTIFICATES=true). Then a base backup of a
pgbench database into a fresh bucket per tool and a restore of it.

Archive variants: walvault push alone (against pgBackRest archive-push, synchronous), walvault
push + daemon (--parallel 2, against pgBackRest archive-async=y, process-max=2). The daemon is
started before the .ready files appear and timed from the moment they appear, so it gets no head
start. Both tools compress with zstd level 3. One more pair with 4 uploads at once (daemon
--parallel 4 against process-max 4). Base backup restores also run once more with more requests in
flight (walvault --parallel 16, pgBackRest --process-max 8).

Measured per run: seconds, MiB/s, archive_command p50/p99, bytes and objects stored in the bucket
(Garage's admin API), S3 requests by kind (Garage's metrics), warnings the tools logged, and the
daemon's peak RSS. Prints medians with min-max over the repetitions and the walvault/pgBackRest
ratio of each repetition, and writes every run to JSON. Measurements, never pass/fail.

Usage: bench/s3_bench.py [--wal-mib 1024] [--repeat 3] [--backup-scale 50] [--no-backup]
                         [--daemon-parallel 2] [--json bench/results/s3.json] [--keep]
Needs root (runs PostgreSQL as postgres), PostgreSQL 15. Installs pgbackrest and stunnel4 (apt)
and garage 2.5.0 (cargo install, ~15 min) when missing. Stops everything it started on exit,
failure or signal.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import archive_bench as ab  # noqa: E402  (same directory; its method and helpers)

PG = ab.PG
ROOT = ab.ROOT
GARAGE = os.environ.get("GARAGE_BIN", os.path.expanduser("~/.cargo/bin/garage"))
REGION = "garage"


def run(cmd, env=None, check=True):
    """Run a shell command, return stdout; on failure show what it printed."""
    p = subprocess.run(cmd, shell=True, text=True, capture_output=True, env=env)
    if check and p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {cmd}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p.stdout


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


class Garage:
    """A one-node Garage on loopback, with one access key allowed on every bucket it creates."""

    def __init__(self, work):
        self.dir = os.path.join(work, "garage")
        os.makedirs(self.dir)
        self.s3_port, self.rpc_port, self.admin_port = ab.free_port(), ab.free_port(), ab.free_port()
        self.cfg = os.path.join(self.dir, "garage.toml")
        with open(self.cfg, "w") as f:
            # Both tools send zstd-compressed objects: Garage's own block compression would only
            # spend the shared CPU. Capacity is a placement weight, not a quota.
            f.write(f"""metadata_dir = "{self.dir}/meta"
data_dir = "{self.dir}/data"
db_engine = "sqlite"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:{self.rpc_port}"
rpc_public_addr = "127.0.0.1:{self.rpc_port}"
rpc_secret = "{os.urandom(32).hex()}"
[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{self.s3_port}"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:{self.admin_port}"
""")
        os.chmod(self.cfg, 0o600)
        self.proc = None

    def start(self):
        self.log = open(os.path.join(self.dir, "server.log"), "w")
        self.proc = subprocess.Popen([GARAGE, "-c", self.cfg, "server"], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.s3_port)
        node = None
        deadline = time.time() + 30
        while node is None and time.time() < deadline:
            out = run(f"{GARAGE} -c {self.cfg} status", check=False)
            node = next((l.split()[0] for l in out.splitlines()
                         if re.match(r"^[0-9a-f]{16}\s", l)), None)
            time.sleep(0.2)
        if node is None:
            raise RuntimeError("garage status shows no node")
        self.cli(f"layout assign -z dc1 -c 100G {node}")
        self.cli("layout apply --version 1")
        self.key_id = "GK" + os.urandom(12).hex()
        self.secret = os.urandom(32).hex()
        self.cli(f"key import --yes -n bench {self.key_id} {self.secret}")

    def cli(self, args):
        return run(f"{GARAGE} -c {self.cfg} {args}")

    def bucket(self, name):
        self.cli(f"bucket create {name}")
        self.cli(f"bucket allow --read --write --owner {name} --key bench")
        return name

    def bucket_info(self, name):
        """Bytes and objects in a bucket. Garage updates these counters asynchronously: read
        until two reads a second apart agree."""
        last = None
        for _ in range(30):
            info = json.loads(self.cli(f"json-api GetBucketInfo '{json.dumps({'globalAlias': name})}'"))
            cur = (info["bytes"], info["objects"])
            if cur == last:
                break
            last = cur
            time.sleep(1)
        return {"bytes": last[0], "objects": last[1]}

    def counters(self):
        """S3 requests by endpoint, errors by endpoint and status, server seconds by endpoint."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=10).read().decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r'^(api_s3_request_counter|api_s3_error_counter|api_s3_request_duration_sum)\{([^}]*)\} (\S+)$', line)
            if m:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
                key = labels.get("api_endpoint", "?") + (f" {labels['status_code']}" if "status_code" in labels else "")
                out.setdefault(m.group(1), {})[key] = float(m.group(3))
        return out

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def counter_delta(before, after):
    out = {}
    for metric, values in after.items():
        d = {k: round(v - before.get(metric, {}).get(k, 0.0), 3) for k, v in values.items()}
        d = {k: (int(v) if metric != "api_s3_request_duration_sum" else v) for k, v in d.items() if v}
        if d:
            out[{"api_s3_request_counter": "requests", "api_s3_error_counter": "errors",
                 "api_s3_request_duration_sum": "server_seconds"}[metric]] = dict(sorted(d.items()))
    return out


def s3_env(garage, tls_port=None):
    """The environment walvault reads (the postmaster's when PostgreSQL runs the commands)."""
    env = {"AWS_ACCESS_KEY_ID": garage.key_id, "AWS_SECRET_ACCESS_KEY": garage.secret,
           "AWS_REGION": REGION}
    if tls_port:
        env.update(AWS_ENDPOINT_URL=f"https://127.0.0.1:{tls_port}", AWS_ALLOW_INVALID_CERTIFICATES="true")
    else:
        env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{garage.s3_port}", AWS_ALLOW_HTTP="true")
    return env


class Env:
    """Set the walvault S3 environment in this process for the duration of a block (children,
    including pg_ctl's postmaster and runuser's commands, inherit it)."""

    KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL",
            "AWS_ALLOW_HTTP", "AWS_ALLOW_INVALID_CERTIFICATES")

    def __init__(self, env):
        self.env = env

    def __enter__(self):
        for k in self.KEYS:
            os.environ.pop(k, None)
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k in self.KEYS:
            os.environ.pop(k, None)


def own_pids(work):
    """Processes still running a binary or a configuration from this run's work directory."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if work in cmd:
            pids.append(int(pid))
    return pids


def kill_own(work, match):
    """End leftover processes of this run (daemons, prefetchers, pgBackRest async workers) by
    pid: only those whose command line names this run's work directory and `match`."""
    for pid in own_pids(work):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace").replace("\0", " ")
            if match in cmd:
                os.kill(pid, signal.SIGTERM)
        except OSError:
            pass


def main():
    sys.exit("bench/s3_bench.py no longer compares walvault with pgBackRest: it measured Debian's pgBackRest 2.45, "
             "which predates block incremental backups and bundling. Run bench/rivals.py (docs/BENCH.md); "
             "this file keeps the helpers rivals.py, retention_bench.py and encryption_bench.py use.")


if __name__ == "__main__":
    main()
