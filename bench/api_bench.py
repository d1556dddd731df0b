#!/usr/bin/env python3
"""Control-plane benchmark: PUT and GET throughput and latency of `meridian api` on SQLite and on
Postgres (a throwaway cluster started here), over HTTPS with a bearer token, from N client threads.

    bench/api_bench.py [--puts 2000] [--gets 5000] [--threads 8]      (MERIDIAN_BIN: release binary)

The client is Python (requests, one keep-alive session per thread), so absolute numbers include
client overhead; compare the two stores with each other, not with other systems.
"""
import argparse, os, re, shutil, socket, statistics, subprocess, sys, tempfile, threading, time
from pathlib import Path

import requests

SUB = "00000000-0000-0000-0000-0000000000b1"
ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_pg(args):
    return (["runuser", "-u", "postgres", "--"] + args) if os.geteuid() == 0 else args


def start_postgres():
    d = Path(tempfile.mkdtemp(prefix="meridian-bench-pg-"))
    if os.geteuid() == 0:
        shutil.chown(d, "postgres", "postgres")
    port = free_port()
    subprocess.run(as_pg(["initdb", "-D", str(d / "data"), "-A", "trust", "-U", "postgres"]), check=True, capture_output=True)
    subprocess.run(as_pg(["pg_ctl", "-D", str(d / "data"), "-o", f"-p {port} -k {d} -c listen_addresses=127.0.0.1",
                          "-l", str(d / "log"), "-w", "start"]), check=True, capture_output=True)
    return d, f"postgres://postgres@127.0.0.1:{port}/postgres"


def start_api(binary, database_url):
    data = Path(tempfile.mkdtemp(prefix="meridian-bench-api-"))
    cmd = [binary, "api", "--listen", "127.0.0.1:0", "--data-dir", str(data), "--tls-self-signed"]
    if database_url:
        cmd += ["--database-url", database_url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    base = ca = None
    while base is None or ca is None:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("meridian api exited before printing its URL")
        if m := re.search(r"listening on (https://\S+)", line):
            base = m.group(1)
        if m := re.search(r"REQUESTS_CA_BUNDLE\): (\S+)", line):
            ca = m.group(1)
    token = subprocess.run([binary, "token", "--role", "Owner", "--scope", f"/subscriptions/{SUB}", "--data-dir", str(data)],
                           check=True, capture_output=True, text=True).stdout.strip()
    return proc, data, base, ca, token


def run(kind, total, threads, fn):
    lat, errors, lock = [], [0], threading.Lock()

    def worker(idx):
        s = requests.Session()
        mine = []
        for i in range(idx, total, threads):
            t0 = time.perf_counter()
            ok = fn(s, i)
            mine.append(time.perf_counter() - t0)
            if not ok:
                with lock:
                    errors[0] += 1
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    elapsed = time.perf_counter() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
    return {"kind": kind, "n": total, "rps": total / elapsed, "p50": q(0.50), "p99": q(0.99), "errors": errors[0]}


def bench_store(binary, label, database_url, args):
    proc, data, base, ca, token = start_api(binary, database_url)
    try:
        h = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        ns = f"{base}/subscriptions/{SUB}/resourceGroups/bench/providers/Microsoft.EventGrid/namespaces"
        v = "?api-version=2025-02-15"
        r = requests.put(f"{ns}/ns1{v}", json={"location": "westus", "properties": {}}, headers=h, verify=ca)
        assert r.status_code in (200, 201), r.text
        body = {"properties": {"topicTemplates": ["devices/${client.authenticationName}/#"]}}

        def put(s, i):
            r = s.put(f"{ns}/ns1/topicSpaces/ts{i}{v}", json=body, headers=h, verify=ca)
            return r.status_code in (200, 201)

        def get(s, i):
            r = s.get(f"{ns}/ns1/topicSpaces/ts{i % args.puts}{v}", headers=h, verify=ca)
            return r.status_code == 200

        print(f"[{label}] PUT x{args.puts} ...", file=sys.stderr, flush=True)
        rp = run("PUT (create)", args.puts, args.threads, put)
        print(f"[{label}] GET x{args.gets} ...", file=sys.stderr, flush=True)
        rg = run("GET", args.gets, args.threads, get)
        return [(label, rp), (label, rg)]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(data, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--puts", type=int, default=2000)
    ap.add_argument("--gets", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args()
    binary = os.environ.get("MERIDIAN_BIN", str(ROOT / "target/release/meridian"))
    rows = bench_store(binary, "SQLite", None, args)
    pg_dir, url = start_postgres()
    try:
        rows += bench_store(binary, "Postgres", url, args)
    finally:
        subprocess.run(as_pg(["pg_ctl", "-D", str(pg_dir / "data"), "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(pg_dir, ignore_errors=True)
    print(f"\n{args.threads} client threads, HTTPS, bearer token, Event Grid topicSpaces\n")
    print("| store | request | count | req/s | p50 ms | p99 ms | errors |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, r in rows:
        print(f"| {label} | {r['kind']} | {r['n']} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['errors']} |")
    if any(r["errors"] for _, r in rows):
        sys.exit(2)


if __name__ == "__main__":
    main()
