"""Cluster mode's figures, each beside the single hub (SQLite) measured in the same run.

    .venv/bin/python bench/cluster.py --only idle --agents 19000   # (i)
    .venv/bin/python bench/cluster.py --only rates                 # (ii)
    .venv/bin/python bench/cluster.py --only rtt                   # (iii)
    .venv/bin/python bench/cluster.py --only kill                  # (iv)
    .venv/bin/python bench/cluster.py --only redis                 # (v)

Every process is real: ``redis-server`` on a free port of its own (``tests.redis_server``,
never the machine's Redis), ``tether-hub serve --redis URL --hub-id ID`` per hub, the fleet
from ``tether-agent simulate`` processes and ``bench/blaster.py`` (the lean client). Each
scenario prints its figures and one ``met``/``not met`` line per target; run each under
``flock -x /work/coord/bench-lock`` (each keeps under five minutes on two cores).

- **idle** — two hubs on one Redis, the idle fleet split between them, heartbeats every
  15 s: Redis ``used_memory`` per agent, Redis commands a second (``total_commands_processed``
  over 30 s), each hub's RSS per agent held; the single hub holds the same per-hub share.
- **rates** — registrations a second (enrollment, then each agent's own key) and heartbeats
  per CPU-second of the hub process, a cluster hub against the same hub on SQLite.
- **rtt** — the command round trip (dispatch → result seen by the console), console on hub
  A, agents on hub B, Redis with ``appendfsync always`` and ``everysec``; the single hub.
- **kill** — ``kill -9`` of the hub holding 5,000 agents (and leading) mid-job: time until
  all are online on the other hub and the job is finished, every command once; the single
  hub killed and restarted at once.
- **redis** — Redis stopped (SIGTERM, AOF ``always``) for 10 s during a job to 5,000 agents
  on two hubs, then started again: every command finished once, each hub's time to ready
  after Redis answers. (The single hub has no Redis to lose: no baseline.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import ENV, PYTHON, ROOT, Hub, Proc, percentile, run, simulators, wait_until
from bench.run import hub_latency
from hub.protocol.client import AdminClient, AdminError
from tests.redis_server import RedisServer

CONFIG = '[hub]\nlog_level = "WARNING"\nmax_agents = 100000\nheartbeat_interval = 15\n'


class Run:
    """One scenario's processes (all stopped after it) and its figures."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.redis: list[RedisServer] = []
        self.lines: list[str] = []

    def note(self, text: str) -> None:
        self.lines.append(text)
        print(text, flush=True)

    def target(self, what: str, value: float, limit: float, unit: str, most: bool = True) -> None:
        met = value <= limit if most else value >= limit
        sign = "≤" if most else "≥"
        self.note(
            f"  {what}: {value:g} {unit} (target {sign} {limit:g}): {'met' if met else 'NOT met'}"
        )

    def redis_server(self, name: str, appendfsync: str = "everysec") -> RedisServer:
        server = RedisServer(self.workdir / name, appendfsync=appendfsync)
        server.start()
        self.redis.append(server)
        return server

    def hub(self, name: str, redis: RedisServer | None = None, extra: str = "") -> Hub:
        (self.workdir / f"{name}.toml").write_text(CONFIG + extra)
        args = ["--redis", redis.url, "--hub-id", name] if redis is not None else []
        hub = Hub(self.workdir, name=name, extra=args)
        hub.start()
        assert hub.proc is not None
        self.procs.append(hub.proc)
        return hub

    def fleet(self, url: str, token: str, count: int, tag: str, *more: str) -> list[Proc]:
        """Simulated agents on ``url``; with ``more``, one process that fails over to those
        hubs (``simulate`` takes ``--hub`` more than once), its ids ``TAG-00001``…"""
        if not more:
            procs = simulators(self.workdir, url, token, count, tag, rate=1000, tag=tag)
        else:
            hubs = [arg for hub in (url, *more) for arg in ("--hub", hub)]
            procs = [
                Proc(
                    tag,
                    [PYTHON, "-m", "agent", "simulate", *hubs, "--token", token,
                     "--count", str(count), "--prefix", f"{tag}-", "--rate", "1000",
                     "--log-level", "warning"],
                    self.workdir / f"{tag}.log",
                ).start()
            ]  # fmt: skip
        self.procs.extend(procs)
        return procs

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        for server in self.redis:
            server.close()
        self.redis.clear()


def cluster_token(redis: RedisServer, *args: str) -> str:
    done = subprocess.run(
        [PYTHON, "-m", "hub", "token", "create", "--redis", redis.url, *args],
        capture_output=True, text=True, env=ENV, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def ready(hub: Hub) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{hub.port}/readyz", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def rss_mb(proc: Proc | None) -> float:
    assert proc is not None
    return proc.rss() / 2**20


def redis_memory(server: RedisServer) -> int:
    return int(server.info("memory")["used_memory"])


def redis_commands(server: RedisServer) -> int:
    return int(server.info("stats")["total_commands_processed"])


def redis_net(server: RedisServer) -> tuple[int, int]:
    fields = server.info("stats")
    return int(fields["total_net_input_bytes"]), int(fields["total_net_output_bytes"])


def redis_cpu(server: RedisServer) -> float:
    fields = server.info("cpu")
    return float(fields["used_cpu_sys"]) + float(fields["used_cpu_user"])


# -- (i) the idle fleet ------------------------------------------------------------------


def idle(run_: Run, agents: int) -> None:
    half = agents // 2
    run_.note(f"idle: {agents} agents on two hubs on one Redis, {half} on the single hub")
    redis = run_.redis_server("redis-idle")
    a = run_.hub("hub-a", redis)
    b = run_.hub("hub-b", redis)
    enroll = cluster_token(redis, "--enroll")
    time.sleep(3)
    memory0 = redis_memory(redis)
    rss0 = {hub.name: rss_mb(hub.proc) for hub in (a, b)}
    started = time.monotonic()
    run_.fleet(a.url, enroll, half, "ia")
    run_.fleet(b.url, enroll, agents - half, "ib")
    wait_until(lambda: a.online() >= agents, timeout=240, interval=0.5, what="all online")
    run_.note(f"  {agents} agents online on the two hubs in {time.monotonic() - started:.0f} s")
    time.sleep(20)  # a heartbeat round and its flush, then measure
    commands0, cpu0, t0 = redis_commands(redis), redis_cpu(redis), time.monotonic()
    net0 = redis_net(redis)
    hub_cpu0 = {hub.name: hub.proc.cpu() for hub in (a, b) if hub.proc is not None}
    time.sleep(30)
    elapsed = time.monotonic() - t0
    per_s = (redis_commands(redis) - commands0) / elapsed
    net = [
        (after - before) / elapsed / 1024
        for before, after in zip(net0, redis_net(redis), strict=True)
    ]
    run_.note(f"  Redis network: {net[0]:.1f} KB/s in, {net[1]:.1f} KB/s out")
    for hub in (a, b):
        if hub.proc is not None:
            share = (hub.proc.cpu() - hub_cpu0[hub.name]) / elapsed
            run_.note(f"  {hub.name} CPU while idle: {share * 100:.1f} % of one core")
    redis_share = (redis_cpu(redis) - cpu0) / elapsed
    per_agent = (redis_memory(redis) - memory0) / agents
    run_.target("Redis memory per agent", round(per_agent), 1024, "B")
    run_.target(
        f"Redis commands/s, {agents} idle agents, 15 s heartbeats", round(per_s, 1), 300, "/s"
    )
    run_.note(f"  Redis CPU: {redis_share * 100:.2f} % of one core")
    hub_kb = {}
    for hub, count in ((a, half), (b, agents - half)):
        grown = (rss_mb(hub.proc) - rss0[hub.name]) * 1024
        hub_kb[hub.name] = grown / count
        # Every hub keeps a record of every agent of the fleet (consoles on any hub see all).
        run_.note(f"  {hub.name}: {grown / agents:.2f} KB per agent of the whole fleet")
        run_.target(
            f"{hub.name} memory per agent ({count} held)", round(hub_kb[hub.name], 2), 10, "KB"
        )
    run_.stop()
    single = run_.hub("single")
    token = single.token("--enroll")
    time.sleep(3)
    base = rss_mb(single.proc)
    run_.fleet(single.url, token, half, "is")
    wait_until(lambda: single.online() >= half, timeout=120, interval=0.5, what="single online")
    time.sleep(20)
    assert single.proc is not None
    cpu0, t0 = single.proc.cpu(), time.monotonic()
    time.sleep(15)
    share = (single.proc.cpu() - cpu0) / (time.monotonic() - t0)
    run_.note(f"  single hub CPU while idle ({half} held): {share * 100:.1f} % of one core")
    kb = (rss_mb(single.proc) - base) * 1024 / half
    run_.note(f"  single hub (SQLite) memory per agent ({half} held): {kb:.2f} KB")
    run_.stop()


# -- (ii) registrations and heartbeats per CPU-second ------------------------------------


def rates(run_: Run, count: int) -> None:
    run_.note(f"rates: {count} registrations, then 400 agents' heartbeats at 4,000/s for 15 s")
    figures: dict[str, dict[str, float]] = {}
    for kind in ("single", "cluster"):
        redis = run_.redis_server("redis-rates") if kind == "cluster" else None
        hub = run_.hub(f"rate-{kind}", redis)
        token = cluster_token(redis, "--enroll") if redis is not None else hub.token("--enroll")
        registrations = blast(run_, hub, token, count, 1, 1, f"reg-{kind}", rekey=True)
        heartbeats = blast(run_, hub, token, 400, 4000, 15, f"hb-{kind}")
        figures[kind] = {**registrations, **heartbeats}
        run_.note(f"  {kind}: {figures[kind]}")
        run_.stop()
    for name in ("enroll_per_s", "key_per_s", "heartbeats_per_cpu_s"):
        ratio = figures["cluster"][name] / figures["single"][name]
        run_.target(
            f"{name}: cluster {figures['cluster'][name]:.0f} / single "
            f"{figures['single'][name]:.0f}",
            round(ratio, 2), 0.8, "×", most=False,
        )  # fmt: skip


def blast(run_: Run, hub: Hub, token: str, count: int, rate: float, seconds: float, tag: str,
          rekey: bool = False) -> dict[str, float]:  # fmt: skip
    blaster = Proc(
        tag,
        [PYTHON, str(ROOT / "bench" / "blaster.py"), "--url", hub.url, "--token", token,
         "--count", str(count), "--rate", str(rate), "--seconds", str(seconds),
         "--prefix", f"{tag}-", *(["--rekey"] if rekey else [])],
        run_.workdir / f"{tag}.log",
    ).start()  # fmt: skip
    run_.procs.append(blaster)
    per_s = r'"seconds":[\d.]+,"per_s":([\d.]+)'
    if rekey:
        first = blaster.wait_for_line(r'"registered":\d+,' + per_s, 240)
        again = blaster.wait_for_line(r'"reregistered":\d+,' + per_s, 240)
        blaster.stop()
        return {"enroll_per_s": float(first.group(1)), "key_per_s": float(again.group(1))}
    blaster.wait_for_line(r'"registered":\d+', 120)
    assert hub.proc is not None
    cpu0 = hub.proc.cpu()
    done = blaster.wait_for_line(r'"sent":(\d+),"seconds":([\d.]+)', seconds + 120)
    cpu = hub.proc.cpu() - cpu0
    blaster.stop()
    return {"heartbeats_per_s": int(done.group(1)) / float(done.group(2)),
            "heartbeats_per_cpu_s": int(done.group(1)) / cpu}  # fmt: skip


# -- (iii) the command round trip across hubs --------------------------------------------


def rtt(run_: Run, samples: int) -> None:
    agents = 50
    run_.note(f"rtt: {samples} pings, console on hub A, {agents} agents on hub B")
    medians: dict[str, float] = {}
    single = run_.hub("rtt-single")
    run_.fleet(single.url, single.token("--enroll"), agents, "rs")
    wait_until(lambda: single.online() >= agents, timeout=60, what="single online")
    operator = single.token("--admin", "--role", "operator")
    time.sleep(2)
    rtts, _ = run(hub_latency(single.url, operator, agents, samples))
    medians["single"] = report_rtt(run_, "single hub (SQLite)", rtts, None)
    run_.stop()
    for fsync in ("always", "everysec"):
        redis = run_.redis_server(f"redis-rtt-{fsync}", appendfsync=fsync)
        a = run_.hub("hub-a", redis)
        b = run_.hub("hub-b", redis)
        run_.fleet(b.url, cluster_token(redis, "--enroll"), agents, f"r{fsync[0]}")
        wait_until(lambda a=a: a.online() >= agents, timeout=60, what="cluster online")
        time.sleep(2)
        operator = cluster_token(redis, "--admin", "--role", "operator")
        rtts, _ = run(hub_latency(a.url, operator, agents, samples))
        median = report_rtt(run_, f"cluster, appendfsync {fsync}", rtts, 5.0)
        run_.target(
            f"median − single hub's ({fsync})", round(median - medians["single"], 2), 1.0, "ms"
        )
        run_.stop()


def report_rtt(run_: Run, label: str, rtts: list[float], p99_limit: float | None) -> float:
    ms = sorted(x * 1000 for x in rtts)
    median, p99 = statistics.median(ms), percentile(ms, 99)
    run_.note(f"  {label}: median {median:.2f} ms, p99 {p99:.2f} ms, max {ms[-1]:.2f} ms")
    if p99_limit is not None:
        run_.target(f"p99 ({label})", round(p99, 2), p99_limit, "ms")
    return median


# -- (iv) kill -9 of a hub holding 5,000 agents -------------------------------------------


async def fleet_state(url: str, token: str) -> dict[str, dict[str, Any]]:
    client = await AdminClient(url, token).open()
    try:
        agents = (await client.request("agents", limit=100_000))["agents"]
    finally:
        await client.close()
    return {agent["agent_id"]: agent for agent in agents}


async def admin_call(url: str, token: str, action: str, **fields: Any) -> Any:
    client = await AdminClient(url, token).open()
    try:
        return await client.request(action, **fields)
    finally:
        await client.close()


def all_online_on(url: str, token: str, count: int, hub_id: str | None) -> bool:
    try:
        fleet = run(fleet_state(url, token))
    except (AdminError, OSError):
        return False
    online = [
        a for a in fleet.values()
        if a["state"] == "online" and (hub_id is None or a["hub_id"] == hub_id)
    ]  # fmt: skip
    return len(online) >= count


def job_done(url: str, token: str, job_id: str) -> dict[str, Any] | None:
    try:
        detail = run(admin_call(url, token, "job", job_id=job_id))
    except (AdminError, OSError):
        return None
    return detail if detail["job"]["state"] != "running" else None


def wait_job(
    url: str, token: str, job_id: str, timeout: float, interval: float, what: str
) -> tuple[dict[str, Any], float]:
    """Poll until the job has finished: its detail, and the seconds it took."""
    found: list[dict[str, Any]] = []

    def finished() -> bool:
        detail = job_done(url, token, job_id)
        if detail is not None:
            found.append(detail)
        return detail is not None

    seconds = wait_until(finished, timeout=timeout, interval=interval, what=what)
    return found[-1], seconds


def once_each(run_: Run, detail: dict[str, Any], count: int, label: str) -> bool:
    """Every command of the job finished, one per agent, each succeeded once."""
    commands = detail["commands"]
    agents = {c["agent_id"] for c in commands}
    ids = {c["command_id"] for c in commands}
    succeeded = sum(1 for c in commands if c["state"] == "succeeded")
    ok = (
        detail["job"]["state"] == "succeeded"
        and len(commands) == len(ids) == len(agents) == succeeded == count
        and detail["job"]["counts"] == {"succeeded": count}
    )
    run_.note(
        f"  {label}: job {detail['job']['state']}, counts {detail['job']['counts']}, "
        f"{len(ids)} commands to {len(agents)} agents, {succeeded} succeeded: "
        f"{'every command once: met' if ok else 'NOT met'}"
    )
    return ok


def at_kill(run_: Run, url: str, token: str, job_id: str) -> None:
    """How far the job got when the fault struck (it must be mid-job)."""
    summary = run(admin_call(url, token, "jobs", filter={"job_id": job_id}))["jobs"][0]
    run_.note(f"  when the fault struck: job {summary['state']}, counts {summary['counts']}")


def kill(run_: Run, agents: int) -> None:
    run_.note(f"kill: kill -9 of the hub holding {agents} agents (and leading), mid-job")
    redis = run_.redis_server("redis-kill", appendfsync="always")
    a = run_.hub("hub-a", redis)  # first: it leads
    b = run_.hub("hub-b", redis)
    operator = cluster_token(redis, "--admin", "--role", "operator")
    run_.fleet(a.url, cluster_token(redis, "--enroll"), agents, "k", b.url)
    wait_until(lambda: all_online_on(b.url, operator, agents, "hub-a"), timeout=180, interval=1,
               what="all on hub-a")  # fmt: skip
    time.sleep(3)
    job = run(admin_call(b.url, operator, "dispatch", target={"selector": {"agent_id": "k-*"}},
                         name="sysinfo", max_concurrency=25, reply_timeout=120))  # fmt: skip
    time.sleep(0.5)
    at_kill(run_, b.url, operator, job["job_id"])
    assert a.proc is not None and a.proc.process is not None
    a.proc.process.kill()
    killed = time.monotonic()
    online = wait_until(lambda: all_online_on(b.url, operator, agents, "hub-b"), timeout=120,
                        interval=0.25, what="all on hub-b")  # fmt: skip
    detail, _ = wait_job(b.url, operator, job["job_id"], 120, 0.25, "job finished")
    done = time.monotonic() - killed
    run_.note(
        f"  all {agents} online on hub-b {online:.1f} s after the kill; "
        f"job finished {done:.1f} s after"
    )
    once_each(run_, detail, agents, "cluster")
    run_.target(
        "kill -9 → all online elsewhere and the job finished", round(max(online, done), 1), 20, "s"
    )
    run_.stop()
    # The single hub: killed the same way and started again at once on its port.
    single = run_.hub("kill-single")
    operator = single.token("--admin", "--role", "operator")
    run_.fleet(single.url, single.token("--enroll"), agents, "ks")
    wait_until(lambda: single.online() >= agents, timeout=180, interval=1, what="single online")
    time.sleep(3)
    job = run(admin_call(single.url, operator, "dispatch", target={"selector": {"agent_id": "ks*"}},
                         name="sysinfo", max_concurrency=25, reply_timeout=120))  # fmt: skip
    time.sleep(0.5)
    at_kill(run_, single.url, operator, job["job_id"])
    assert single.proc is not None and single.proc.process is not None
    single.proc.process.kill()
    killed = time.monotonic()
    single.proc.process.wait(10)
    single.start()
    assert single.proc is not None
    run_.procs.append(single.proc)
    online = wait_until(lambda: single.online() >= agents, timeout=120, interval=0.25, what="back")
    detail, _ = wait_job(single.url, operator, job["job_id"], 120, 0.25, "single job finished")
    done = time.monotonic() - killed
    run_.note(
        f"  single hub restarted at once: all {agents} back {online:.1f} s after the kill; "
        f"job finished {done:.1f} s after"
    )
    once_each(run_, detail, agents, "single")
    run_.stop()


# -- (v) Redis stopped for 10 s mid-job ----------------------------------------------------


def redis_outage(run_: Run, agents: int) -> None:
    run_.note(f"redis: Redis stopped 10 s during a job to {agents} agents on two hubs (AOF always)")
    redis = run_.redis_server("redis-outage", appendfsync="always")
    a = run_.hub("hub-a", redis)
    b = run_.hub("hub-b", redis)
    operator = cluster_token(redis, "--admin", "--role", "operator")
    enroll = cluster_token(redis, "--enroll")
    run_.fleet(a.url, enroll, agents // 2, "oa")
    run_.fleet(b.url, enroll, agents - agents // 2, "ob")
    wait_until(lambda: all_online_on(a.url, operator, agents, None), timeout=180, interval=1,
               what="all online")  # fmt: skip
    time.sleep(3)
    job = run(admin_call(a.url, operator, "dispatch", target={"selector": {"agent_id": "o*"}},
                         name="sysinfo", max_concurrency=25, reply_timeout=300))  # fmt: skip
    time.sleep(0.5)
    at_kill(run_, a.url, operator, job["job_id"])
    redis.stop()
    stopped = time.monotonic()
    wait_until(lambda: not ready(a) and not ready(b), timeout=10, interval=0.1, what="not ready")
    time.sleep(max(0.0, 10 - (time.monotonic() - stopped)))
    redis.start()  # returns once Redis answers PING
    answered = time.monotonic()
    times = {}
    pending = {a.name: a, b.name: b}
    while pending and time.monotonic() - answered < 60:
        for name, hub in list(pending.items()):
            if ready(hub):
                times[name] = time.monotonic() - answered
                del pending[name]
        time.sleep(0.05)
    for name in (a.name, b.name):
        run_.target(f"{name} ready after Redis answers", round(times.get(name, 99.0), 2), 5, "s")
    detail, seconds = wait_job(a.url, operator, job["job_id"], 180, 0.5, "job finished")
    run_.note(f"  job finished {seconds:.1f} s after both hubs were ready")
    once_each(run_, detail, agents, "cluster")
    run_.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", required=True, choices=["idle", "rates", "rtt", "kill", "redis"])
    parser.add_argument("--agents", type=int, default=0, help="fleet size (idle, kill, redis)")
    parser.add_argument("--samples", type=int, default=300, help="round trips (rtt)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tether-cluster-bench-"))
    run_ = Run(workdir)
    load = os.getloadavg()
    run_.note(
        f"bench/cluster.py --only {args.only}: load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    started = time.monotonic()
    try:
        if args.only == "idle":
            idle(run_, args.agents or 19_000)
        elif args.only == "rates":
            rates(run_, args.agents or 5_000)
        elif args.only == "rtt":
            rtt(run_, args.samples)
        elif args.only == "kill":
            kill(run_, args.agents or 5_000)
        else:
            redis_outage(run_, args.agents or 5_000)
    finally:
        run_.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        load = os.getloadavg()
        run_.note(
            f"done in {time.monotonic() - started:.0f} s; "
            f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        )


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
