#!/usr/bin/env python3
"""What client-side encryption costs: WAL archiving, base backup and restore into a plain
repository and into encrypted ones, on the same machine in one run, plain and encrypted rounds
interleaved (the order rotates every round) so that noise hits both alike.

Variants: plain (`init`), raw key (`init --encrypt`, [encryption] key_file holding 64 hex
digits: the key used as is) and passphrase (key_file holding a passphrase: Argon2id, m=64 MiB
t=3 p=1, run by every command that opens the repository). Every variant gets a --config file
(an empty one for plain), every repository is new (nothing is deduplicated or already there),
and every agent runs as postgres from a copy of target/release taken at start (a rebuild during
the run changes nothing).

1. WAL archive: a sample of real WAL made the way bench/wal-sample.sh makes it (a PostgreSQL 15
   cluster: pgbench -i -s 20, then pgbench tpcb-like mixed with inserts of random payloads,
   every segment copied out by archive_command = cp), but run until --wal-mib of WAL exist and
   with synchronous_commit = off, so that the mixed part, not pgbench -i's COPY, is most of the
   sample even on a disk with slow fsync. Or --wal-sample DIR (e.g. made by wal-sample.sh). Each
   segment is archived by its own `archive-agent push --repo URL --config FILE <segment>`
   process, one after the other, oldest first, as PostgreSQL's archiver runs archive_command
   (the loop itself runs as postgres, no shell, so that no per-call user switch is timed).
   Measured: segments/s, MiB/s (of WAL), per-call p50, CPU time per segment, bytes stored. The
   passphrase variant shows the per-call Argon2id cost; it is reported apart, it is not what the
   raw key costs.
2. Base backup: `archive-agent backup --pgdata --pg-url` of a pgbench database (--scale, default
   20) into a new plain and a new encrypted (raw key) repository each round. The cluster's
   archive_command pushes into the repository being measured (a wrapper reads its URL from a
   file), so the backup's wait for its last WAL segment includes that segment's push. A
   CHECKPOINT runs before each backup (untimed). Measured: seconds, CPU time of the backup
   command (not of the archiver's push), bytes stored.
3. Restore: `restore-agent restore --pgdata <new empty dir>` of that backup, right after it, no
   target (the end of the WAL). Only the restore command is timed, not PostgreSQL's recovery.

CPU times are user + system seconds from the kernel's accounting of the agents' processes: on a
machine that is not quiet they move much less than wall times, and they are what encryption adds.

Reported: median (min-max) over --rounds of each measure, and the ratio encrypted/plain of the
medians (times: above 1 is slower; rates: below 1 is slower); the paired per-round ratios are in
the JSON. Prints a markdown table, writes JSON (with the load average before, during and after).
Measurements, never pass/fail.

Store: file:// on local disk by default; --store s3 uses a one-node Garage on loopback (plain
HTTP, bench/s3_bench.py's Garage class), a fresh one each round.

Usage: bench/encryption_bench.py [--rounds 3] [--scale 20] [--wal-mib 1024 | --wal-sample DIR]
                                 [--store file|s3] [--json bench/results/encryption.json] [--keep]
Needs root (runs PostgreSQL as postgres), PostgreSQL 15, the agents built with
`cargo build --release -p archive-agent -p restore-agent`, and for --store s3 garage 2.5.0
(~/.cargo/bin/garage, or GARAGE_BIN).
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import archive_bench as ab  # noqa: E402  (same directory; its cluster helpers)

PG = ab.PG
ROOT = ab.ROOT
RELEASE = os.path.join(ROOT, "target", "release")
VARIANTS = ("plain", "raw key", "passphrase")
SLUG = {"plain": "plain", "raw key": "raw", "passphrase": "pass"}
# A passphrase as a person would choose one (>= 12 characters, the minimum init accepts).
PASSPHRASE = "correct horse battery staple, walvault bench"


def run(argv, env=None, check=True):
    """Run a command (a list, no shell); return stdout; on failure show what it printed."""
    p = subprocess.run(argv, text=True, capture_output=True, env=env)
    if check and p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(argv)}\n"
                           f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p.stdout


def as_pg(argv):
    return (["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []) + list(argv)


def write_pg_file(path, text, mode=0o600):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    ab.chown(path)


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def children_cpu():
    """CPU seconds (user + system) of the waited-for descendants of this process."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def du(path):
    return int(run(["du", "-sb", path]).split()[0])


def push_loop(agent, repo, config, sample):
    """As postgres: one push process per segment, oldest first (PostgreSQL's archiver)."""
    segs = sorted(f for f in os.listdir(sample) if len(f) == 24)
    lat = []
    c0 = os.times()
    t0 = time.time()
    for s in segs:
        t = time.time()
        p = subprocess.run([agent, "push", "--repo", repo, "--config", config, os.path.join(sample, s)],
                           capture_output=True, text=True)
        lat.append(time.time() - t)
        if p.returncode != 0:
            print(json.dumps({"error": f"push {s} exited {p.returncode}: {p.stderr[-2000:]}"}))
            sys.exit(1)
    elapsed, c1 = time.time() - t0, os.times()
    cpu = c1.children_user + c1.children_system - c0.children_user - c0.children_system
    print(json.dumps({"elapsed": elapsed, "cpu": cpu, "latencies": lat}))


def make_sample(work, wal_mib):
    """bench/wal-sample.sh's workload, run until wal_mib of WAL were written."""
    src = ab.Cluster(work, "sample")
    out = os.path.join(work, "walsample")
    os.makedirs(out)
    ab.chown(out)
    run(as_pg([f"{PG}/initdb", "-A", "trust", "-U", "postgres", "-D", src.data]))
    with open(os.path.join(src.data, "postgresql.conf"), "a") as f:
        f.write(f"archive_mode = on\narchive_command = 'cp %p {out}/%f'\nmax_wal_size = 4GB\n"
                "synchronous_commit = off\n")
    src.ctl("start")
    try:
        src.psql("create table payload(id bigserial primary key, body text)")
        pgbench = [f"{PG}/pgbench", "-h", "127.0.0.1", "-p", str(src.port), "-U", "postgres"]
        run(pgbench + ["-i", "-s", "20", "-q", "postgres"])
        script = os.path.join(src.dir, "payload.sql")
        with open(script, "w") as f:
            f.write("insert into payload(body) select string_agg(md5(random()::text), '') "
                    "from generate_series(1, 64);\n")
        while int(src.psql("select pg_current_wal_lsn() - '0/0'::pg_lsn").strip()) < wal_mib << 20:
            run(pgbench + ["-c", "2", "-T", "10", "-n", "-f", f"{script}@1", "-b", "tpcb-like@4", "postgres"])
        src.psql("select pg_switch_wal()")
        wait_archived(src.data)
    finally:
        src.ctl("stop", "-m fast")
    shutil.rmtree(src.dir)
    return out


def wait_archived(pgdata, timeout=600):
    status = os.path.join(pgdata, "pg_wal", "archive_status")
    deadline = time.time() + timeout
    while [f for f in os.listdir(status) if f.endswith(".ready")]:
        if time.time() > deadline:
            raise RuntimeError(f"archiving in {pgdata} did not catch up in {timeout} s")
        time.sleep(0.2)


class Store:
    """Where repositories go: a directory (file://) or a Garage started anew each round (s3://)."""

    def __init__(self, kind, work):
        self.kind, self.work, self.garage, self.env = kind, work, None, dict(os.environ)
        self.repos = os.path.join(work, "repos")
        os.makedirs(self.repos)
        ab.chown(self.repos)

    def begin_round(self, rnd):
        if self.kind == "s3":
            import s3_bench as sb  # noqa: PLC0415  (needed for s3 only)
            self.garage = sb.Garage(os.path.join(self.work, f"garage-r{rnd}"))
            self.garage.start()
            self.env = {**os.environ, **sb.s3_env(self.garage)}

    def end_round(self, rnd):
        if self.garage:
            self.garage.stop()
            shutil.rmtree(os.path.join(self.work, f"garage-r{rnd}"), ignore_errors=True)
            self.garage = None

    def new(self, name):
        """A URL where no repository is yet."""
        if self.kind == "s3":
            return f"s3://{self.garage.bucket(name)}/repo"
        return f"file://{os.path.join(self.repos, name)}"

    def size(self, url):
        if self.kind == "s3":
            return self.garage.bucket_info(url[len("s3://"):].split("/")[0])["bytes"]
        return du(url[len("file://"):])

    def drop(self, url):
        if self.kind == "file":
            shutil.rmtree(url[len("file://"):])
        # s3: the round's Garage goes away with its data at the end of the round


def rotate(seq, n):
    n %= len(seq)
    return list(seq[n:]) + list(seq[:n])


def stats(vals):
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": vals}


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "--push-loop":
        return push_loop(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=int, default=20, help="pgbench scale of the backed-up database")
    ap.add_argument("--wal-mib", type=int, default=1024, help="size of the WAL sample to make")
    ap.add_argument("--wal-sample", help="use this directory of WAL segments instead of making a sample")
    ap.add_argument("--store", choices=("file", "s3"), default="file")
    ap.add_argument("--json", default=os.path.join(ROOT, "bench/results/encryption.json"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: PostgreSQL and the agents run as postgres")
    for b in ("archive-agent", "restore-agent"):
        if not os.path.exists(os.path.join(RELEASE, b)):
            sys.exit(f"{RELEASE}/{b} is missing: cargo build --release -p archive-agent -p restore-agent")
    load_start = loadavg()
    if load_start[0] > 0.5 * os.cpu_count():
        print(f"warning: load average {load_start} on {os.cpu_count()} CPUs: something else is running",
              file=sys.stderr)

    work = tempfile.mkdtemp(prefix="walvault-encryption-bench.")
    os.chmod(work, 0o755)
    binp = os.path.join(work, "bin")
    os.makedirs(binp)
    for b in ("archive-agent", "restore-agent"):
        shutil.copy(os.path.join(RELEASE, b), binp)
    agent, restorer = os.path.join(binp, "archive-agent"), os.path.join(binp, "restore-agent")
    # The push loop runs as postgres, which may not read this checkout: a copy, with its import.
    loop = os.path.join(binp, "push_loop.py")
    shutil.copy(os.path.abspath(__file__), loop)
    shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "archive_bench.py"), binp)
    ab.chown(work)
    version = run([agent, "--version"]).strip()
    head = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], check=False).strip()
    dirty = run(["git", "-C", ROOT, "status", "--short", "--untracked-files=no"], check=False).strip()
    built = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(os.path.join(RELEASE, "archive-agent"))))

    # Keys and configuration files, readable by postgres only.
    keys = os.path.join(work, "keys")
    os.makedirs(keys, mode=0o700)
    ab.chown(keys)
    write_pg_file(os.path.join(keys, "raw.key"), os.urandom(32).hex() + "\n")
    write_pg_file(os.path.join(keys, "pass.key"), PASSPHRASE + "\n")
    configs = {}
    for v in VARIANTS:
        path = os.path.join(keys, f"{SLUG[v]}.toml")
        key = {"raw key": "raw.key", "passphrase": "pass.key"}.get(v)
        write_pg_file(path, f'[encryption]\nkey_file = "{os.path.join(keys, key)}"\n' if key else "# plain\n")
        configs[v] = path

    store = Store(args.store, work)
    db = None
    rounds_load = []
    res = {m: {v: [] for v in VARIANTS} for m in
           ("push_seconds", "push_segments_per_s", "push_mib_per_s", "push_p50_ms", "push_cpu_ms_per_segment",
            "wal_stored_bytes")}
    res.update({m: {v: [] for v in VARIANTS[:2]} for m in
                ("backup_seconds", "backup_mib_per_s", "backup_cpu_seconds", "backup_stored_bytes",
                 "restore_seconds", "restore_mib_per_s", "restore_cpu_seconds")})
    try:
        # The WAL sample, readable by postgres and in the page cache.
        if args.wal_sample:
            sample = os.path.abspath(args.wal_sample)
            first = sorted(f for f in os.listdir(sample) if len(f) == 24)[:1]
            if not first or subprocess.run(as_pg(["test", "-r", os.path.join(sample, first[0])])).returncode:
                sys.exit(f"no WAL segment in {sample} that postgres can read")
            sample_source = f"--wal-sample {sample}"
        else:
            print(f"making a {args.wal_mib} MiB WAL sample ...", file=sys.stderr, flush=True)
            sample = make_sample(work, args.wal_mib)
            sample_source = f"made: pgbench -i -s 20 then tpcb-like@4 + payload@1, synchronous_commit off, {args.wal_mib} MiB"
        segs = sorted(f for f in os.listdir(sample) if len(f) == 24)
        wal_bytes = sum(os.path.getsize(os.path.join(sample, s)) for s in segs)
        if not segs:
            sys.exit(f"no WAL segments in {sample}")
        for s in segs:
            with open(os.path.join(sample, s), "rb") as f:
                while f.read(1 << 20):
                    pass
        print(f"WAL sample: {len(segs)} segments, {wal_bytes >> 20} MiB", file=sys.stderr, flush=True)

        # The database to back up: archive_command pushes into the repository named in current.env,
        # or drops the segment when there is none (pgbench -i's WAL, between measurements).
        db = ab.Cluster(work, "db")
        current = os.path.join(work, "current.env")
        wrapper = os.path.join(binp, "archive-current")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\n[ -f {current} ] || exit 0\n. {current}\n'
                    f'exec {agent} push --repo "$REPO" --config "$CONFIG" "$1"\n')
        os.chmod(wrapper, 0o755)
        run(as_pg([f"{PG}/initdb", "-A", "trust", "-U", "postgres", "-D", db.data]))
        with open(os.path.join(db.data, "postgresql.conf"), "a") as f:
            f.write(f"archive_mode = on\narchive_command = '{wrapper} %p'\nmax_wal_size = 4GB\n")
        db.ctl("start")
        print(f"pgbench -i -s {args.scale} ...", file=sys.stderr, flush=True)
        run([f"{PG}/pgbench", "-h", "127.0.0.1", "-p", str(db.port), "-U", "postgres", "-i", "-s",
             str(args.scale), "-q", "postgres"])
        db.psql("vacuum analyze")
        db.psql("checkpoint")
        db_bytes = int(db.psql("select sum(pg_database_size(oid)) from pg_database").strip())
        conn = f"host=127.0.0.1 port={db.port} user=postgres dbname=postgres"

        def set_current(url=None, variant=None):
            if url is None:
                if os.path.exists(current):
                    os.remove(current)
                return
            lines = [f"REPO='{url}'", f"CONFIG='{configs[variant]}'"]
            lines += [f"{k}='{v}'" for k, v in store.env.items() if k.startswith("AWS_")]
            tmp = current + ".tmp"
            write_pg_file(tmp, "".join(f"export {l}\n" for l in lines))
            os.rename(tmp, current)

        def init(url, variant, pgdata=None):
            argv = [agent, "init", "--repo", url, "--config", configs[variant]]
            argv += ["--encrypt"] if variant != "plain" else []
            argv += ["--pgdata", pgdata] if pgdata else []
            run(as_pg(argv), env=store.env)

        for rnd in range(args.rounds):
            store.begin_round(rnd)
            rounds_load.append(loadavg())
            print(f"round {rnd + 1}/{args.rounds}, load {rounds_load[-1]}", file=sys.stderr, flush=True)

            # 1. WAL archive, one push process per segment.
            for v in rotate(VARIANTS, rnd):
                url = store.new(f"wal-{SLUG[v]}-r{rnd}")
                init(url, v)
                out = run(as_pg(["/usr/bin/python3", loop, "--push-loop", agent, url, configs[v], sample]),
                          env=store.env)
                r = json.loads(out.strip().splitlines()[-1])
                el, lat = r["elapsed"], sorted(r["latencies"])
                res["push_seconds"][v].append(round(el, 3))
                res["push_segments_per_s"][v].append(round(len(segs) / el, 2))
                res["push_mib_per_s"][v].append(round(wal_bytes / 1048576 / el, 1))
                res["push_p50_ms"][v].append(round(lat[len(lat) // 2] * 1000, 1))
                res["push_cpu_ms_per_segment"][v].append(round(r["cpu"] * 1000 / len(segs), 1))
                res["wal_stored_bytes"][v].append(store.size(url))
                store.drop(url)
                print(f"  push {v}: {el:.2f} s", file=sys.stderr, flush=True)

            # 2, 3. Base backup into a new repository, and its restore.
            for v in rotate(VARIANTS[:2], rnd):
                url = store.new(f"backup-{SLUG[v]}-r{rnd}")
                init(url, v, db.data)
                set_current(url, v)
                wait_archived(db.data)
                db.psql("checkpoint")
                c, t = children_cpu(), time.time()
                run(as_pg([agent, "backup", "--repo", url, "--config", configs[v], "--pgdata", db.data,
                           "--pg-url", conn, "--json"]), env=store.env)
                bt = time.time() - t
                res["backup_cpu_seconds"][v].append(round(children_cpu() - c, 2))
                res["backup_seconds"][v].append(round(bt, 2))
                res["backup_mib_per_s"][v].append(round(db_bytes / 1048576 / bt, 1))
                wait_archived(db.data)
                set_current(None)
                target = os.path.join(work, f"restore-{SLUG[v]}")
                os.makedirs(target, mode=0o700)
                ab.chown(target)
                c, t = children_cpu(), time.time()
                run(as_pg([restorer, "restore", "--repo", url, "--config", configs[v], "--pgdata", target]),
                    env=store.env)
                rt = time.time() - t
                res["restore_cpu_seconds"][v].append(round(children_cpu() - c, 2))
                res["restore_seconds"][v].append(round(rt, 2))
                res["restore_mib_per_s"][v].append(round(db_bytes / 1048576 / rt, 1))
                if not os.path.exists(os.path.join(target, "PG_VERSION")):
                    raise RuntimeError(f"restore into {target} left no PG_VERSION")
                shutil.rmtree(target)
                res["backup_stored_bytes"][v].append(store.size(url))
                store.drop(url)
                print(f"  backup {v}: {bt:.2f} s, restore {rt:.2f} s", file=sys.stderr, flush=True)
            store.end_round(rnd)
    finally:
        if db:
            subprocess.run(as_pg([f"{PG}/pg_ctl", "-D", db.data, "-m", "immediate", "stop"]), capture_output=True)
        if store.garage:
            store.garage.stop()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    load_end = loadavg()

    # Summary: medians (min-max), ratio encrypted/plain of the medians, paired per-round ratios.
    summary, ratios = {}, {}
    for m, per in res.items():
        summary[m] = {v: stats(vals) for v, vals in per.items()}
        ratios[m] = {}
        for v in per:
            if v == "plain":
                continue
            ratios[m][v] = {"of_medians": round(summary[m][v]["median"] / summary[m]["plain"]["median"], 3),
                            "per_round": [round(e / p, 3) for e, p in zip(per[v], per["plain"])]}
    rows = [("WAL push, segments/s", "push_segments_per_s", "{:.1f}"),
            ("WAL push, MiB/s", "push_mib_per_s", "{:.1f}"),
            ("WAL push, p50 per call, ms", "push_p50_ms", "{:.1f}"),
            ("WAL push, seconds for the sample", "push_seconds", "{:.2f}"),
            ("WAL push, CPU ms per segment (user+sys)", "push_cpu_ms_per_segment", "{:.1f}"),
            ("WAL stored, MiB", "wal_stored_bytes", "mib"),
            (f"base backup (scale {args.scale}), seconds", "backup_seconds", "{:.2f}"),
            ("base backup, CPU seconds (user+sys)", "backup_cpu_seconds", "{:.2f}"),
            ("base backup stored, MiB", "backup_stored_bytes", "mib"),
            ("restore, seconds", "restore_seconds", "{:.2f}"),
            ("restore, CPU seconds (user+sys)", "restore_cpu_seconds", "{:.2f}")]

    def cell(m, v, fmt):
        s = summary[m].get(v)
        if s is None:
            return "-"
        f = (lambda x: f"{x / 1048576:.1f}") if fmt == "mib" else fmt.format
        return f"{f(s['median'])} ({f(s['min'])}-{f(s['max'])})" if len(s["runs"]) > 1 else f(s["median"])

    lines = ["| measure | plain | encrypted, raw key | raw/plain | encrypted, passphrase | passphrase/plain |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, m, fmt in rows:
        rr = ratios[m]
        pp = f"{rr['passphrase']['of_medians']:.3f}" if "passphrase" in rr else "-"
        lines.append(f"| {label} | {cell(m, 'plain', fmt)} | {cell(m, 'raw key', fmt)} | "
                     f"{rr['raw key']['of_medians']:.3f} | {cell(m, 'passphrase', fmt)} | {pp} |")
    table = "\n".join(lines)
    store_desc = "file:// (local disk)" if args.store == "file" else "s3:// (Garage 1 node, loopback, HTTP)"
    header = (f"{len(segs)} WAL segments ({wal_bytes >> 20} MiB); database {db_bytes >> 20} MiB (pgbench scale "
              f"{args.scale}); store {store_desc}; {args.rounds} rounds, median (min-max); "
              f"{os.cpu_count()} CPUs, load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; "
              f"{version} ({head}{', tree modified' if dirty else ''})")
    print(f"\n{header}\n\n{table}\n")
    doc = {"settings": {"rounds": args.rounds, "scale": args.scale, "store": args.store,
                        "wal_sample": sample_source, "order": "rotated each round"},
           "machine": {"cpus": os.cpu_count(), "uname": " ".join(os.uname()), "loadavg_start": load_start,
                       "loadavg_each_round": rounds_load, "loadavg_end": load_end},
           "binaries": {"version": version, "git_head": head, "tree_modified": bool(dirty), "built": built},
           "wal": {"segments": len(segs), "bytes": wal_bytes}, "database_bytes": db_bytes,
           "results": summary, "ratios_encrypted_over_plain": ratios, "table": table}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
