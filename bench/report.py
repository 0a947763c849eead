"""Render bench/run.py results as the "Hub" section of bench/RESULTS.md.

    python bench/report.py [bench/results/results-….json ...]    # default: the newest

Several files may be given (a full run, then reruns of single scenarios): their figures are
merged, later files winning, and every command is listed.

The section sits between marker comments so the console's section (written by
bench/console_bench.py) and notes written by hand around it are kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN = "<!-- hub results: begin (bench/report.py) -->"
END = "<!-- hub results: end -->"


def _get(results: dict[str, Any], key: str) -> Any:
    return results.get(key)


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        text = f"{value:,.3g}" if abs(value) < 10 else f"{value:,.0f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text}{unit}"


def _ratio(hub: Any, floor: Any) -> str:
    if not isinstance(hub, (int, float)) or not isinstance(floor, (int, float)) or not floor:
        return "—"
    return f"{hub / floor:.2f}×"


def _verdict(ok: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "—"}[ok]


def render(report: dict[str, Any]) -> str:
    r = report["results"]
    machine = report["machine"]
    runs = "; ".join(
        f"`{run['command']}` ({run['when']}, {run['seconds']} s)" for run in report["runs"]
    )
    lines = [
        BEGIN,
        "## Hub",
        "",
        f"{runs}. Machine: "
        f"{machine['cpus']} cores ({machine['cpu']}), {machine['memory_gb']} GiB, "
        f"Python {machine['python']}, websockets {machine['websockets']}, "
        f"Linux {machine['kernel']}{_speed(machine)}. The hub (`tether-hub serve`, uvloop, "
        "SQLite store with "
        "`synchronous=FULL`) and the floor (`bench/floor.py`: the websockets library's own "
        "asyncio server, uvloop, compression off, answering the same clients) run as their "
        "own processes; the load for both comes from the same lean raw-socket agents "
        "(`bench/leanfleet.py` over `bench/lean.py`, two processes or more, each dialing from "
        "four loopback addresses; `bench/blaster.py` for heartbeat throughput) on the same "
        "two cores.",
        "",
        "| figure | target | hub | floor | hub / floor | |",
        "|---|---|---|---|---|---|",
    ]
    for count in (1_000, 5_000, 10_000, 19_000):
        hub = _get(r, f"hub.memory_per_agent_kb.{count}")
        if hub is None:
            continue
        floor = _get(r, f"floor.memory_per_agent_kb.{count}")
        lines.append(
            f"| memory per idle registered agent, {count:,} agents | ≤ 10 KB | "
            f"{_fmt(hub, ' KB')} | {_fmt(floor, ' KB')} | {_ratio(hub, floor)} | "
            f"{_verdict(hub <= 10)} |"
        )
    for count in (5_000, 10_000, 19_000):
        cpu = _get(r, f"hub.idle_cpu_share.{count}")
        if cpu is not None:
            floor = _get(r, f"floor.idle_cpu_share.{count}")
            ok = cpu < 0.10 if count <= 10_000 else None
            lines.append(
                f"| CPU with {count:,} idle agents (heartbeats every 15 s) | < 10 % of a core "
                f"at 10,000 | {_fmt(cpu * 100, ' %')} | "
                f"{_fmt(floor * 100 if floor is not None else None, ' %')} | "
                f"{_ratio(cpu, floor)} | {_verdict(ok)} |"
            )
    hold = _get(r, "hub.hold_agents")
    if hold is not None:
        held = _get(r, "hub.hold_lowest_online") == hold and _get(r, "hub.hold_disconnects") == 0
        lines.append(
            f"| agents held for {_fmt(_get(r, 'hub.hold_seconds'))} s | 19,000 for 600 s | "
            f"{_fmt(hold)} (lowest online {_fmt(_get(r, 'hub.hold_lowest_online'))}, "
            f"{_fmt(_get(r, 'hub.hold_disconnects'))} disconnects, CPU "
            f"{_fmt(_get(r, 'hub.hold_cpu_share') * 100, ' %')}, peak RSS "
            f"{_fmt(_get(r, 'hub.hold_peak_rss_mb'), ' MB')}) | | | "
            f"{_verdict(held and hold >= 19_000)} |"
        )
    for label, what in (("key", "by issued agent key"), ("enrollment", "by enrollment key")):
        reg = _get(r, f"hub.registrations_per_s.{label}")
        if reg is None:
            continue
        floor = _get(
            r,
            "floor.registrations_per_s.key"
            if label == "key"
            else "floor.registrations_per_s.first",
        )
        refused = _get(r, "hub.registrations_refused")
        note = f" ({_fmt(refused)} 503s from admission, retried, both phases)" if refused else ""
        lines.append(
            f"| registrations per second with authentication, {what} | ≥ 1,500/s | "
            f"{_fmt(reg, '/s')}{note if label == 'key' else ''} | {_fmt(floor, '/s')} (no auth) "
            f"| {_ratio(reg, floor)} | {_verdict(reg >= 1500)} |"
        )
    storm = _get(r, "hub.storm_seconds_all_back")
    if storm is not None:
        lines.append(
            f"| reconnect storm after a hub restart (SIGTERM, agents spread over 10 s) | all "
            f"back within 15 s | {storm:.1f} s from restart "
            f"({_fmt(_get(r, 'hub.storm_seconds_to_ready'), ' s')} until its /readyz answered), "
            f"the SIGTERM before it exit {_get(r, 'hub.sigterm_exit_code')} in "
            f"{_fmt(_get(r, 'hub.sigterm_seconds'), ' s')}, refusals "
            f"{_get(r, 'hub.storm_refusals') or 'none'} | | | "
            f"{_verdict(storm <= 15)} |"
        )
    for size in (1_000, 5_000, 10_000):
        p50 = _get(r, f"hub.rtt_p50_ms.{size}")
        if p50 is None:
            continue
        p99 = _get(r, f"hub.rtt_p99_ms.{size}")
        f50 = _get(r, f"floor.rtt_p50_ms.{size}")
        f99 = _get(r, f"floor.rtt_p99_ms.{size}")
        lines.append(
            f"| command round trip console → hub → agent → hub → console, {size:,} agents "
            f"(p50 / p99) | ≤ 1 / ≤ 5 ms | {_fmt(p50)} / {_fmt(p99)} ms | {_fmt(f50)} / "
            f"{_fmt(f99)} ms | {_ratio(p50, f50)} / {_ratio(p99, f99)} | "
            f"{_verdict(p50 <= 1 and p99 <= 5)} |"
        )
        n50 = _get(r, f"hub_normal.rtt_p50_ms.{size}")
        if n50 is not None:
            n99 = _get(r, f"hub_normal.rtt_p99_ms.{size}")
            lines.append(
                f'| the same with `store_synchronous = "normal"` (survives a hub crash, not a '
                f"machine crash), {size:,} agents (p50 / p99) | ≤ 1 / ≤ 5 ms | {_fmt(n50)} / "
                f"{_fmt(n99)} ms | {_fmt(f50)} / {_fmt(f99)} ms | {_ratio(n50, f50)} / "
                f"{_ratio(n99, f99)} | {_verdict(n50 <= 1 and n99 <= 5)} |"
            )
    flush = _get(r, "disk.fdatasync_us")
    f50 = _get(r, "floor.rtt_p50_ms.1000")
    if flush is not None and f50 is not None:
        lines.append(
            _lower_bound(
                f"the disk allows FULL: the floor's p50 plus two `fdatasync`s of one 4 KiB page "
                f"({_fmt(flush)} µs each, measured in the same run)",
                2 * flush,
                f50,
            )
        )
    for synchronous, label in (("full", "FULL"), ("normal", "NORMAL")):
        both = _get(r, f"store_{synchronous}.both_us")
        if both is None or f50 is None:
            continue
        queued = _get(r, f"store_{synchronous}.queued_us")
        result = _get(r, f"store_{synchronous}.result_us")
        lines.append(
            _lower_bound(
                f"the store allows {label}: the floor's p50 plus the round trip's two commits "
                f"timed alone through the store, no hub ({_fmt(queued)} + {_fmt(result)} µs, "
                "`bench/store_commits.py`)",
                both,
                f50,
            )
        )
    for size in (5_000, 10_000):
        job = _get(r, f"hub.job_all_results_s.{size}")
        if job is None:
            continue
        floor = _get(r, f"floor.job_all_results_s.{size}")
        ok = job <= 1.5 if size == 10_000 else None
        lines.append(
            f"| one job to {size:,} agents until every result is stored | ≤ 1.5 s at 10,000 | "
            f"{_fmt(job, ' s')} | {_fmt(floor, ' s')} (broadcast) | {_ratio(job, floor)} | "
            f"{_verdict(ok)} |"
        )
        normal = _get(r, f"hub_normal.job_all_results_s.{size}")
        if normal is not None:
            lines.append(
                f'| the same with `store_synchronous = "normal"`, {size:,} agents | ≤ 1.5 s at '
                f"10,000 | {_fmt(normal, ' s')} | {_fmt(floor, ' s')} (broadcast) | "
                f"{_ratio(normal, floor)} | {_verdict(normal <= 1.5 if size == 10_000 else None)} |"
            )
    rate = _get(r, "hub.messages_per_cpu_s")
    if rate is not None:
        floor = _get(r, "floor.messages_per_cpu_s")
        lines.append(
            f"| heartbeats per CPU-second (one core) | ≥ 20,000 | {_fmt(rate, '/s')} | "
            f"{_fmt(floor, '/s')} | {_ratio(rate, floor)} | {_verdict(rate >= 20_000)} |"
        )
    # Both hubs' stalls: the one with synchronous=NORMAL is the same hub.
    stalls = {
        key: value
        for key, value in r.items()
        if key.startswith(("hub.", "hub_normal.")) and "lag_max_ms" in key
    }
    steady = {key: value for key, value in stalls.items() if "steady" in key}
    bursts = {key: value for key, value in stalls.items() if "steady" not in key}
    for key, worst in sorted(steady.items()):
        # hub.steady_lag_max_ms.hold10000 (older runs: .hold, measured with 10,000 agents)
        agents = key.rpartition("hold")[2] or "10000"
        lines.append(
            f"| longest event-loop stall in steady state ({int(agents):,} agents "
            f"heartbeating, a minute after the connect burst) | ≤ 50 ms at 10,000 | "
            f"{_fmt(worst, ' ms')} | | | {_verdict(worst <= 50)} |"
        )
    at_10k = [v for k, v in bursts.items() if "10000" in k]
    if at_10k:
        worst = max(at_10k)
        floor_10k = _get(r, "floor.lag_max_ms.10000")
        lines.append(
            f"| longest event-loop stall at 10,000 agents, bursts included (connecting at "
            f"1,000/s, one job to all) | ≤ 50 ms | {_fmt(worst, ' ms')} | "
            f"{_fmt(floor_10k, ' ms')} | {_ratio(worst, floor_10k)} | "
            f"{_verdict(worst <= 50)} |"
        )
    met = targets(r)
    if met:
        lines += [
            "",
            "Against the floor in the same run (issue 16):",
            "",
            "| figure | target | hub vs floor | |",
            "|---|---|---|---|",
        ]
        lines += [f"| {what} | {target} | {figures} | {_verdict(ok)} |" for what, target,
                  figures, ok in met]  # fmt: skip
    clients = {k: v for k, v in r.items() if k.startswith("clients.cpu_share.")}
    if clients:
        lines += [
            "",
            "What the clients (`bench/leanfleet.py`, two processes or more) used, as a share "
            "of one core over each phase: "
            + ", ".join(
                f"`{k.removeprefix('clients.cpu_share.')}` {v}" for k, v in sorted(clients.items())
            )
            + ".",
        ]
    lines += [
        "",
        "Every stall figure, in milliseconds, by phase (the maximum since that hub process "
        "started): " + ", ".join(f"`{k}` {v}" for k, v in sorted(stalls.items())) + ".",
        "",
        END,
    ]
    return "\n".join(lines)


def targets(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """Issue 16's targets, each against the floor measured in the same run: (what, target,
    figures, met). Only those whose figures the run has."""
    rows: list[tuple[str, str, str, bool | None]] = []

    def ratio_row(what: str, hub: Any, floor: Any, limit: float, at_most: bool = True) -> None:
        if not isinstance(hub, (int, float)) or not isinstance(floor, (int, float)) or not floor:
            return
        sign = "≤" if at_most else "≥"
        ok = hub <= limit * floor if at_most else hub >= limit * floor
        rows.append((what, f"{sign} {limit:g}× floor", f"{_fmt(hub)} vs {_fmt(floor)} "
                     f"({hub / floor:.2f}×)", ok))  # fmt: skip

    for how, label in (("kill", "kill -9"), ("sigterm", "SIGTERM")):
        ratio_row(
            f"every agent back after the server is stopped ({label}) and restarted at once, s",
            _get(r, f"hub.storm_{how}_seconds_all_back"),
            _get(r, f"floor.storm_{how}_seconds_all_back"),
            1.5,
        )
    again = _get(r, "hub.storm_kill_cpu_ms_per_agent")
    steady = [v for k, v in r.items() if k.startswith("hub.registration_cpu_ms.key.")]
    if isinstance(again, (int, float)) and steady:
        rows.append((
            "hub CPU per re-registration after kill -9 (restart included), ms",
            "≤ a registration by key in steady state",
            f"{_fmt(again)} vs {_fmt(max(steady))}",
            again <= max(steady),
        ))  # fmt: skip
    for size in (5_000, 10_000):
        ratio_row(
            f"one job to {size:,} agents until every result is stored (floor: broadcast "
            "until every reply), s",
            _get(r, f"hub.job_all_results_s.{size}"),
            _get(r, f"floor.job_all_results_s.{size}"),
            1.5,
        )
    for size in (1_000, 5_000, 10_000):
        for hub_label, floor_label in (("enrollment", "first"), ("key", "key")):
            ratio_row(
                f"registrations a second with authentication by {hub_label}, {size:,} agents "
                "(floor: none)",
                _get(r, f"hub.registrations_per_s.{hub_label}.{size}"),
                _get(r, f"floor.registrations_per_s.{floor_label}.{size}"),
                0.9,
                at_most=False,
            )
    commits = _get(r, "store_full.both_us")
    for size in (1_000, 5_000, 10_000):
        p50 = _get(r, f"hub.rtt_p50_ms.{size}")
        f50 = _get(r, f"floor.rtt_p50_ms.{size}")
        if p50 is None or f50 is None or commits is None:
            continue
        allowed = f50 + commits / 1000
        rows.append((
            f"round trip p50, {size:,} agents, ms",
            "≤ floor p50 + the two commits alone + 0.3",
            f"{_fmt(p50)} vs {_fmt(allowed)} + 0.3",
            p50 <= allowed + 0.3,
        ))  # fmt: skip
        p99 = _get(r, f"hub.rtt_p99_ms.{size}")
        if size == 10_000 and p99 is not None:
            rows.append((f"round trip p99, {size:,} agents, ms", "≤ 5", _fmt(p99), p99 <= 5))
    return rows


def _lower_bound(what: str, below_hub_us: float, floor_ms: float) -> str:
    """A row for how close to the floor any hub can get: its p50 plus what lies below."""
    bound = floor_ms + below_hub_us / 1000
    return f"| what {what} | | {_fmt(bound)} ms | {_fmt(floor_ms)} ms | | — |"


def _speed(machine: dict[str, Any]) -> str:
    loop = machine.get("python_loop_ms")
    return f", a 5M-step Python loop in {loop:g} ms (one core's speed)" if loop else ""


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several runs on the same machine; later figures win."""
    results: dict[str, Any] = {}
    for report in reports:
        command = report["command"]
        only = command.split("--only", 1)[1].split()[0] if "--only" in command else ""
        for scenario in only.split(","):
            # A rerun of a scenario supersedes an earlier run's failure of it.
            results.pop(f"error.{scenario}", None)
        results.update(report["results"])
    return {
        "runs": [
            {"command": r["command"], "when": r["when"], "seconds": r["seconds"]} for r in reports
        ],
        "machine": reports[-1]["machine"],
        "results": results,
    }


def write(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        before, _, rest = text.partition(BEGIN)
        _, _, after = rest.partition(END)
        text = before + section + after
    else:
        head, sep, tail = text.partition("\n## ")
        text = head.rstrip() + "\n\n" + section + "\n\n" + (sep.strip() + " " + tail if sep else "")
    RESULTS.write_text(text.rstrip() + "\n")


def main() -> None:
    if len(sys.argv) > 1:
        paths = [Path(arg) for arg in sys.argv[1:]]
    else:
        newest = max(
            (ROOT / "bench" / "results").glob("results-*.json"), key=lambda p: p.stat().st_mtime
        )
        paths = [newest]
    section = render(merge([json.loads(path.read_text()) for path in paths]))
    write(section)
    print(section)


if __name__ == "__main__":
    main()
