#!/usr/bin/env python3
"""Space over time: what a repository stores once expire has dropped old backups, with and
without the repack that reclaims the dead bytes of packs (archive-agent expire --max-dead).

A real PostgreSQL 15 cluster (a shape of bench/rivals.py: `many:N` tables, or a pgbench scale)
archives into a file:// repository; --backups backups are taken, each after changing ~1% of the
rows at random (rivals.py's change); then:

  1. expire --keep-last K --max-dead 100   the old way: packs kept whole while any chunk is used
  2. expire --keep-last K --max-dead P     the repack (timed: bytes read, written, manifests)
  3. expire --keep-last K --max-dead P     deletes the rewritten packs
  4. restore-agent verify --deep           every object read back and checked
  5. restore of the newest backup, started, every table compared with the source's

After each step: the bytes of every pack stored, the bytes the kept backups list, and the dead
bytes among them (`restore-agent info --json`). The physical reference is the live bytes: the
chunks the kept backups reference, each once. Measurements, never pass/fail.

Usage: bench/space_bench.py [--shape many:2000] [--backups 4] [--keep 2] [--max-dead 10]
                            [--json bench/results/space.json]
Needs root (runs PostgreSQL as postgres), PostgreSQL 15 and the agents built with
`cargo build --release`.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import archive_bench as ab  # noqa: E402
import rivals  # noqa: E402

BIN = os.environ.get("WALVAULT_BIN_DIR", os.path.join(ab.ROOT, "target", "release"))
A, R = os.path.join(BIN, "archive-agent"), os.path.join(BIN, "restore-agent")


def run_json(cmd):
    secs, rss, out = rivals.timed(cmd)
    return secs, round(rss / 1024, 1), json.loads(out)


def stored_packs(repo):
    total = 0
    for root, _, files in os.walk(os.path.join(repo, "packs")):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(".wvp"))
    return total


def space(url, repo):
    info = json.loads(rivals.pg(f"{R} info --repo {url} --json"))
    p = info["packs"]
    return {"stored_pack_bytes": stored_packs(repo), "listed_pack_bytes": p["bytes"],
            "dead_bytes": p["dead_bytes"], "live_bytes": p["bytes"] - p["dead_bytes"],
            "backups": len(info["backups"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="many:2000")
    ap.add_argument("--backups", type=int, default=4)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--max-dead", type=int, default=10)
    ap.add_argument("--json", default=os.path.join(ab.ROOT, "bench/results/space.json"))
    args = ap.parse_args()
    shape = rivals.Shape(args.shape)
    work = tempfile.mkdtemp(prefix="walvault-space-")
    ab.chown(work)
    repo = os.path.join(work, "repo")
    url = f"file://{repo}"
    c = ab.Cluster(work, "src")
    out = {"shape": shape.name, "backups": args.backups, "keep": args.keep, "max_dead": args.max_dead,
           "commit": subprocess.run(["git", "-C", ab.ROOT, "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip(), "steps": {}}
    try:
        rivals.pg(f"{rivals.PG}/initdb -A trust -U postgres -D {c.data}")
        rivals.pg(f"{A} init --repo {url}")
        ab.chown(repo)
        with open(os.path.join(c.data, "postgresql.conf"), "a") as f:
            f.write(f"archive_mode = on\narchive_command = '{A} push --repo {url} %p'\n"
                    "max_wal_size = 1GB\ncheckpoint_timeout = 30min\nmax_locks_per_transaction = 256\n")
        rivals.cluster_start(c, {})
        shape.populate(c)
        c.psql("vacuum analyze")
        backups = []
        for i in range(args.backups):
            if i:
                shape.change(c)
            c.psql("checkpoint")
            secs, rss, b = run_json(f"{A} backup --repo {url} --pgdata {c.data} --json "
                                    f"--pg-url 'host=127.0.0.1 port={c.port} user=postgres dbname=postgres'")
            backups.append({"seconds": secs, "new_bytes": b.get("new_bytes")})
            rivals.log(f"backup {i + 1}: {secs} s, {b.get('new_bytes')} new bytes")
            time.sleep(1.1)  # backup ids are to the second
        c.psql("select pg_switch_wal()")
        rivals.wait_archived(c)
        out["backup_runs"] = backups
        out["steps"]["before_expire"] = space(url, repo)
        keep = f"--keep-last {args.keep} --json --repo {url}"
        for step, dead in (("expire_without_repack", 100), ("expire_with_repack", args.max_dead),
                           ("next_expire", args.max_dead)):
            secs, rss, rep = run_json(f"{A} expire {keep} --max-dead {dead}")
            s = space(url, repo)
            s.update({"seconds": secs, "peak_rss_mib": rss, "repack": rep.get("repack"),
                      "deleted_packs": rep["packs"]})
            out["steps"][step] = s
            rivals.log(f"{step}: {json.dumps(s)}")
        secs, rss, _ = rivals.timed(f"{R} verify --deep --repo {url}")
        out["verify_deep_seconds"] = secs
        want = rivals.digest(c.port)
        rivals.cluster_stop(c)
        dest = os.path.join(work, "restored")
        rivals.mkdir_pg(dest)
        secs, rss, _ = rivals.timed(f"{R} restore --repo {url} --pgdata {dest} --target immediate --json")
        out["restore_seconds"] = secs
        port = ab.free_port()
        with open(os.path.join(dest, "postgresql.auto.conf"), "a") as f:
            f.write("archive_mode = off\n")
        rivals.pg(f"{rivals.PG}/pg_ctl -D {dest} -l {work}/restored.log -w -t 3600 "
                  f"-o '-p {port} -k {work} -c listen_addresses=127.0.0.1' start")
        for _ in range(600):
            if rivals.psql_at(port, "select pg_is_in_recovery()") == "f":
                break
            time.sleep(0.5)
        got = rivals.digest(port)
        rivals.pg(f"{rivals.PG}/pg_ctl -D {dest} -w -m fast stop", check=False)
        out["restored_matches_source"] = got == want
        if got != want:
            sys.exit("the restored cluster differs from its source")
    finally:
        rivals.cluster_stop(c)
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        shutil.rmtree(work, ignore_errors=True)
    s = out["steps"]
    mib = 1048576
    print(f"{shape.name}, {args.backups} backups each after ~1% of the rows changed, keep {args.keep}:")
    print("| step | packs stored, MiB | listed by the kept backups, MiB | dead, MiB | live (the limit), MiB | "
          "stored / live | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, v in s.items():
        print(f"| {name} | {v['stored_pack_bytes'] / mib:.1f} | {v['listed_pack_bytes'] / mib:.1f} | "
              f"{v['dead_bytes'] / mib:.1f} | {v['live_bytes'] / mib:.1f} | "
              f"{v['stored_pack_bytes'] / max(v['live_bytes'], 1):.2f} | {v.get('seconds', '')} |")
    print(f"verify --deep {out['verify_deep_seconds']} s; restore {out['restore_seconds']} s; "
          f"restored cluster matches its source: {out['restored_matches_source']}")


if __name__ == "__main__":
    main()
