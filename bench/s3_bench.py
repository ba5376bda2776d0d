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


class Stunnel:
    """TLS in front of Garage's S3 port, with a self-signed certificate for 127.0.0.1."""

    def __init__(self, work, backend_port):
        self.proc = None
        self.dir = os.path.join(work, "stunnel")
        os.makedirs(self.dir)
        self.port = ab.free_port()
        crt, key = os.path.join(self.dir, "tls.crt"), os.path.join(self.dir, "tls.key")
        run(f"openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 "
            f"-addext subjectAltName=IP:127.0.0.1 -keyout {key} -out {crt}")
        cfg = os.path.join(self.dir, "stunnel.conf")
        with open(cfg, "w") as f:
            f.write(f"foreground = yes\npid =\n[s3]\naccept = 127.0.0.1:{self.port}\n"
                    f"connect = 127.0.0.1:{backend_port}\ncert = {crt}\nkey = {key}\n")
        self.log = open(os.path.join(self.dir, "stunnel.log"), "w")
        self.proc = subprocess.Popen(["stunnel", cfg], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_port(self.port)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


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


def pgbackrest_conf(work, name, garage, tls_port, bucket, pgdata, port, sockdir, async_=True, extra="",
                    process_max=2):
    """A pgBackRest configuration for one bucket, with its own spool and lock directories."""
    spool = os.path.join(work, f"pgbr-spool-{name}")
    os.makedirs(spool, exist_ok=True)
    ab.chown(spool)
    path = os.path.join(work, f"pgbackrest-{name}.conf")
    with open(path, "w") as f:
        f.write(f"""[global]
repo1-type=s3
repo1-path=/repo
repo1-s3-bucket={bucket}
repo1-s3-endpoint=127.0.0.1
repo1-s3-uri-style=path
repo1-s3-region={REGION}
repo1-s3-key={garage.key_id}
repo1-s3-key-secret={garage.secret}
repo1-storage-port={tls_port}
repo1-storage-verify-tls=n
repo1-retention-full=9
compress-type=zst
compress-level=3
process-max={process_max}
archive-async={'y' if async_ else 'n'}
archive-push-queue-max=16GiB
archive-get-queue-max=2GiB
start-fast=y
spool-path={spool}
lock-path={spool}
log-path={spool}
log-level-console=warn
log-level-file=off
{extra}[bench]
pg1-path={pgdata}
pg1-port={port}
pg1-socket-path={sockdir}
""")
    os.chmod(path, 0o640)
    ab.chown(path)
    return path


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


def count_warnings(path):
    if not os.path.exists(path):
        return {}
    text = open(path, errors="replace").read()
    return {"warn_lines": len(re.findall(r"\bWARN\b|WARN:", text)),
            "error_lines": len(re.findall(r"\bERROR\b|ERROR:", text)),
            "retry_lines": len(re.findall(r"retry|retrying|backing off", text, re.I))}


def archive_s3(work, label, src, segs, walsrc, command, daemon_cmd=None, garage=None, bucket=None):
    """archive_bench.archive_run over S3, with the .ready files created only once the daemon (if
    any) is running, and timed from that moment."""
    pgdata = os.path.join(work, f"arch-{label}")
    shutil.copytree(src.data, pgdata, symlinks=True)
    wal = os.path.join(pgdata, "pg_wal")
    for f in os.listdir(wal):
        p = os.path.join(wal, f)
        if os.path.isfile(p):
            os.remove(p)
    status = os.path.join(wal, "archive_status")
    shutil.rmtree(status)
    os.makedirs(status)
    for s in segs:
        shutil.copy(os.path.join(walsrc, s), os.path.join(wal, s))
    ab.chown(pgdata)
    run("sync")
    loop = os.path.join(work, "archiver_loop.py")
    shutil.copy(os.path.abspath(ab.__file__), loop)
    ab.chown(loop)
    log = os.path.join(work, f"log-{label}.txt")
    open(log, "w").close()
    ab.chown(log)
    daemon = None
    if daemon_cmd:
        dlog = open(os.path.join(work, f"daemon-{label}.log"), "w")
        daemon = subprocess.Popen(ab.as_pg(daemon_cmd.replace("%D", pgdata)), shell=True,
                                  stdout=dlog, stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(1.0)  # up and watching an empty archive_status: no head start
        if daemon.poll() is not None:
            raise RuntimeError(f"daemon exited: {open(dlog.name).read()[-2000:]}")
    before = garage.counters()
    t_ready = time.time()
    for s in segs:
        open(os.path.join(status, s + ".ready"), "w").close()
    ab.chown(status)
    out = run(ab.as_pg(f"/usr/bin/python3 {loop} --archiver-loop {pgdata} '{command} 2>>{log}'"))
    res = json.loads(out.strip().splitlines()[-1])
    elapsed = res["t0"] + res["elapsed"] - t_ready
    extra = {}
    if daemon:
        hwm = []
        for pid in own_pids(work):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
                if "archive-agent" in cmd and "daemon" in cmd and pgdata in cmd:
                    hwm += [int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM")]
            except OSError:
                pass
        extra["daemon_peak_rss_mib"] = round(max(hwm) / 1024, 1) if hwm else None
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=120)
        extra["daemon_log"] = count_warnings(dlog.name)
    after = garage.counters()
    lat = sorted(res["latencies"])
    total = sum(os.path.getsize(os.path.join(walsrc, s)) for s in segs)
    result = {"seconds": round(elapsed, 2), "files_per_s": round(len(segs) / elapsed, 1),
              "mib_per_s": round(total / 1048576 / elapsed, 1),
              "p50_ms": round(lat[len(lat) // 2] * 1000, 1), "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 1),
              "calls": len(lat), "loadavg_1m": round(os.getloadavg()[0], 2), "command_log": count_warnings(log), **extra,
              "s3": counter_delta(before, after), "stored": garage.bucket_info(bucket)}
    shutil.rmtree(pgdata, ignore_errors=True)
    return result


def restore_local_archive_recovery(work, label, base, walsrc, segs):
    """The WAL already in pg_wal, but replayed in archive recovery (recovery.signal, a
    restore_command that finds nothing), as the restore_command variants are: archive recovery
    ends without waiting for a checkpoint, crash recovery (archive_bench's limit) waits for one."""
    data = os.path.join(work, f"restore-{label}")
    shutil.copytree(base, data, symlinks=True)
    with open(os.path.join(data, "postgresql.auto.conf"), "a") as f:
        f.write("archive_mode = off\nrestore_command = '/bin/false'\n")
    open(os.path.join(data, "recovery.signal"), "w").close()
    for s in segs:
        shutil.copy(os.path.join(walsrc, s), os.path.join(data, "pg_wal", s))
    ab.chown(data)
    run("sync")
    c = ab.Cluster(work, f"rc-{label}", data)
    t0 = time.time()
    c.ctl("start")
    while c.psql("select pg_is_in_recovery()").strip() == "t":
        time.sleep(0.05)
    elapsed = time.time() - t0
    c.ctl("stop", "-m fast")
    return {"seconds": round(elapsed, 2)}


def restore_s3(work, label, base, restore_command=None, walsrc=None, segs=None, garage=None, archive_recovery=False):
    before = garage.counters() if garage else None
    if archive_recovery:
        r = restore_local_archive_recovery(work, label, base, walsrc, segs)
    else:
        r = ab.restore_run(work, label, base, restore_command, walsrc, segs)
    kill_own(work, "prefetch")  # a prefetcher outliving recovery would skew the next run
    log = os.path.join(work, f"rc-{label}", "log")
    r["server_log"] = count_warnings(log)
    # Proof that recovery replayed everything: the same end of redo for every variant.
    text = open(log, errors="replace").read()
    redo = re.findall(r"redo done at ([0-9A-F]+/[0-9A-F]+)", text)
    r["redo_done_at"] = redo[-1] if redo else None
    r["files_restored"] = len(re.findall(r'restored log file "[0-9A-F]{24}"', text))
    # The total includes PostgreSQL's fsync of the whole data directory at startup (seconds on
    # a busy disk, the same for every variant); the recovery phase starts after it.
    def at(pattern):
        # Not anchored: a tool's unterminated stderr line may precede PostgreSQL's on one line.
        m = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) UTC [^\n]*" + pattern, text)
        return time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + float("0." + m.group(1)[20:]) if m else None
    start = at("starting archive recovery") or at("redo starts at")
    end = at("database system is ready to accept connections")
    r["recovery_phase_seconds"] = round(end - start, 2) if start and end else None
    r["loadavg_1m"] = round(os.getloadavg()[0], 2)
    shutil.copy(log, os.path.join(work, f"server-restore-{label}.log"))
    if garage:
        r["s3"] = counter_delta(before, garage.counters())
    shutil.rmtree(os.path.join(work, f"restore-{label}"), ignore_errors=True)
    shutil.rmtree(os.path.join(work, f"rc-{label}"), ignore_errors=True)
    return r


def timed(cmd):
    t0 = time.time()
    out = run(cmd)
    return round(time.time() - t0, 2), out


def backup_bench(work, binp, garage, tls_port, scale, repeat, results):
    """Base backup of a pgbench database into a fresh bucket per tool and repetition, then a
    restore of it into an empty directory (the data directory only; no WAL replay)."""
    c = ab.Cluster(work, "bk")
    run(ab.as_pg(f"{PG}/initdb -A trust -U postgres -D {c.data}"))
    with open(os.path.join(c.data, "postgresql.conf"), "a") as f:
        f.write("archive_mode = on\narchive_command = '/bin/true'\nmax_wal_size = 4GB\n")
    # The archive_command runs inside PostgreSQL: walvault's S3 settings go in the postmaster's
    # environment, never on the command line PostgreSQL would log.
    env = s3_env(garage, tls_port)
    with Env(env):
        c.ctl("start")
    run(f"{PG}/pgbench -h 127.0.0.1 -p {c.port} -U postgres -i -s {scale} -q postgres")
    c.psql("vacuum analyze")
    c.psql("checkpoint")
    size = int(c.psql("select sum(pg_database_size(oid)) from pg_database").strip())
    results["backup_database_bytes"] = size
    conn = f"host=127.0.0.1 port={c.port} user=postgres dbname=postgres"
    order = ["walvault http", "walvault https", "pgBackRest", "pgBackRest bundle"]
    for rep in range(repeat):
        wv_http = garage.bucket(f"bk-wv-http-{rep + 1}")
        wv_tls = garage.bucket(f"bk-wv-tls-{rep + 1}")
        pgbr_b = garage.bucket(f"bk-pgbr-{rep + 1}")
        pgbr_bb = garage.bucket(f"bk-pgbr-bundle-{rep + 1}")
        conf = pgbackrest_conf(work, f"bk{rep + 1}", garage, tls_port, pgbr_b, c.data, c.port, c.dir, async_=False)
        # repo1-bundle packs small files into larger objects (off by default in 2.45): fewer PUTs.
        conf_b = pgbackrest_conf(work, f"bkb{rep + 1}", garage, tls_port, pgbr_bb, c.data, c.port, c.dir,
                                 async_=False, extra="repo1-bundle=y\n")
        confs = {"pgBackRest": conf, "pgBackRest bundle": conf_b}
        for cf in confs.values():
            run(ab.as_pg(f"pgbackrest --config={cf} --stanza=bench stanza-create"))
        cmd = (f"{binp}/archive-agent push --repo s3://{wv_http}/wv %p && "
               f"{binp}/archive-agent push --repo s3://{wv_tls}/wv %p && "
               f"pgbackrest --config={conf} --stanza=bench archive-push %p && "
               f"pgbackrest --config={conf_b} --stanza=bench archive-push %p")
        c.psql(f"alter system set archive_command = '{cmd}'")
        c.psql("select pg_reload_conf()")
        c.psql("select pg_switch_wal()")
        time.sleep(2)
        run_r = {"backup": {}, "restore": {}, "stored": {}, "s3": {}}
        k = rep % len(order)
        for tool in order[k:] + order[:k]:
            before = garage.counters()
            if tool.startswith("walvault"):
                bucket = wv_http if tool.endswith("http") else wv_tls
                with Env(s3_env(garage, None if tool.endswith("http") else tls_port)):
                    t, out = timed(ab.as_pg(f"{binp}/archive-agent backup --repo s3://{bucket}/wv "
                                            f"--pgdata {c.data} --pg-url '{conn}' --json"))
                run_r["backup"][tool] = {"seconds": t, "new_bytes": json.loads(out)["new_bytes"]}
            else:
                cf = confs[tool]
                t, _ = timed(ab.as_pg(f"pgbackrest --config={cf} --stanza=bench --type=full backup"))
                info = json.loads(run(ab.as_pg(f"pgbackrest --config={cf} --stanza=bench info --output=json")))
                run_r["backup"][tool] = {"seconds": t, "repository_delta":
                                         info[0]["backup"][-1]["info"]["repository"]["delta"]}
            run_r["s3"][f"backup {tool}"] = counter_delta(before, garage.counters())
        # Besides the defaults (walvault 4 chunks in flight, pgBackRest process-max 2), each tool
        # with more requests in flight: S3 restores are request-bound.
        wide = ["walvault https, --parallel 16", "pgBackRest, --process-max 8"]
        for tool in order[k:] + order[:k] + wide:
            dest = os.path.join(work, f"r-{re.sub(r'[^a-z0-9]+', '-', tool.lower())}-{rep + 1}")
            before = garage.counters()
            if tool.startswith("walvault"):
                bucket = wv_http if tool.endswith("http") else wv_tls
                par = " --parallel 16" if "16" in tool else ""
                with Env(s3_env(garage, None if tool.endswith("http") else tls_port)):
                    t, _ = timed(ab.as_pg(f"{binp}/restore-agent restore --repo s3://{bucket}/wv --pgdata {dest}{par}"))
            else:
                cf, par = (conf, " --process-max=8") if "8" in tool else (confs[tool], "")
                t, _ = timed(ab.as_pg(f"pgbackrest --config={cf} --stanza=bench --pg1-path={dest}{par} restore"))
            run_r["restore"][tool] = {"seconds": t, "files": int(run(f"find {dest} -type f | wc -l").strip())}
            run_r["s3"][f"restore {tool}"] = counter_delta(before, garage.counters())
            shutil.rmtree(dest, ignore_errors=True)
        for tool, bucket in (("walvault http", wv_http), ("walvault https", wv_tls), ("pgBackRest", pgbr_b),
                             ("pgBackRest bundle", pgbr_bb)):
            run_r["stored"][tool] = garage.bucket_info(bucket)
        run_r["loadavg_1m"] = round(os.getloadavg()[0], 2)
        results["backup_runs"].append(run_r)
        print(f"backup rep {rep + 1}: " + ", ".join(f"{t} {v['seconds']}s" for t, v in run_r["backup"].items())
              + " | restore " + ", ".join(f"{t} {v['seconds']}s" for t, v in run_r["restore"].items()), flush=True)
    c.ctl("stop", "-m fast")


def med(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3), "n": len(xs)}


def fmt(s, digits=1):
    if s is None:
        return "-"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def summarize(results):
    summ = {"archive": {}, "archive_ratio": {}, "restore": {}, "restore_ratio": {}, "stored": {},
            "s3_requests_per_segment": {}, "backup": {}, "backup_ratio": {}}
    runs = results["archive_runs"]
    names = list(runs[0].keys()) if runs else []
    for n in names:
        summ["archive"][n] = {k: med([r[n][k] for r in runs]) for k in ("seconds", "mib_per_s", "p50_ms", "p99_ms")}
        rss = med([r[n].get("daemon_peak_rss_mib") for r in runs])
        if rss:
            summ["archive"][n]["daemon_peak_rss_mib"] = rss
        summ["stored"][n] = med([r[n]["stored"]["bytes"] for r in runs])
        segs = results["wal"]["segments"]
        reqs = {}
        for r in runs:
            for k, v in r[n]["s3"].get("requests", {}).items():
                reqs.setdefault(k, []).append(v / segs)
        summ["s3_requests_per_segment"][n] = {k: round(statistics.median(v), 2) for k, v in reqs.items()}
    pairs = [("walvault push (http)", "pgBackRest archive-push sync (https)"),
             ("walvault push (https)", "pgBackRest archive-push sync (https)"),
             ("walvault push + daemon (http)", "pgBackRest archive-push async (https)"),
             ("walvault push + daemon (https)", "pgBackRest archive-push async (https)"),
             ("walvault push + daemon, 4 uploads (https)", "pgBackRest async, process-max 4 (https)")]
    for a, b in pairs:
        if a in names and b in names:
            summ["archive_ratio"][f"{a} / {b}"] = med([r[a]["mib_per_s"] / r[b]["mib_per_s"] for r in runs])
    rruns = results["restore_runs"]
    rnames = list(rruns[0].keys()) if rruns else []
    summ["restore_phase"] = {}
    for n in rnames:
        summ["restore"][n] = med([r[n]["seconds"] for r in rruns])
        summ["restore_phase"][n] = med([r[n].get("recovery_phase_seconds") for r in rruns])
    summ["restore_redo_done_at"] = sorted({r[n]["redo_done_at"] or "none" for r in rruns for n in rnames})
    for a in ("walvault fetch (http)", "walvault fetch (https)"):
        b = "pgBackRest archive-get async (https)"
        if a in rnames and b in rnames:
            summ["restore_ratio"][f"{a} / {b}"] = med([r[a]["seconds"] / r[b]["seconds"] for r in rruns])
            summ["restore_ratio"][f"{a} / {b}, recovery phase"] = med(
                [r[a]["recovery_phase_seconds"] / r[b]["recovery_phase_seconds"] for r in rruns
                 if r[a].get("recovery_phase_seconds") and r[b].get("recovery_phase_seconds")])
    bruns = results["backup_runs"]
    if bruns:
        for kind in ("backup", "restore"):
            for n in bruns[0][kind]:
                summ["backup"][f"{kind} {n}"] = med([r[kind][n]["seconds"] for r in bruns])
            for a in ("walvault http", "walvault https", "walvault https, --parallel 16"):
                for b in ("pgBackRest", "pgBackRest bundle", "pgBackRest, --process-max 8"):
                    if a in bruns[0][kind] and b in bruns[0][kind]:
                        summ["backup_ratio"][f"{kind} {a} / {b}"] = med(
                            [r[kind][a]["seconds"] / r[kind][b]["seconds"] for r in bruns])
        for n in bruns[0]["stored"]:
            summ["backup"][f"stored {n}"] = med([r["stored"][n]["bytes"] for r in bruns])
    return summ


def print_summary(results, summ):
    wal = results["wal"]
    print(f"\n{wal['segments']} segments, {wal['bytes'] / 1048576:.0f} MiB of WAL; "
          f"median (min-max) of {len(results['archive_runs'])} runs")
    print(f"\n{'archive (PostgreSQL archiver loop)':<40} {'seconds':>18} {'MiB/s':>20} {'p50 ms':>20} {'p99 ms':>20}")
    for n, v in summ["archive"].items():
        print(f"{n:<40} {fmt(v['seconds'], 2):>18} {fmt(v['mib_per_s']):>20} {fmt(v['p50_ms']):>20} {fmt(v['p99_ms']):>20}")
    for n, v in summ["archive"].items():
        if "daemon_peak_rss_mib" in v:
            print(f"daemon peak RSS, {n}: {fmt(v['daemon_peak_rss_mib'])} MiB")
    print("\nthroughput ratio (same run)")
    for n, v in summ["archive_ratio"].items():
        print(f"  {n}: {fmt(v, 2)}")
    print(f"\n{'bytes stored in the bucket':<40} {'bytes':>14} {'ratio':>8}")
    for n, v in summ["stored"].items():
        print(f"{n:<40} {int(v['median']):>14} {wal['bytes'] / v['median']:>8.2f}")
    print("\nS3 requests per segment (Garage metrics)")
    for n, v in summ["s3_requests_per_segment"].items():
        print(f"  {n}: " + ", ".join(f"{k} {x}" for k, x in v.items()))
    print(f"\n{'restore (replay all WAL)':<40} {'seconds':>20} {'recovery phase':>20}")
    for n, v in summ["restore"].items():
        print(f"{n:<40} {fmt(v, 2):>20} {fmt(summ['restore_phase'].get(n), 2):>20}")
    for n, v in summ["restore_ratio"].items():
        print(f"  {n}: {fmt(v, 2)}")
    print(f"  end of redo in every restore: {', '.join(summ['restore_redo_done_at'])} (one value: all replayed the same WAL)")
    if summ["backup"]:
        print(f"\nbase backup of {results['backup_database_bytes'] / 1048576:.0f} MiB (pgbench scale "
              f"{results['backup_scale']})")
        for n, v in summ["backup"].items():
            print(f"{n:<40} {fmt(v, 2 if not n.startswith('stored') else 0):>24}")
        for n, v in summ["backup_ratio"].items():
            print(f"  {n}: {fmt(v, 2)}")


def markdown(results):
    """The results as Markdown tables (for docs/BENCH-S3.md and the README)."""
    summ = results["summary"]
    runs, n = results["archive_runs"], len(results["archive_runs"])
    rng = lambda s, d=1: "-" if s is None else f"{s['median']:.{d}f} ({s['min']:.{d}f}–{s['max']:.{d}f})"
    counterpart = {"walvault push (http)": "pgBackRest archive-push sync (https)",
                   "walvault push (https)": "pgBackRest archive-push sync (https)",
                   "walvault push + daemon (http)": "pgBackRest archive-push async (https)",
                   "walvault push + daemon (https)": "pgBackRest archive-push async (https)",
                   "walvault push + daemon, 4 uploads (https)": "pgBackRest async, process-max 4 (https)"}
    print(f"{results['wal']['segments']} segments, {results['wal']['bytes'] / 1048576:.0f} MiB of WAL; median "
          f"(min–max) of {n} runs; ratio = walvault MiB/s / pgBackRest MiB/s in the same run\n")
    print("| archive | seconds | MiB/s | archive_command p50 / p99 ms | throughput vs pgBackRest |")
    print("| --- | --- | --- | --- | --- |")
    for name, v in summ["archive"].items():
        ratio = ""
        if name in counterpart:
            ratio = rng(summ["archive_ratio"].get(f"{name} / {counterpart[name]}"), 2)
        print(f"| {name} | {rng(v['seconds'], 2)} | {rng(v['mib_per_s'])} | "
              f"{v['p50_ms']['median']:.0f} / {v['p99_ms']['median']:.0f} | {ratio} |")
    print("\n| stored in the bucket | bytes | objects | WAL bytes / stored | S3 requests per segment |")
    print("| --- | --- | --- | --- | --- |")
    for name, v in summ["stored"].items():
        objs = statistics.median([r[name]["stored"]["objects"] for r in runs])
        reqs = ", ".join(f"{k} {x:g}" for k, x in summ["s3_requests_per_segment"][name].items())
        print(f"| {name} | {int(v['median']):,} | {objs:.0f} | {results['wal']['bytes'] / v['median']:.2f} | {reqs} |")
    print("\n| restore (replay all WAL) | seconds | recovery phase, seconds | vs pgBackRest (total / phase) |")
    print("| --- | --- | --- | --- |")
    b = "pgBackRest archive-get async (https)"
    for name, v in summ["restore"].items():
        ratio = ""
        if name.startswith("walvault"):
            ratio = (f"{rng(summ['restore_ratio'].get(f'{name} / {b}'), 2)} / "
                     f"{rng(summ['restore_ratio'].get(f'{name} / {b}, recovery phase'), 2)}")
        print(f"| {name} | {rng(v, 2)} | {rng(summ['restore_phase'].get(name), 2)} | {ratio} |")
    if summ.get("backup"):
        print(f"\nBase backup of {results['backup_database_bytes'] / 1048576:.0f} MiB (pgbench scale "
              f"{results['backup_scale']}), then a restore of it (files only, no WAL replay)\n")
        print("| | backup seconds | restore seconds | bytes in the bucket (backup + WAL archived meanwhile) |")
        print("| --- | --- | --- | --- |")
        names = list(results["backup_runs"][0]["restore"].keys())
        for name in names:
            bk = summ["backup"].get(f"backup {name}")
            st = summ["backup"].get(f"stored {name}")
            stored = f"{int(st['median']):,}" if st else ""
            print(f"| {name} | {rng(bk, 2) if bk else '(same backup)'} | {rng(summ['backup']['restore ' + name], 2)} | "
                  f"{stored} |")
        print("\n| ratio, same run | median (min–max) |")
        print("| --- | --- |")
        for name, v in summ["backup_ratio"].items():
            print(f"| {name} | {rng(v, 2)} |")


def main():
    sys.exit("bench/s3_bench.py no longer compares walvault with pgBackRest: it measured Debian's pgBackRest 2.45, "
             "which predates block incremental backups and bundling. Run bench/rivals.py (docs/BENCH.md); "
             "this file keeps the helpers rivals.py, retention_bench.py and encryption_bench.py use.")


if __name__ == "__main__":
    main()
