"""Where the hub's CPU goes in issue 16's three cases, sampled by py-spy from outside.

    .venv/bin/pip install py-spy        # not a dependency of Tether: for this script only
    .venv/bin/python bench/profile_hub.py --agents 10000 [--only registrations,fanout,storm]

(a) ``registrations``: 10,000 lean agents register with an enrollment key, then again with
their issued keys; (b) ``fanout``: one job to all of them until every result is stored;
(c) ``storm``: the hub killed with -9 and restarted at once, every agent dialing again
(sampled from the new process's first instruction until the last agent is welcomed).
The load is ``bench/leanfleet.py``, as in ``bench/run.py``. For each case it prints the
functions with the most CPU samples, by self time and by inclusive time (a function counted
once per sample however often it recurs), and writes the raw stacks under ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import ROOT, Hub, LeanFleet, run, wait_until
from bench.run import hub_latency

PY_SPY = Path(sys.executable).parent / "py-spy"
FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


class Sampler:
    """``py-spy record`` attached to one process, raw stacks to ``path``."""

    def __init__(self, pid: int, path: Path, rate: int = 250) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [str(PY_SPY), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
             "--nonblocking", "--output", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(0.5)  # attached

    def stop(self, rate: int = 250) -> str:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)
        return summarize(self.path, rate=rate)


def _name(frame: str) -> str:
    found = FRAME.match(frame.strip())
    if not found:
        return frame.strip()
    function, path = found.groups()
    short = path.split("/site-packages/")[-1].split("/wt-pace/")[-1].split("/lib/python3")[-1]
    return f"{function} ({short})"


def summarize(path: Path, top: int = 25, rate: int = 250) -> str:
    """Self and inclusive shares of the samples, the biggest first."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_name(f) for f in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for name in set(frames):
            inclusive[name] += int(count)
    lines = [f"{total} samples ({total / rate:.1f} CPU seconds at {rate} Hz)", "self:"]
    lines += [f"  {n * 100 / total:5.1f} %  {name}" for name, n in own.most_common(top)]
    lines.append("inclusive:")
    lines += [f"  {n * 100 / total:5.1f} %  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--only", default="registrations,fanout,storm", help="and rtt")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "profile")
    args = parser.parse_args()
    only = args.only.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tether-profile-"))
    count = args.agents
    hub = Hub(workdir, name="prof")
    (workdir / "prof.toml").write_text('[hub]\nlog_level = "WARNING"\nmax_agents = 100000\n')
    fleet: LeanFleet | None = None
    try:
        hub.start()
        token = hub.token("--enroll")
        if "registrations" in only:
            assert hub.proc is not None
            sampler = Sampler(hub.proc.pid, args.out / "registrations.txt")
            keys = str(workdir / "keys")
            for _phase in ("enrollment", "key"):
                once = LeanFleet(workdir, hub.url, token, count, "g", rate=0)
                once.start(once=True, keys=keys, start_at=time.time() + 2)
                once.wait(timeout=300)
                time.sleep(2)
            print("== registrations (enrollment, then by key)\n" + sampler.stop(), flush=True)
        fleet = LeanFleet(workdir, hub.url, token, count, "f", rate=1_000).start()
        wait_until(lambda: fleet.online() >= count, timeout=count / 500 + 60, what="online")
        time.sleep(3)
        if "fanout" in only:
            assert hub.proc is not None
            admin = hub.token("--admin", "--role", "operator")
            run(hub_latency(hub.url, admin, count, 0))  # warm: the first job's costs once
            time.sleep(2)
            sampler = Sampler(hub.proc.pid, args.out / "fanout.txt")
            _rtts, seconds = run(hub_latency(hub.url, admin, count, 0, listing=False))
            print(f"== fan-out to {count} ({seconds:.2f} s)\n" + sampler.stop(), flush=True)
        if "rtt" in only:
            assert hub.proc is not None
            admin = hub.token("--admin", "--role", "operator")
            sampler = Sampler(hub.proc.pid, args.out / "rtt.txt", rate=1000)
            rtts, _seconds = run(hub_latency(hub.url, admin, count, 3000))
            rtts.sort()
            print(f"== 3,000 round trips, p50 {rtts[1500] * 1000:.2f} ms\n" + sampler.stop(1000))
        if "storm" in only:
            assert hub.proc is not None and hub.proc.process is not None
            samplers: list[Sampler] = []
            Hub.spawned = lambda pid: samplers.append(Sampler(pid, args.out / "storm.txt"))
            welcomes = fleet.total("welcomes")
            hub.proc.process.kill()
            hub.proc.process.wait(10)
            restarted = time.time()
            hub.start()
            wait_until(
                lambda: fleet.online() >= count and fleet.total("welcomes") >= welcomes + count,
                timeout=180, interval=0.2, what="storm back",
            )  # fmt: skip
            back = max(s["last_welcome"] for s in fleet.statuses()) - restarted
            print(f"== kill -9 storm, {count} back in {back:.1f} s\n" + samplers[0].stop())
    finally:
        if fleet is not None:
            fleet.stop()
        if hub.proc is not None:
            hub.proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
