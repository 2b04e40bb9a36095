#!/usr/bin/env python3
"""Apex side by side with LangGraph's Agent Server, in one invocation (loopback only).

Suites (all by default):
  runs     Apex and the peer at the same concurrency levels (1, 10, 50, 200 users), each
           level bounded in time, on a fresh server each: runs/s, time to first event
           p50/p99, run duration p50/p99, errors, server RSS idle/peak, CPU-seconds per run.
           Apex runs its full 5-agent pipeline with persistence (SQLite) and the
           deterministic `template` writer without streaming delay; the peer runs its
           3-node graph with no LLM (../shared/bench/peer-langgraph).
  latency  Apex event delivery latency (server timestamp -> client receipt) at 1, 100 and
           1,000 connected users with runs going, saturated (runs back to back) and paced
           (think time between a user's runs; all users together ask for --paced-rate runs/s).
  memory   Apex RSS per idle authenticated WebSocket at 1,000 and 10,000 connections.
  cluster  The same load against 1 and 3 Apex instances sharing PostgreSQL and Redis
           (--postgres, --redis; default the test services' URLs).

Usage:
  python3 bench/side_by_side.py                       # everything (~15 min)
  python3 bench/side_by_side.py --suites runs --users 1,10 --duration 10 --skip-peer

Results: a markdown report on stdout and in bench/results/<timestamp>.md, raw points in
bench/results/<timestamp>.jsonl. Python 3 standard library only; builds `apex` in release.
"""

import argparse
import datetime as dt
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PEER_DIR_DEFAULT = ROOT.parent / "shared" / "bench" / "peer-langgraph"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(*parts):
    print("[bench]", *parts, file=sys.stderr, flush=True)


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def build_apex():
    target_dir = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    log("building apex (release) ...")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "apex"], cwd=ROOT, check=True)
    return target_dir / "release" / "apex"


def proc_tree(pid):
    """pid and its descendants."""
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = pathlib.Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            children = []
        for child in map(int, children):
            pids.append(child)
            frontier.append(child)
    return pids


def rss_mb(pid):
    total = 0
    for p in proc_tree(pid):
        try:
            total += int(pathlib.Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total / (1024 * 1024)


def cpu_seconds(pid):
    total = 0.0
    for p in proc_tree(pid):
        try:
            fields = pathlib.Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            pass
    return total


class PeakSampler(threading.Thread):
    """Samples a process tree's RSS every 100 ms; `peak` is the largest seen."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.1)


def load_flags(apex):
    """The abuse throttles off (the load client creates every account, thread and ticket
    from one address in moments), for a binary that has them: releases before the
    throttles existed would refuse the flags."""
    help_text = subprocess.run([str(apex), "serve", "--help"], capture_output=True,
                               text=True, check=False).stdout
    flags = []
    for flag in ("--registrations-per-minute", "--registrations-per-minute-total",
                 "--threads-per-minute", "--tickets-per-minute"):
        if flag + " " in help_text or flag + "\n" in help_text:
            flags += [flag, "0"]
    return flags


class ApexServer:
    """A fresh `apex serve` on an empty data folder, limits raised for load. `env` adds
    variables, e.g. a PostgreSQL database and a Redis bus for several instances."""

    def __init__(self, apex, port, env=None):
        self.data = tempfile.mkdtemp(prefix="apex-bench-")
        args = [
            str(apex), "serve", "--bind", f"127.0.0.1:{port}", "--data-dir", self.data,
            "--llm-provider", "template", "--template-stream-delay-ms", "0",
            "--max-runs-per-user", "1000", "--messages-per-minute", "100000000",
            "--message-burst", "100000000", "--max-connections-per-user", "100000",
        ] + load_flags(apex)
        env = dict(os.environ, APEX_LOG="warn", **(env or {}))
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            raise RuntimeError(f"apex serve did not start: {line!r}")
        self.url = line.removeprefix("listening on ")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.data, ignore_errors=True)


def loadgen(apex, url, users, duration, extra=()):
    """Runs `apex loadgen --json`; returns (report, cpu at load start) via the stderr line."""
    args = [
        str(apex), "loadgen", "--server", url, "--users", str(users), "--connections", "1",
        "--runs", "100000000", "--duration", str(duration), "--json", *extra,
    ]
    return subprocess.run(args, capture_output=True, text=True, check=False)


def apex_point(apex, users, duration, settle, port):
    server = ApexServer(apex, port)
    try:
        time.sleep(settle)
        idle = rss_mb(server.proc.pid)
        # Registration (argon2 password hashing) is not part of a run: take the CPU
        # reading once the load generator has registered everyone.
        sampler = PeakSampler(server.proc.pid)
        sampler.start()
        proc = subprocess.Popen(
            [str(apex), "loadgen", "--server", server.url, "--users", str(users),
             "--connections", "1", "--runs", "100000000", "--duration", str(duration),
             "--json", "--announce"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        cpu_start = None
        for line in proc.stderr:
            if line.startswith("load starts"):
                cpu_start = cpu_seconds(server.proc.pid)
                break
        out, err = proc.communicate()
        cpu_end = cpu_seconds(server.proc.pid)
        sampler.stop.set()
        sampler.join()
        if proc.returncode not in (0, 1) or not out.strip():
            raise RuntimeError(f"apex loadgen failed: {err}")
        report = json.loads(out.strip().splitlines()[-1])
        runs = report["runs_completed"] + report["runs_cancelled"] + report["runs_other"]
        cpu = cpu_end - (cpu_start if cpu_start is not None else 0.0)
        return {
            "server": "apex", "users": users, "runs_per_s": report["runs_per_s"],
            "first_event_ms": report["time_to_first_event_ms"],
            "run_ms": report["run_duration_ms"], "event_latency_ms": report["event_latency_ms"],
            "errors": report["errors"] + report["runs_other"],
            "isolation_violations": report["cross_user_frames"] + report["lost_events"]
            + report["duplicate_events"] + report["wrong_numbers"],
            "rss_idle_mb": round(idle, 1), "rss_peak_mb": round(sampler.peak, 1),
            "cpu_s_per_run": round(cpu / max(runs, 1), 5), "runs": runs,
            "events": report["events_received"], "wall_s": report["elapsed"],
        }
    finally:
        server.close()


def peer_points(peer_source, users, duration):
    if not (peer_source / "run_bench.py").exists():
        log(f"peer harness not found at {peer_source}; skipping the peer")
        return []
    # The harness is read-only where it is shared: run a copy in a scratch folder outside
    # the project, which also keeps its venvs and build between invocations.
    peer_dir = pathlib.Path(os.environ.get("APEX_BENCH_WORK", pathlib.Path.home() / ".cache" / "apex-bench")) / "peer-langgraph"
    shutil.copytree(peer_source, peer_dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".work", "target"))
    for path in [peer_dir, *peer_dir.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    log(f"setting up the peer in {peer_dir} (venvs, its load client) ...")
    # The harness expects its load client in its own target folder: a CARGO_TARGET_DIR
    # meant for Apex would send the build elsewhere.
    peer_env = {k: v for k, v in os.environ.items() if k != "CARGO_TARGET_DIR"}
    subprocess.run(["bash", "setup.sh"], cwd=peer_dir, check=True, env=peer_env)
    before = set((peer_dir / "results").glob("*.jsonl"))
    subprocess.run(
        [sys.executable, "run_bench.py", "--configs", "lg-dev-default", "--users",
         ",".join(map(str, users)), "--reps", "1", "--duration", str(min(duration, 30)),
         "--quiet-wait", "30"],
        cwd=peer_dir, check=True,
    )
    new = sorted(set((peer_dir / "results").glob("*.jsonl")) - before)
    points = []
    for path in new:
        for line in path.read_text().splitlines():
            p = json.loads(line)
            points.append({
                "server": "langgraph", "users": p["users"], "runs_per_s": p["runs_per_s"],
                "first_event_ms": {"p50": p["first_event_ms"]["p50"], "p99": p["first_event_ms"]["p99"]},
                "run_ms": {"p50": p["last_event_ms"]["p50"], "p99": p["last_event_ms"]["p99"]},
                "errors": p["errors"], "rss_idle_mb": p["rss_idle_mb"],
                "rss_peak_mb": p["rss_peak_mb"],
                "cpu_s_per_run": round(p["server_cpu_ms_per_run"] / 1000, 5),
                "runs": p["completed"],
            })
    return points


def latency_points(apex, levels, duration, port, paced_rate):
    """Each level twice: saturated (every user's runs back to back, so the two cores are
    busy and the figure is mostly queueing) and paced (users pause between runs so that
    all of them together ask for about `paced_rate` runs/s, a load the server keeps up
    with, which is what delivery latency means)."""
    points = []
    for users in levels:
        for mode in ("saturated", "paced"):
            think_ms = 0 if mode == "saturated" else int(users * 1000 / paced_rate)
            server = ApexServer(apex, port)
            try:
                out = loadgen(apex, server.url, users, duration,
                              extra=("--think-ms", str(think_ms)))
                report = json.loads(out.stdout.strip().splitlines()[-1])
                points.append({
                    "users": users, "mode": mode, "think_ms": think_ms,
                    "event_latency_ms": report["event_latency_ms"],
                    "first_event_ms": report["time_to_first_event_ms"],
                    "events": report["events_received"], "runs_per_s": report["runs_per_s"],
                })
            finally:
                server.close()
    return points


def memory_points(apex, levels, port):
    points = []
    for connections in levels:
        users = max(1, connections // 100)
        server = ApexServer(apex, port)
        try:
            proc = subprocess.Popen(
                [str(apex), "loadgen", "--server", server.url, "--users", str(users),
                 "--idle-connections", str(connections), "--hold", "8"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            before = after = None
            for line in proc.stderr:
                if line.startswith("registered"):
                    time.sleep(2)
                    before = rss_mb(server.proc.pid)
                elif line.startswith("connected"):
                    time.sleep(3)
                    after = rss_mb(server.proc.pid)
                    break
            out, _ = proc.communicate()
            report = json.loads(out.strip().splitlines()[-1])
            opened = max(report["opened"], 1)
            points.append({
                "connections": connections, "opened": report["opened"],
                "failed": report["failed"], "rss_before_mb": round(before, 1),
                "rss_after_mb": round(after, 1),
                "kib_per_connection": round((after - before) * 1024 / opened, 1),
            })
        finally:
            server.close()
    return points


def psql(url, sql):
    subprocess.run(["psql", url, "-qAt", "-c", sql], check=True, capture_output=True)


def cluster_points(apex, counts, users, duration, port, pg_url, redis_url):
    """The same load against 1 and N instances sharing one PostgreSQL and one Redis:
    users' connections spread over the instances, each run followed wherever it executes."""
    points = []
    for count in counts:
        schema = f"apex_bench_{int(time.time())}_{count}"
        psql(pg_url, f'CREATE SCHEMA "{schema}"')
        separator = "&" if "?" in pg_url else "?"
        env = {
            "APEX_DATABASE_URL": f"{pg_url}{separator}options[search_path]={schema}",
            "APEX_BUS_URL": redis_url,
            "APEX_BUS_CHANNEL_PREFIX": schema,
            "APEX_JWT_SECRET": "bench-secret-0123456789abcdef0123456789",
        }
        subprocess.run([str(apex), "migrate"], env=dict(os.environ, **env), check=True,
                       capture_output=True)
        servers = []
        try:
            for i in range(count):
                servers.append(ApexServer(apex, port + i, env))
            time.sleep(2)
            cpu_start = sum(cpu_seconds(s.proc.pid) for s in servers)
            extra = [a for s in servers[1:] for a in ("--also-server", s.url)]
            out = loadgen(apex, servers[0].url, users, duration, extra)
            cpu = sum(cpu_seconds(s.proc.pid) for s in servers) - cpu_start
            report = json.loads(out.stdout.strip().splitlines()[-1])
            runs = report["runs_completed"] + report["runs_cancelled"] + report["runs_other"]
            points.append({
                "instances": count, "users": users, "runs_per_s": report["runs_per_s"],
                "first_event_ms": report["time_to_first_event_ms"],
                "event_latency_ms": report["event_latency_ms"],
                "errors": report["errors"] + report["runs_other"],
                "isolation_violations": report["cross_user_frames"] + report["lost_events"]
                + report["duplicate_events"] + report["wrong_numbers"],
                "cpu_s_per_run": round(cpu / max(runs, 1), 5), "runs": runs,
            })
        finally:
            for server in servers:
                server.close()
            psql(pg_url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return points


def pct(d, key):
    value = d.get(key)
    return "-" if value is None else f"{value:g}"


def render(machine, runs, latency, memory, duration, cluster=()):
    lines = [f"# Side-by-side benchmark, {machine['when']}", "",
             f"Machine: {machine['cpus']} CPUs, {machine['cpu']}; load average before: "
             f"{machine['load']}. Loopback only; {duration} s per point, a fresh server each.",
             ""]
    if runs:
        lines += [
            "## Runs (Apex: 5 agents, SQLite persistence, template writer without delay; "
            "LangGraph: 3-node graph, no LLM, in-memory)", "",
            "| server | users | runs/s | first event p50 / p99 ms | run p50 / p99 ms | errors "
            "| RSS idle / peak MB | CPU-s per run |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in sorted(runs, key=lambda p: (p["users"], p["server"])):
            lines.append(
                f"| {p['server']} | {p['users']} | {p['runs_per_s']:.1f} | "
                f"{pct(p['first_event_ms'], 'p50')} / {pct(p['first_event_ms'], 'p99')} | "
                f"{pct(p['run_ms'], 'p50')} / {pct(p['run_ms'], 'p99')} | {p['errors']} | "
                f"{p['rss_idle_mb']:.0f} / {p['rss_peak_mb']:.0f} | {p['cpu_s_per_run']:.4f} |")
        by = {(p["server"], p["users"]): p for p in runs}
        ratios = [f"{u} users: {by[('apex', u)]['runs_per_s'] / by[('langgraph', u)]['runs_per_s']:.1f}x"
                  for (s, u) in sorted(by) if s == "apex" and ("langgraph", u) in by
                  and by[("langgraph", u)]["runs_per_s"] > 0]
        if ratios:
            lines += ["", "Apex runs/s over the peer's: " + ", ".join(ratios) + "."]
        lines.append("")
    if latency:
        lines += ["## Event delivery latency (server timestamp to client receipt)", "",
                  "Saturated: every user's runs back to back. Paced: users pause between runs "
                  "(think time) so that together they ask for a rate the server keeps up with.", "",
                  "| users (1 connection each, runs going) | load | runs/s | events | p50 ms | p99 ms "
                  "| p99.9 ms | max ms | first event p50 / p99 ms |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for p in latency:
            l, f = p["event_latency_ms"], p["first_event_ms"]
            load = p["mode"] if not p["think_ms"] else f"paced (think {p['think_ms']} ms)"
            lines.append(f"| {p['users']} | {load} | {p['runs_per_s']:.1f} | {p['events']} | {l['p50']} "
                         f"| {l['p99']} | {l['p999']} | {l['max']} | {f['p50']} / {f['p99']} |")
        lines.append("")
    if cluster:
        lines += ["## One instance against several (PostgreSQL + Redis, the same load)", "",
                  "| instances | users | runs/s | first event p50 / p99 ms | event latency p50 / p99 ms "
                  "| errors | isolation violations | CPU-s per run (all instances) |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for p in cluster:
            f, l = p["first_event_ms"], p["event_latency_ms"]
            lines.append(f"| {p['instances']} | {p['users']} | {p['runs_per_s']:.1f} | {f['p50']} / "
                         f"{f['p99']} | {l['p50']} / {l['p99']} | {p['errors']} | "
                         f"{p['isolation_violations']} | {p['cpu_s_per_run']:.4f} |")
        lines.append("")
    if memory:
        lines += ["## Memory per idle authenticated WebSocket", "",
                  "| connections | opened | RSS before / after MB | KiB per connection |",
                  "| ---: | ---: | ---: | ---: |"]
        for p in memory:
            lines.append(f"| {p['connections']} | {p['opened']} | {p['rss_before_mb']} / "
                         f"{p['rss_after_mb']} | {p['kib_per_connection']} |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", default="runs,latency,memory,cluster")
    parser.add_argument("--users", default="1,10,50,200")
    parser.add_argument("--latency-users", default="1,100,1000")
    parser.add_argument("--paced-rate", type=float, default=40.0,
                        help="runs/s all users together ask for in the paced latency points")
    parser.add_argument("--memory-connections", default="1000,10000")
    parser.add_argument("--duration", type=int, default=20, help="seconds per point")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--port", type=int, default=18321)
    parser.add_argument("--cluster-instances", default="1,3")
    parser.add_argument("--cluster-users", type=int, default=50)
    parser.add_argument("--postgres", default=os.environ.get(
        "APEX_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--redis", default=os.environ.get(
        "APEX_TEST_REDIS_URL", "redis://127.0.0.1:6379"))
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--peer-dir", type=pathlib.Path, default=PEER_DIR_DEFAULT)
    parser.add_argument("--apex", type=pathlib.Path, help="use this apex binary (no build)")
    args = parser.parse_args()
    suites = set(args.suites.split(","))
    fd_limit = raise_fd_limit()
    log(f"file descriptor limit {fd_limit}")
    apex = args.apex or build_apex()
    machine = {
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                     if l.startswith("model name")), "?"),
        "load": " ".join(open("/proc/loadavg").read().split()[:3]),
    }
    users = [int(u) for u in args.users.split(",")]
    runs, latency, memory, cluster = [], [], [], []
    if "runs" in suites:
        for n in users:
            log(f"apex, {n} users ...")
            runs.append(apex_point(apex, n, args.duration, args.settle, args.port))
        if not args.skip_peer:
            runs += peer_points(args.peer_dir, users, args.duration)
    if "latency" in suites:
        log("event latency ...")
        latency = latency_points(apex, [int(u) for u in args.latency_users.split(",")],
                                 args.duration, args.port, args.paced_rate)
    if "memory" in suites:
        log("idle connection memory ...")
        memory = memory_points(apex, [int(c) for c in args.memory_connections.split(",")], args.port)
    if "cluster" in suites:
        log("one instance against several ...")
        cluster = cluster_points(apex, [int(c) for c in args.cluster_instances.split(",")],
                                 args.cluster_users, args.duration, args.port,
                                 args.postgres, args.redis)
    report = render(machine, runs, latency, memory, args.duration, cluster)
    print(report)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"{stamp}.md").write_text(report + "\n")
    with open(out / f"{stamp}.jsonl", "w") as f:
        for p in runs + latency + memory + cluster:
            f.write(json.dumps({"machine": machine, **p}) + "\n")
    log(f"wrote bench/results/{stamp}.md")


if __name__ == "__main__":
    main()
