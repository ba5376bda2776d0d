#!/usr/bin/env python3
"""Scale on paper: a 1 TB cluster with 1,000,000 relation files, projected from walvault's
measured costs per byte, per file and per request.

Input: a JSON of bench/rivals.py with several shapes (small and large files; --tools walvault is
enough), for example

    bench/rivals.py --tools walvault --shapes many:2500,many:10000,50,300 --stores file,s3 \\
        --only full,restore --rounds 1 --json bench/results/scale.json
    bench/project.py bench/results/scale.json

For each store and operation (full backup, restore until durable) it fits, by least squares over
the shapes, seconds = c + a * GB + b * (1,000 files), and the same for the requests the store
saw; peak RSS = r0 + r1 * (1,000 files); the physical limit (bench/src/bin/limits.rs) the same
way. Then it projects the fitted costs to --tb terabytes and --files files, at 2, 16 and 64
streams, under the assumptions printed with the table (what scales with streams, what does
not). The fit, its residuals and the projection are printed; the JSON gets a "projection" key.
Measurements come from this 2-core machine: the projection says what grows with what, not what a
given server will do.
"""
import argparse
import json
import sys

# Assumed for the projection (printed with it).
NIC_GBPS = 25.0             # the host's network, Gbit/s
STORED_RATIO = 0.33         # stored bytes per byte of the cluster (production data: ~3x; pgbench ~20x)
DISK_GBS = 2.0              # the host's local disk, GB/s (what a backup reads, a restore writes)
S3_STREAM_MBPS = 90.0       # one S3 connection's throughput, MB/s (AWS: ~85-90 MB/s per connection)
S3_PREFIX_PUTS = 3500       # S3's request rate per prefix and second (PUT; GET 5,500)
S3_LATENCY_S = 0.020        # first byte of a request in a cloud region
MEASURED_STREAMS = 2        # the measurements' --parallel (this machine has 2 cores)


def solve(rows, ys):
    """Least squares: the coefficients x minimising |rows x - ys| (normal equations, Gauss)."""
    n = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(n)] for i in range(n)]
    b = [sum(r[i] * y for r, y in zip(rows, ys)) for i in range(n)]
    for i in range(n):
        p = max(range(i, n), key=lambda k: abs(a[k][i]))
        a[i], a[p], b[i], b[p] = a[p], a[i], b[p], b[i]
        if abs(a[i][i]) < 1e-12:
            return None
        for k in range(i + 1, n):
            f = a[k][i] / a[i][i]
            a[k] = [x - f * y for x, y in zip(a[k], a[i])]
            b[k] -= f * b[i]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (b[i] - sum(a[i][j] * x[j] for j in range(i + 1, n))) / a[i][i]
    return x


def requests(m):
    s3 = (m or {}).get("s3")
    if not isinstance(s3, dict):
        return None
    return sum(v for v in s3.get("requests", {}).values() if isinstance(v, (int, float)))


def points(results, kind, op):
    """(GB, thousands of files, seconds, limit seconds, RSS MiB, requests) of each shape."""
    out = []
    for spec, sh in results["shapes"].items():
        rounds = sh.get("stores", {}).get(kind, {}).get("rounds", [])
        for r in rounds:
            m = r.get(op, {}).get("walvault")
            if not m or m.get("seconds") is None:
                continue
            lim = r.get(op, {}).get("limit", {}).get("seconds")
            out.append({"shape": spec, "gb": sh["database_bytes"] / 1e9, "kfiles": sh["files"] / 1000,
                        "seconds": m["seconds"], "limit": lim, "rss": m.get("peak_rss_mib"),
                        "requests": requests(m)})
    return out


def fit(pts, key, terms):
    rows = [[1.0] + [p[t] for t in terms] for p in pts if p.get(key) is not None]
    ys = [p[key] for p in pts if p.get(key) is not None]
    if len(rows) < len(terms) + 1:
        return None
    x = solve(rows, ys)
    if x is None:
        return None
    resid = [y - sum(c * v for c, v in zip(x, r)) for r, y in zip(rows, ys)]
    return {"const": x[0], **{t: c for t, c in zip(terms, x[1:])}, "max_residual": max(map(abs, resid))}


def project_time(f, gb, kfiles, streams, store):
    """Seconds at `streams`: the CPU-bound byte and file costs divide over the streams (a host
    with a core per stream), bounded below by the local disk and, on S3, by the network and
    the per-connection throughput; the constant does not scale."""
    if f is None:
        return None
    scale = MEASURED_STREAMS / streams
    cpu = max(f["gb"], 0) * gb * scale + max(f["kfiles"], 0) * kfiles * scale
    floor = gb / DISK_GBS
    if store != "file":
        stored = gb * STORED_RATIO
        floor = max(floor, stored * 8 / NIC_GBPS, stored * 1000 / (S3_STREAM_MBPS * streams))
    return max(f["const"], 0) + max(cpu, floor)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json")
    ap.add_argument("--tb", type=float, default=1.0)
    ap.add_argument("--files", type=int, default=1_000_000)
    args = ap.parse_args()
    with open(args.json) as f:
        results = json.load(f)
    gb, kfiles = args.tb * 1000, args.files / 1000
    proj = {"assumptions": {"nic_gbps": NIC_GBPS, "disk_gb_per_s": DISK_GBS, "stored_ratio": STORED_RATIO, "s3_stream_mbps": S3_STREAM_MBPS,
                            "s3_prefix_puts_per_s": S3_PREFIX_PUTS, "s3_latency_s": S3_LATENCY_S,
                            "measured_streams": MEASURED_STREAMS},
            "target": {"gb": gb, "files": args.files}, "fits": {}, "rows": []}
    print(f"Projection to {args.tb:g} TB and {args.files:,} files from {args.json}\n")
    print("| store | operation | s per GB | s per 1,000 files | const s | limit s per GB | limit s per 1,000 files "
          "| RSS MiB + per 1,000 files | requests per GB, per 1,000 files | max residual s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind in results["config"]["stores"]:
        for op, label in (("full", "full backup"), ("restore", "restore until durable")):
            pts = points(results, kind, op)
            if len(pts) < 3:
                continue
            t = fit(pts, "seconds", ["gb", "kfiles"])
            lim = fit(pts, "limit", ["gb", "kfiles"])
            rss = fit(pts, "rss", ["kfiles"])
            req = fit(pts, "requests", ["gb", "kfiles"])
            proj["fits"][f"{kind}/{op}"] = {"points": pts, "seconds": t, "limit": lim, "rss": rss, "requests": req}
            print(f"| {kind} | {label} | {t['gb']:.3f} | {t['kfiles']:.4f} | {t['const']:.2f} | "
                  f"{lim['gb']:.3f} | {lim['kfiles']:.4f} | {rss['const']:.0f} + {rss['kfiles']:.3f} | "
                  + (f"{req['gb']:.1f}, {req['kfiles']:.2f}" if req else "–")
                  + f" | {t['max_residual']:.2f} |")
            for streams in (2, 16, 64):
                secs = project_time(t, gb, kfiles, streams, kind)
                lsecs = project_time(lim, gb, kfiles, streams, kind)
                nreq = req["const"] + req["gb"] * gb + req["kfiles"] * kfiles if req else None
                proj["rows"].append({"store": kind, "op": op, "streams": streams, "seconds": secs,
                                     "limit_seconds": lsecs, "requests": nreq,
                                     "rss_mib": rss["const"] + rss["kfiles"] * kfiles,
                                     "files_share": (t["kfiles"] * kfiles) / max(t["gb"] * gb + t["kfiles"] * kfiles, 1e-9)})
    print("\n| store | operation | streams | projected time | limit | requests | peak RSS | share of time per file |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in proj["rows"]:
        hours = lambda s: "–" if s is None else (f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min")
        print(f"| {r['store']} | {r['op']} | {r['streams']} | {hours(r['seconds'])} | {hours(r['limit_seconds'])} | "
              + ("–" if r["requests"] is None else f"{r['requests']:,.0f}")
              + f" | {r['rss_mib']:,.0f} MiB | {r['files_share'] * 100:.0f}% |")
    print(f"\nAssumed: a core per stream (the CPU costs per byte and per file, measured at {MEASURED_STREAMS} streams "
          f"on 2 cores, divide by streams / {MEASURED_STREAMS}); S3 at {S3_STREAM_MBPS:g} MB/s per connection (one per "
          f"stream) carrying {STORED_RATIO:g} stored bytes per byte of the cluster, and "
          f"a {NIC_GBPS:g} Gbit/s network (the floor of every S3 byte term), a local disk of {DISK_GBS:g} GB/s "
          "(the floor of every byte term); peak RSS as measured (it does not "
          "depend on streams in this model).")
    results["projection"] = proj
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
