"""What TLS costs the hub, each figure beside plain ``ws://`` and the TLS floor, in one run.

    python bench/tls.py memory --counts 1000 5000      # memory, registrations/s, CPU each
    python bench/tls.py storm --count 19000            # kill -9 reconnect storm over TLS

The servers of a run, each a process of its own with a fresh state: the hub over ``wss://``
(``--tls-cert``), the hub over ``ws://``, and the TLS floor — a bare ``websockets`` server
terminating TLS with the event loop's SSL, on uvloop (as the hub runs) and on asyncio's
default loop. A trustme CA signs one ECDSA certificate for all of them.

``memory``: lean clients (bench/lean.py in its TLS mode, one process per 9,500) register
with 200 handshakes in flight per process and stay idle; then the server's RSS growth per
agent, the registrations per second, and the server's CPU per registration (its CPU time
while they came, divided by their number). ``storm``: ``tether-agent simulate`` agents over
``wss://`` (real agents: they resume TLS sessions), the server killed with SIGKILL and
started again on its port, and the seconds until every agent is back (the hub's state is
on disk; the floor keeps none).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import lean
from bench.harness import (
    PER_PROCESS,
    PYTHON,
    ROOT,
    Floor,
    Hub,
    Proc,
    simulators,
    wait_until,
)

HERE = Path(__file__).resolve()


def make_certificates(workdir: Path) -> dict[str, Path]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {name: workdir / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(files["ca"])
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    cert.private_key_pem.write_to_path(files["key"])
    return files


def client_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def fetch(url: str, context: ssl.SSLContext | None) -> bytes:
    with urllib.request.urlopen(url, timeout=30, context=context) as response:
        return response.read()


class TlsHub(Hub):
    """``tether-hub serve --tls-cert``: probed and scraped over https."""

    ca_file: Path

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        context = client_context(self.ca_file)
        wait_until(
            lambda: fetch(f"https://127.0.0.1:{self.port}/readyz", context), 30, what="readyz"
        )

    def metrics(self) -> dict[str, float]:
        text = fetch(f"https://127.0.0.1:{self.port}/metrics", client_context(self.ca_file))
        values = {}
        for line in text.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    values[name] = float(value)
        return values


class TlsFloor(Floor):
    """bench/floor.py terminating TLS, on uvloop or on asyncio's loop."""

    def __init__(self, workdir: Path, files: dict[str, Path], loop: str) -> None:
        super().__init__(workdir)
        self.files = files
        self.loop = loop

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def start(self) -> TlsFloor:
        extra = ["--asyncio"] if self.loop == "asyncio" else []
        self.proc = Proc(
            f"floor-{self.loop}",
            [PYTHON, str(ROOT / "bench" / "floor.py"), "--listen", f"127.0.0.1:{self.port}",
             "--tls-cert", str(self.files["cert"]), "--tls-key", str(self.files["key"]), *extra],
            self.workdir / f"floor-{self.loop}.log",
        ).start()  # fmt: skip
        self.port = int(self.proc.wait_for_line(r"floor listening on (\d+)").group(1))
        return self

    def stats(self) -> dict[str, Any]:
        context = client_context(self.files["ca"])
        return json.loads(fetch(f"https://127.0.0.1:{self.port}/stats", context))


class Run:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.files = make_certificates(workdir)
        self.results: dict[str, Any] = {}
        self.started: list[Proc] = []

    def note(self, key: str, value: Any) -> None:
        self.results[key] = value
        print(f"  {key}: {value}", flush=True)

    def server(self, kind: str, name: str) -> Hub | Floor:
        if kind.startswith("floor-"):
            floor: Floor = TlsFloor(self.workdir, self.files, kind.removeprefix("floor-")).start()
        elif kind == "hub-tls":
            hub = TlsHub(self.workdir, name=name, extra=self._tls_flags())
            hub.ca_file = self.files["ca"]
            floor = hub.start()  # type: ignore[assignment]
        else:
            floor = Hub(self.workdir, name=name).start()  # type: ignore[assignment]
        assert floor.proc is not None
        self.started.append(floor.proc)
        return floor

    def _tls_flags(self) -> list[str]:
        return ["--tls-cert", str(self.files["cert"]), "--tls-key", str(self.files["key"])]

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
        self.started.clear()

    # -- memory, registrations and their CPU -------------------------------------------------

    def memory(self, counts: list[int], kinds: list[str]) -> None:
        for count in counts:
            for kind in kinds:
                print(f"memory: {kind} with {count} idle registered agents", flush=True)
                try:
                    self._memory(kind, count)
                finally:
                    self.stop_all()

    def _memory(self, kind: str, count: int) -> None:
        server = self.server(kind, f"{kind}-{count}")
        assert server.proc is not None
        token = server.token("--enroll") if isinstance(server, Hub) else "x"
        time.sleep(2)
        baseline, cpu0 = server.proc.rss(), server.proc.cpu()
        holders = []
        start = 0
        while start < count:
            n = min(PER_PROCESS, count - start)
            args = ["--url", server.url, "--token", token, "--count", str(n)]
            args += ["--prefix", f"m{start}-", "--ca", str(self.files["ca"])]
            log = self.workdir / f"hold-{kind}-{count}-{start}.log"
            holders.append(Proc(f"hold{start}", [PYTHON, str(HERE), "hold", *args], log).start())
            start += n
        self.started.extend(holders)
        seconds = 0.0
        for holder in holders:
            line = holder.wait_for_line(r'\{"registered":\d+,"seconds":([\d.]+)', 280)
            seconds = max(seconds, float(line.group(1)))
        cpu = server.proc.cpu() - cpu0
        time.sleep(5)
        per_agent = (server.proc.rss() - baseline) / count
        self.note(f"{kind}.memory_per_agent_kb.{count}", round(per_agent / 1024, 2))
        self.note(f"{kind}.registrations_per_s.{count}", round(count / seconds))
        self.note(f"{kind}.cpu_ms_per_registration.{count}", round(cpu / count * 1000, 3))

    # -- the reconnect storm -----------------------------------------------------------------

    def storm(self, count: int, kinds: list[str], rate: float) -> None:
        for kind in kinds:
            print(f"storm: {kind}, {count} simulated agents over wss://, kill -9", flush=True)
            try:
                self._storm(kind, count, rate)
            finally:
                self.stop_all()

    def _storm(self, kind: str, count: int, rate: float) -> None:
        server = self.server(kind, f"storm-{kind}")
        token = server.token("--enroll") if isinstance(server, Hub) else "x"
        procs = simulators(
            self.workdir, server.url, token, count, f"s{kind}-", rate=rate, tag=f"st-{kind}-",
            extra=("--ca-file", str(self.files["ca"])),
        )  # fmt: skip
        self.started.extend(procs)
        connected = wait_until(
            lambda: server.online() >= count, timeout=240, interval=0.5, what="fleet online"
        )
        self.note(f"{kind}.storm_fleet_connect_seconds", round(connected, 1))
        time.sleep(3)
        assert server.proc is not None
        server.proc.signal(9)
        server.proc.process.wait(10)  # type: ignore[union-attr]
        restarted = time.monotonic()
        server.start()  # on its port again (the hub returns once /readyz answers)
        ready = time.monotonic() - restarted
        try:
            back = wait_until(
                lambda: server.online() >= count, timeout=240, interval=0.25, what="back"
            )
            self.note(f"{kind}.storm_seconds_all_back", round(back + ready, 2))
        except TimeoutError:
            self.note(f"{kind}.storm_back_after_240_s", f"{server.online()}/{count}")
        self.note(f"{kind}.storm_seconds_to_listen", round(ready, 2))
        if isinstance(server, Hub):
            metrics = server.metrics()
            refused = {
                name.split('"')[1]: int(value)
                for name, value in metrics.items()
                if name.startswith("tether_connections_total") and "accepted" not in name
            }
            self.note(f"{kind}.storm_refusals", refused)


# -- where a TLS connection's memory goes -------------------------------------------------------


class _Answer(asyncio.Protocol):
    """A connection that answers its first bytes once and then idles, as an agent's does."""

    count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + b"w" * 200)  # type: ignore[attr-defined]
        _Answer.count += 1


def _in_use() -> int:
    """Bytes malloc has handed out (OpenSSL's allocations included; tracemalloc sees
    only Python's)."""
    import ctypes

    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


async def breakdown_server(args: argparse.Namespace) -> None:
    """Serve ``count`` connections in ``mode`` and print what they hold, per connection."""
    import gc
    import os
    import tracemalloc

    import psutil

    from hub.protocol.tls_layer import TlsLayer

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    context.num_tickets = 1
    loop = asyncio.get_running_loop()
    if args.mode == "layer":
        server = await loop.create_server(
            lambda: TlsLayer(_Answer(), context, server_side=True), "127.0.0.1", 0
        )
    else:
        tls = context if args.mode == "loop-ssl" else None
        server = await loop.create_server(_Answer, "127.0.0.1", 0, ssl=tls)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    gc.collect()
    tracemalloc.start()
    process = psutil.Process()
    rss0, used0 = process.memory_info().rss, _in_use()
    while _Answer.count < args.count:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    gc.collect()
    traced = sum(stat.size for stat in tracemalloc.take_snapshot().statistics("filename"))
    n = args.count
    print(
        json.dumps({
            "mode": args.mode, "loop": type(loop).__module__.split(".")[0],
            "rss_per_connection": round((process.memory_info().rss - rss0) / n),
            "malloc_per_connection": round((_in_use() - used0) / n),
            "python_objects_per_connection": round(traced / n),
        }),
        flush=True,
    )  # fmt: skip
    os._exit(0)


async def breakdown_clients(args: argparse.Namespace) -> None:
    context = client_context(Path(args.ca)) if args.mode != "plain" else None
    loop = asyncio.get_running_loop()
    semaphore = asyncio.Semaphore(100)

    async def one() -> Any:
        async with semaphore:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", args.port, ssl=context,
                server_hostname="127.0.0.1" if context else None,
            )  # fmt: skip
            writer.write(b"GET /ws HTTP/1.1\r\n" + b"h" * 300 + b"\r\n\r\n")
            await reader.readexactly(234)
            return writer

    kept = await asyncio.gather(*(one() for _ in range(args.count)))
    print(f"connected {len(kept)}", flush=True)
    await loop.create_future()


def openssl_alone(files: dict[str, Path], count: int = 2_000) -> dict[str, int]:
    """OpenSSL's own state per server-side connection, without sockets or event loops: the
    malloc bytes in use for ``count`` SSLObjects (with their two memory BIOs) at each stage,
    the client side dropped. A floor no driver of ``ssl.SSLObject`` can go below."""
    import gc

    import trustme

    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(files["cert"], files["key"])
    server.num_tickets = 1
    client = client_context(files["ca"])
    mtls_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    mtls_server.load_cert_chain(files["cert"], files["key"])
    ca.configure_trust(mtls_server)
    mtls_server.verify_mode = ssl.CERT_OPTIONAL
    mtls_client = client_context(files["ca"])
    ca.issue_cert("agent-1").configure_cert(mtls_client)

    def pair(srv: ssl.SSLContext, cli: ssl.SSLContext, stop_after_hello: bool = False) -> Any:
        si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        s = srv.wrap_bio(si, so, server_side=True)
        c = cli.wrap_bio(ci, co, server_hostname="127.0.0.1")
        for _ in range(4):
            for obj in (c, s):
                with contextlib.suppress(ssl.SSLWantReadError):
                    obj.do_handshake()
                si.write(co.read())
                ci.write(so.read())
                if stop_after_hello and obj is s:
                    return s, si, so
        c.write(b"GET /ws HTTP/1.1\r\n" + b"h" * 300 + b"\r\n\r\n")
        si.write(co.read())
        s.read(4096)
        s.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + b"w" * 200)
        ci.write(so.read())
        c.read(4096)
        return s, si, so

    stages = {
        "two_memory_bios": lambda: (ssl.MemoryBIO(), ssl.MemoryBIO()),
        "sslobject_before_handshake": lambda: server.wrap_bio(
            ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True
        ),
        "after_a_client_hello": lambda: pair(server, client, stop_after_hello=True),
        "established_idle": lambda: pair(server, client),
        "established_idle_with_client_certificate": lambda: pair(mtls_server, mtls_client),
    }
    figures = {}
    for name, make in stages.items():
        for _ in range(20):
            make()
        gc.collect()
        before = _in_use()
        kept = [make() for _ in range(count)]
        gc.collect()
        figures[name] = round((_in_use() - before) / count)
        del kept
        print(f"  OpenSSL alone, {name}: {figures[name]} B per connection", flush=True)
    return figures


def breakdown(workdir: Path, files: dict[str, Path], count: int) -> dict[str, Any]:
    results: dict[str, Any] = {"openssl_alone": openssl_alone(files)}
    for mode, loop in (("plain", "uvloop"), ("loop-ssl", "uvloop"), ("loop-ssl", "asyncio"),
                       ("layer", "uvloop")):  # fmt: skip
        common = ["--count", str(count), "--mode", mode, "--loop", loop]
        server = Proc(
            f"bd-{mode}",
            [PYTHON, str(HERE), "breakdown-server", *common, "--cert", str(files["cert"]),
             "--key", str(files["key"])],
            workdir / f"bd-{mode}-{loop}.log",
        ).start()  # fmt: skip
        try:
            port = server.wait_for_line(r"port (\d+)").group(1)
            clients = Proc(
                "bd-clients",
                [PYTHON, str(HERE), "breakdown-clients", *common, "--port", port,
                 "--ca", str(files["ca"])],
                workdir / f"bd-clients-{mode}-{loop}.log",
            ).start()  # fmt: skip
            try:
                line = server.wait_for_line(r"\{.*rss_per_connection.*\}", 120).group(0)
            finally:
                clients.stop()
        finally:
            server.stop()
        figures = json.loads(line)
        results[f"{mode}.{loop}"] = figures
        print(f"  {mode} on {loop}: {figures}", flush=True)
    return results


# -- the load process of ``memory`` ------------------------------------------------------------


async def hold(args: argparse.Namespace) -> None:
    """Register ``count`` lean agents over ``url``, report, and keep them open until killed."""
    from bench.blaster import register_all

    lean.TLS = client_context(Path(args.ca)) if args.url.startswith("wss") else None
    conns, seconds, refused = await register_all(args, [args.token] * args.count)
    print(
        json.dumps(
            {"registered": len(conns), "seconds": round(seconds, 3), "refused": refused},
            separators=(",", ":"),
        ),
        flush=True,
    )
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a fresh one")
    sub = parser.add_subparsers(dest="part", required=True)
    memory = sub.add_parser("memory")
    memory.add_argument("--counts", type=int, nargs="+", default=[1_000])
    memory.add_argument(
        "--kinds", nargs="+", default=["hub-tls", "hub-plain", "floor-uvloop", "floor-asyncio"]
    )
    storm = sub.add_parser("storm")
    storm.add_argument("--count", type=int, default=5_000)
    storm.add_argument("--kinds", nargs="+", default=["hub-tls", "floor-uvloop"])
    storm.add_argument("--rate", type=float, default=600)
    parts = sub.add_parser("breakdown")
    parts.add_argument("--count", type=int, default=2_000)
    for name in ("breakdown-server", "breakdown-clients"):
        inner = sub.add_parser(name)
        inner.add_argument("--count", type=int, required=True)
        inner.add_argument("--mode", required=True)
        inner.add_argument("--loop", default="uvloop")
        inner.add_argument("--cert")
        inner.add_argument("--key")
        inner.add_argument("--ca")
        inner.add_argument("--port", type=int)
    holder = sub.add_parser("hold")
    holder.add_argument("--url", required=True)
    holder.add_argument("--token", default="x")
    holder.add_argument("--count", type=int, required=True)
    holder.add_argument("--prefix", default="m-")
    holder.add_argument("--ca", required=True)
    args = parser.parse_args()
    inner = {"hold": hold, "breakdown-server": breakdown_server}
    inner["breakdown-clients"] = breakdown_clients
    if args.part in inner:
        from bench.harness import raise_file_limit

        raise_file_limit()
        import uvloop

        if getattr(args, "loop", "uvloop") == "asyncio" and args.part == "breakdown-server":
            asyncio.run(inner[args.part](args))
        else:
            uvloop.run(inner[args.part](args))
        return
    import os
    import tempfile

    run = Run(args.workdir or Path(tempfile.mkdtemp(prefix="tether-bench-tls-")))
    started = time.time()
    print(f"load before: {os.getloadavg()}", flush=True)
    try:
        if args.part == "memory":
            run.memory(args.counts, args.kinds)
        elif args.part == "breakdown":
            run.results.update(breakdown(run.workdir, run.files, args.count))
        else:
            run.storm(args.count, args.kinds, args.rate)
    finally:
        run.stop_all()
        print(f"load after: {os.getloadavg()}", flush=True)
        stamp = time.strftime("%H%M", time.gmtime(started))
        out = ROOT / "bench" / "results" / f"tls-{args.part}-{stamp}.json"
        summary = {"part": args.part, "load_after": os.getloadavg(), **run.results}
        out.write_text(json.dumps(summary, indent=1))
        print(f"saved {out}", flush=True)


if __name__ == "__main__":
    main()
