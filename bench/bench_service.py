"""Load on the search service (issue 19): bounded, on loopback, never a timed unit test.

    .venv/bin/python bench/bench_service.py [--seconds 60] [--clients 16] [--client wrk|httpx]

Starts ``qshift serve world:test -e world:mini-clip --pipeline bench/configs/serve-world.yaml``
on 127.0.0.1, waits for ``/ready``, then for each scenario runs ``--clients`` closed-loop
connections for ``--seconds`` against ``POST /search`` — with wrk (Debian's ``wrk``, one
thread in C, so the load generator takes little of the 2 cores it shares with the server)
or, where wrk is missing, asyncio + httpx clients — with
distinct world test captions (one character swapped in every other word, so repair has
work): zero-shot (every optional stage off), + spell repair, + QuARI re-rank, + online TTA.
Reports requests/s, p50/p99 latency, errors, the server's resident memory (sampled every
second) and, for TTA, whether the adapter learnt from exactly the queries it served (no
lost or duplicated batch, read from ``/metrics``). Zero-shot also runs open-loop at
``--rate`` requests/s (latency from each request's scheduled time), the form of the
target "≥ 200 requests/s at p99 ≤ 50 ms".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, md_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QSHIFT = str(Path(sys.executable).with_name("qshift"))
SCENARIOS = {  # label: request fields besides text and k
    "zero-shot": {"stages": {"refine": False, "adapt": False, "transform": False}},
    "+ spell repair": {"stages": {"refine": True, "adapt": False, "transform": False}},
    "+ QuARI re-rank": {"stages": {"refine": False, "adapt": False, "transform": True}},
    "+ online TTA (TCR)": {"stages": {"refine": False, "adapt": True, "transform": False}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS")) / 1024


def noisy(text: str, rng: random.Random) -> str:
    words = text.split()
    for i in range(0, len(words), 2):
        w = words[i]
        if len(w) > 3:
            j = rng.randrange(1, len(w) - 2)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def adapter_queries(client, url: str) -> float:  # noqa: ANN001
    text = client.get(f"{url}/metrics").text
    return sum(float(m) for m in re.findall(r"^qshift_adapter_queries\{[^}]*\} ([0-9.e+]+)$", text, re.M))


async def _post(c, url: str, q: str, payload: dict, since: float, lat: list, status: dict) -> None:  # noqa: ANN001
    """One search request; its latency from ``since`` and its status (−1: no answer)."""
    import httpx

    try:
        code = (await c.post(f"{url}/search", json={"text": q, "k": 10, **payload})).status_code
    except httpx.HTTPError:
        code = -1
    lat.append(time.perf_counter() - since)
    status[code] = status.get(code, 0) + 1


async def load(url: str, payload: dict, queries: list[str], clients: int, seconds: float) -> dict:
    import httpx

    lat: list[float] = []
    status: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def client(c: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            q = queries[next(counter) % len(queries)]
            await _post(c, url, q, payload, time.perf_counter(), lat, status)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1e3
    ok = status.get(200, 0)
    return {"requests": len(lat), "ok": ok, "errors": len(lat) - ok, "status": {str(k): v for k, v in status.items()},
            "rps": ok / wall, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean())}


async def paced(url: str, payload: dict, queries: list[str], rate: float, seconds: float) -> dict:
    """Open loop: one request every 1/rate s whatever the answers do; latency counts from
    the scheduled send time (no coordinated omission)."""
    import httpx

    lat: list[float] = []
    status: dict[int, int] = {}

    async def one(c: httpx.AsyncClient, q: str, due: float) -> None:
        await _post(c, url, q, payload, due, lat, status)

    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(limits=limits, timeout=30) as c:
        t0 = time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(c, queries[i % len(queries)], due)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1e3
    ok = status.get(200, 0)
    return {"requests": len(lat), "ok": ok, "errors": len(lat) - ok, "rps": ok / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


WRK_LUA = """
local bodies = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", "/search", {["Content-Type"] = "application/json"}, bodies[(i %% #bodies) + 1])
end
"""


def _ms(v: str) -> float:
    num = float(re.match(r"[0-9.]+", v).group())
    return num * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[re.search(r"[a-z]+$", v).group()]


def wrk_load(url: str, payload: dict, queries: list[str], clients: int, seconds: float) -> dict:
    """Closed loop with wrk (C, one thread: the load generator costs the server little CPU)."""
    import json
    import shutil

    bodies = ",".join(json.dumps(json.dumps({"text": q, "k": 10, **payload})) for q in queries[:2000])
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(WRK_LUA % bodies)
    cmd = [shutil.which("wrk"), "-t1", f"-c{clients}", f"-d{seconds:g}s", "--latency", "--timeout", "30s",
           "-s", fh.name, url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    os.unlink(fh.name)
    n = int(re.search(r"(\d+) requests in", out).group(1))
    bad = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    sock = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    pct = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M))
    return {"requests": n, "ok": n - bad, "errors": bad + sock, "rps": float(re.search(r"Requests/sec:\s+([0-9.]+)",
                                                                                       out).group(1)),
            "p50_ms": _ms(pct["50"]), "p99_ms": _ms(pct["99"]), "client": f"wrk -c{clients}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=200.0, help="open-loop arrival rate of the paced zero-shot run")
    ap.add_argument("--client", choices=["wrk", "httpx"], default="wrk" if shutil.which("wrk") else "httpx",
                    help="load generator: wrk (apt install wrk; little CPU of its own) or Python httpx clients")
    ap.add_argument("--sweep", default="4,8", help="with wrk: zero-shot again at these connection counts")
    args = ap.parse_args()
    import httpx

    from qshift.benchmark import resolve_collection

    coll = resolve_collection("world:test")[1]
    rng = random.Random(0)
    queries = [noisy(c, rng) for caps in coll.captions for c in caps]
    rng.shuffle(queries)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    state = tempfile.mkdtemp(prefix="qshift-bench-serve-")
    cmd = [QSHIFT, "serve", "world:test", "-e", "world:mini-clip",
           "--pipeline", str(ROOT / "bench/configs/serve-world.yaml"), "--port", str(port), "--state-dir", state]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    mem: list[tuple[float, float]] = []
    stop = threading.Event()
    try:
        with httpx.Client(timeout=5) as c:
            for _ in range(600):
                try:
                    if c.get(f"{url}/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None:
                    raise SystemExit(f"server exited: {server.stderr.read()[-2000:]}")
                time.sleep(0.5)
            else:
                raise SystemExit("server not ready after 300 s")
            t_start = time.perf_counter()

            def sample() -> None:
                while not stop.is_set():
                    mem.append((time.perf_counter() - t_start, rss_mb(server.pid)))
                    stop.wait(1.0)

            threading.Thread(target=sample, daemon=True).start()
            rows = []
            for label, payload in SCENARIOS.items():
                asyncio.run(load(url, payload, queries, args.clients, args.warmup))  # warm caches and the stages
                before = adapter_queries(c, url)
                m0 = rss_mb(server.pid)
                if args.client == "wrk":
                    res = wrk_load(url, payload, queries, args.clients, args.seconds)
                else:
                    res = asyncio.run(load(url, payload, queries, args.clients, args.seconds))
                learnt = adapter_queries(c, url) - before
                res.update(scenario=label, rss_start_mb=m0, rss_end_mb=rss_mb(server.pid),
                           adapted_queries=int(learnt) if "TTA" in label else "",
                           adapt_exact=(int(learnt) == res["ok"]) if "TTA" in label else "")
                rows.append(res)
                print(f"{label}: {res['rps']:.0f} req/s, p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, "
                      f"errors {res['errors']}", flush=True)
                if label == "zero-shot" and args.client == "wrk":  # fewer connections: latency vs throughput
                    for c_ in (int(x) for x in args.sweep.split(",") if x):
                        w = wrk_load(url, payload, queries, c_, args.seconds)
                        w.update(scenario=f"zero-shot, {c_} connections")
                        rows.append(w)
                        print(w, flush=True)
                if label == "zero-shot":  # the target's form: a fixed arrival rate, and the p99 it gets
                    for rate in (args.rate, args.rate / 2):
                        p = asyncio.run(paced(url, payload, queries, rate, args.seconds))
                        p.update(scenario=f"zero-shot, open loop at {rate:g} req/s")
                        rows.append(p)
                        print(p, flush=True)
    finally:
        stop.set()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    data = {"command": f"python bench/bench_service.py --seconds {args.seconds:g} --clients {args.clients} "
                       f"--rate {args.rate:g} --client {args.client}",
            "server": " ".join(os.path.relpath(x, ROOT) if x.startswith(str(ROOT)) else x for x in cmd[1:]),
            "clients": args.clients, "seconds": args.seconds, "machine": machine(), "rows": rows,
            "memory_mb": {"start": mem[0][1] if mem else None, "end": mem[-1][1] if mem else None,
                          "max": max(m for _, m in mem) if mem else None}, "clip_retrieval_qps": 20}
    md = ["# Search service under load (issue 19)", "",
          f"`{data['command']}` — server `qshift {data['server']}`, {args.clients} closed-loop connections "
          f"({args.client}) on "
          f"127.0.0.1 for {args.seconds:g} s per scenario (after {args.warmup:g} s of warm-up), distinct noisy "
          "world test captions, k = 10. Clients and server share the machine's cores.", "",
          md_table(rows, ["scenario", "rps", "p50_ms", "p99_ms", "errors", "rss_start_mb", "rss_end_mb",
                          "adapted_queries", "adapt_exact"],
                   {"rps": ".0f", "p50_ms": ".1f", "p99_ms": ".1f", "rss_start_mb": ".0f",
                    "rss_end_mb": ".0f"}), "",
          f"Server memory: {data['memory_mb']['start']:.0f} MB after start-up, {data['memory_mb']['end']:.0f} MB at "
          f"the end, {data['memory_mb']['max']:.0f} MB at most. For scale: clip-retrieval publishes about 20 "
          "queries/s for a text query.", ""]
    write_results("service", data, "\n".join(md))


if __name__ == "__main__":
    main()
