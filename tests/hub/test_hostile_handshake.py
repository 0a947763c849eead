"""Hostile opening handshakes, byte for byte (PROTOCOL §1–2).

Every request here is written by hand on a raw TCP socket: most of them are requests a
WebSocket library refuses to produce. Each case pins the hub's exact answer (status and
JSON body, or a drop without a byte), the audit entry and the connection counter where the
hub records the refusal, and that the hub still serves afterwards.

Decisions where PROTOCOL.md is silent (also in docs/security.md):

* Every HTTP answer of the hub other than a 101 or a health/readiness/metrics answer is a
  refusal: JSON ``{"error": code}``, ``Connection: close``, counted in
  ``tether_connections_total{result=code}`` and audited as ``connection.refused`` with the
  source address. That includes what websockets' own parser refuses (414, 431, 400, 505).
* A request the parser cannot read at all (bad request line, control characters in a
  header, a body or ``Transfer-Encoding``) is dropped without an answer — the safest reply
  to something that may be a smuggling attempt — but still counted and audited
  (``bad_request``, status null).
* The request target must be exactly ``/ws`` or ``/admin`` (a query is ignored): no
  normalisation, no percent-decoding, no absolute form.
* Frames sent before the 101 (RFC 6455 §4.1: the client MUST wait) refuse the upgrade with
  400, whether the credential was cached or looked up.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time

import pytest

from tests.conftest import HubHandle
from tests.hub.wire import (
    KEY,
    PING,
    Wire,
    assert_healthy,
    audit,
    dropped,
    frame,
    http_get,
    refused,
    text,
    upgrade_request,
)
from tests.support import FakeClock, wait_for

FRIENDLY = {"auth_failure_limit": 1000}


async def expect_refusal(
    hub: HubHandle, request: bytes, status: int, error: str, path: str | None = None
) -> dict:
    """The hub refuses ``request`` with ``status`` and ``{"error": error}``, counts it once
    and audits it with the source address. Returns the response headers."""
    before = hub.hub.metrics.connections[error]
    response = await refused(hub.hub.port, request)
    assert (response.status, response.json()) == (status, {"error": error})
    assert response.headers["content-type"] == "application/json"
    assert "sec-websocket-accept" not in response.headers
    assert hub.hub.metrics.connections[error] == before + 1
    entry = (await audit(hub, "connection.refused"))[0]
    assert entry["source"] == "127.0.0.1"
    assert (entry["detail"]["status"], entry["detail"]["error"]) == (status, error)
    if path is not None:
        assert entry["detail"]["path"] == path
    return response.headers


async def expect_drop(hub: HubHandle, request: bytes) -> dict:
    """The hub hangs up without a byte, and still counts and audits the attempt."""
    before = hub.hub.metrics.connections["bad_request"]
    await dropped(hub.hub.port, request)
    await wait_for(lambda: hub.hub.metrics.connections["bad_request"] == before + 1)
    entry = (await audit(hub, "connection.refused"))[0]
    assert entry["source"] == "127.0.0.1"
    assert (entry["detail"]["status"], entry["detail"]["error"]) == (None, "bad_request")
    return entry


# -- the request line and the header block -----------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"HELLO\r\n\r\n",
        b"GET /ws\r\n\r\n",
        b"GET /ws HTTP/2.0\r\nHost: x\r\n\r\n",
        b"GET /ws HTTP/1.1 extra\r\n\r\n",
        b"GET /w\xffs HTTP/1.1\r\nHost: x\r\n\r\n",  # non-ASCII request target
        b"\x00\x01\x02\x03\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /ws HTTP/1.1\r\n folded: header\r\n\r\n",
    ],
    ids=["word", "no-version", "http2", "four-parts", "non-ascii", "binary", "no-colon", "fold"],
)
async def test_unparseable_request_is_dropped_counted_and_audited(
    hub: HubHandle, request_bytes: bytes
) -> None:
    entry = await expect_drop(hub, request_bytes)
    assert "valid HTTP request" in entry["detail"]["reason"]
    await assert_healthy(hub)


async def test_request_line_over_8_kib_is_414(hub: HubHandle) -> None:
    await expect_refusal(hub, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long")
    await assert_healthy(hub)


@pytest.mark.parametrize("shape", ["long-line", "129-headers", "100-kb-bearer"])
async def test_header_block_too_large_is_431(hub: HubHandle, shape: str) -> None:
    token = await hub.agent_token("edge-1")
    extra = {
        "long-line": "X-Pad: " + "a" * 9000 + "\r\n",
        "129-headers": "".join(f"X-H{i}: v\r\n" for i in range(129)),
        "100-kb-bearer": "Authorization: Bearer " + "t" * 100_000 + "\r\n",
    }[shape]
    await expect_refusal(hub, upgrade_request("/ws", token, extra=extra), 431, "headers_too_large")
    await assert_healthy(hub)


@pytest.mark.parametrize(
    "key",
    [None, "abc", base64.b64encode(b"15 bytes only!!").decode(), "!!!!!!!!!!!!!!!!!!!!!!!!"],
    ids=["missing", "bad-base64", "15-bytes", "not-base64"],
)
async def test_missing_or_bad_websocket_key_is_400_after_the_credential_check(
    hub: HubHandle, key: str | None
) -> None:
    # Without a credential the §2 order answers first: 401.
    await expect_refusal(hub, upgrade_request("/ws", None, key=key), 401, "unauthorized")
    token = await hub.agent_token("edge-1")
    await expect_refusal(hub, upgrade_request("/ws", token, key=key), 400, "bad_request")
    entry = (await audit(hub, "connection.refused"))[0]
    assert "Sec-WebSocket-Key" in entry["detail"]["reason"]
    await assert_healthy(hub)


async def test_two_websocket_keys_are_400(hub: HubHandle) -> None:
    token = await hub.agent_token("edge-1")
    request = upgrade_request("/ws", token, extra=f"Sec-WebSocket-Key: {KEY}\r\n")
    await expect_refusal(hub, request, 400, "bad_request")
    await assert_healthy(hub)


@pytest.mark.parametrize("version", ["8", "14", "13, 8", None])
async def test_wrong_websocket_version_is_400_naming_version_13(
    hub: HubHandle, version: str | None
) -> None:
    # RFC 6455 §4.4: the refusal carries the version the server speaks.
    token = await hub.agent_token("edge-1")
    request = upgrade_request("/ws", token)
    replacement = b"" if version is None else f"Sec-WebSocket-Version: {version}\r\n".encode()
    request = request.replace(b"Sec-WebSocket-Version: 13\r\n", replacement)
    headers = await expect_refusal(hub, request, 400, "bad_request")
    assert headers["sec-websocket-version"] == "13"
    await assert_healthy(hub)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "CONNECT"])
@pytest.mark.parametrize("path", ["/ws", "/admin"])
async def test_other_methods_on_a_channel_are_405(hub: HubHandle, method: str, path: str) -> None:
    token = await hub.agent_token("edge-1")
    headers = await expect_refusal(
        hub, upgrade_request(path, token, method=method), 405, "method_not_allowed", path
    )
    assert headers["allow"] == "GET"


async def test_plain_get_of_a_channel_is_426_and_recorded(hub: HubHandle) -> None:
    request = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    headers = await expect_refusal(hub, request, 426, "upgrade_required", "/ws")
    assert headers["upgrade"] == "websocket"
    await assert_healthy(hub)


@pytest.mark.parametrize(
    "extra",
    [
        "Transfer-Encoding: chunked\r\n",
        "Content-Length: 5\r\n",
        "Content-Length: 0\r\nContent-Length: 7\r\n",
    ],
    ids=["chunked", "body", "two-lengths"],
)
async def test_request_with_a_body_is_dropped(hub: HubHandle, extra: str) -> None:
    # Bodies on an upgrade are a smuggling vector: no answer at all, and nothing parsed
    # from the bytes that follow.
    token = await hub.agent_token("edge-1")
    body = b"5\r\nhello\r\n0\r\n\r\n" if "chunked" in extra else b"hello"
    await expect_drop(hub, upgrade_request("/ws", token, extra=extra) + body)
    await assert_healthy(hub)


async def test_http_1_0_upgrade_is_505(hub: HubHandle) -> None:
    token = await hub.agent_token("edge-1")
    await expect_refusal(
        hub,
        upgrade_request("/ws", token, version="HTTP/1.0"),
        505,
        "http_version_not_supported",
    )
    await assert_healthy(hub)


# -- credentials -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "", "Token {token}", "{token}", "Bearer\t"],
    ids=["basic", "empty-bearer", "blank-bearer", "empty", "other-scheme", "no-scheme", "tab"],
)
async def test_malformed_authorization_is_401_with_bearer_challenge(
    hub: HubHandle, value: str
) -> None:
    token = await hub.agent_token("edge-1")
    request = upgrade_request("/ws", None, extra=f"Authorization: {value.format(token=token)}\r\n")
    headers = await expect_refusal(hub, request, 401, "unauthorized", "/ws")
    assert headers["www-authenticate"] == "Bearer"
    entry = (await audit(hub, "connection.refused"))[0]
    assert token not in str(entry), "the audit trail never holds a secret"
    await assert_healthy(hub)


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer  "])
async def test_bearer_scheme_is_case_insensitive(hub: HubHandle, scheme: str) -> None:
    # RFC 9110 §11.1: the auth scheme is case-insensitive.
    token = await hub.agent_token("edge-1")
    wire = await Wire.open(hub.hub.port)
    await wire.send(upgrade_request("/ws", None, extra=f"Authorization: {scheme} {token}\r\n"))
    assert (await wire.read_response()).status == 101
    assert (await wire.register("edge-1"))["type"] == "welcome"
    wire.abort()


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x1b", "\x7f", "\r"])
async def test_bearer_with_control_characters_is_dropped(hub: HubHandle, char: str) -> None:
    token = await hub.agent_token("edge-1")
    tampered = token[:20] + char + token[20:]
    await expect_drop(hub, upgrade_request("/ws", tampered))
    await assert_healthy(hub)


async def test_bearer_with_latin1_bytes_or_8_kb_is_401(hub_factory) -> None:
    hub = await hub_factory(**FRIENDLY)
    token = await hub.agent_token("edge-1")
    for bad in (token[:20] + "\xe9" + token[21:], "tta_" + "x" * 8000):
        started = time.monotonic()
        await expect_refusal(hub, upgrade_request("/ws", bad), 401, "unauthorized")
        assert time.monotonic() - started < 1.0
    await assert_healthy(hub)


@pytest.mark.parametrize(
    "query",
    ["token={token}", "access_token={token}", "authorization=Bearer%20{token}", "t={token}&x"],
)
async def test_token_in_the_url_never_authenticates(hub: HubHandle, query: str) -> None:
    token = await hub.agent_token("edge-1")
    request = upgrade_request("/ws?" + query.format(token=token), None)
    await expect_refusal(hub, request, 401, "unauthorized", "/ws")
    entry = (await audit(hub, "connection.refused"))[0]
    assert token not in str(entry) and token[21:] not in str(entry)
    await assert_healthy(hub)


async def test_refusal_never_says_whether_an_agent_or_key_exists(hub_factory) -> None:
    hub = await hub_factory(**FRIENDLY)
    real = await hub.agent_token("edge-1")
    other_secret = real[:17] + ("A" if real[17] != "A" else "B") + real[18:]
    candidates = [
        other_secret,  # a real key id with a wrong secret
        "tta_000000000000_" + real[17:],  # an unknown key id
        "tte_" + real[4:],  # the right id under another kind
        "ttm_" + real[4:],
    ]
    answers = set()
    for token in candidates:
        wire = await Wire.open(hub.hub.port)
        await wire.send(upgrade_request("/ws", token))
        response = await wire.read_response()
        headers = {k: v for k, v in response.headers.items() if k != "date"}
        answers.add((response.status, response.body, tuple(sorted(headers.items()))))
        await wire.close()
    assert len(answers) == 1, answers
    assert next(iter(answers))[:2] == (401, b'{"error":"unauthorized"}')


# -- paths and origins -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/ws/../admin",
        "/admin/../ws",
        "//ws",
        "/WS",
        "/Admin",
        "%2Fws",
        "/%77s",
        "/ws%00",
        "/ws/",
        "/./ws",
        "/ws;a=b",
        "/ws#frag",
        "http://127.0.0.1/ws",
        "*",
    ],
)
async def test_path_tricks_are_404_even_with_a_valid_credential(hub: HubHandle, path: str) -> None:
    token = await hub.admin_token() if "dmin" in path else await hub.agent_token("edge-1")
    await expect_refusal(hub, upgrade_request(path, token), 404, "not_found", path)
    await assert_healthy(hub)


@pytest.mark.parametrize(
    "origin",
    [
        "https://console.example/",
        "HTTPS://console.example",
        "https://console.example:443",
        "https://console.example.evil.example",
        "null",
        "https://évil.example",
        "",
    ],
)
async def test_origin_must_match_exactly(hub_factory, origin: str) -> None:
    # Cross-site WebSocket hijacking: a browser page sends the victim's cookies-free but
    # origin-stamped upgrade; only the exact configured origins pass, before credentials.
    hub = await hub_factory(allowed_origins=["https://console.example"])
    token = await hub.admin_token()
    request = upgrade_request("/admin", token, extra=f"Origin: {origin}\r\n")
    await expect_refusal(hub, request, 403, "origin_not_allowed", "/admin")
    assert hub.hub.gate.failures.cooling_down("127.0.0.1") == 0
    ok = await Wire.upgrade(
        hub.hub.port, "/admin", token, extra="Origin: https://console.example\r\n"
    )
    ok.abort()


@pytest.mark.parametrize("name", ["Origin", "Authorization"])
async def test_a_repeated_singleton_header_is_400_not_a_crash(
    hub_factory, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    hub = await hub_factory(allowed_origins=["https://console.example"])
    token = await hub.admin_token()
    # The request already carries one Authorization; the Origin pair smuggles a second
    # origin behind an allowed one.
    extra = (
        "Origin: https://console.example\r\nOrigin: https://evil.example\r\n"
        if name == "Origin"
        else f"Authorization: Bearer {token}\r\n"
    )
    request = upgrade_request("/admin", token, extra=extra)
    with caplog.at_level(logging.ERROR):
        await expect_refusal(hub, request, 400, "bad_request", "/admin")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await assert_healthy(hub)


async def test_repeated_upgrade_header_is_judged_as_one_list(hub: HubHandle) -> None:
    token = await hub.agent_token("edge-1")
    request = upgrade_request("/ws", token, extra="Upgrade: websocket\r\n")
    await expect_refusal(hub, request, 426, "upgrade_required", "/ws")


async def test_nul_in_a_header_is_dropped_and_latin1_is_data(hub_factory) -> None:
    hub = await hub_factory(allowed_origins=["https://console.example"])
    token = await hub.agent_token("edge-1")
    await expect_drop(hub, upgrade_request("/ws", token, extra="X-Trace: a\x00b\r\n"))
    # Bytes 0x80–0xFF are tolerated by HTTP as opaque data: the origin is simply unknown,
    # and the audit keeps the text as data (escaped by repr).
    request = upgrade_request("/ws", token, extra="Origin: https://\xe9\x85vil\r\n")
    await expect_refusal(hub, request, 403, "origin_not_allowed")
    entry = (await audit(hub, "connection.refused"))[0]
    assert entry["detail"]["reason"] == "origin 'https://é\\x85vil'"
    await assert_healthy(hub)


# -- timing and pipelining ---------------------------------------------------------------


@pytest.mark.parametrize("shape", ["trickled-headers", "no-line-end", "silent"])
async def test_slow_handshake_is_dropped_at_open_timeout(hub_factory, shape: str) -> None:
    hub = await hub_factory(open_timeout=0.5)
    before = hub.hub.metrics.connections["handshake_timeout"]
    wire = await Wire.open(hub.hub.port)
    started = time.monotonic()
    await wait_for(lambda: hub.hub.gate.pending_handshakes == 1)

    async def trickle() -> None:
        if shape == "silent":
            return
        if shape == "no-line-end":  # e.g. a TLS ClientHello on the plain port
            await wire.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64)
            return
        await wire.send(b"GET /ws HTTP/1.1\r\n")
        for n in range(100):
            await wire.send(f"X-Slow-{n}: x\r\n".encode())
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    try:
        assert await wire.eof(timeout=5) == b""
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    assert 0.4 <= time.monotonic() - started < 2.0
    await wait_for(lambda: hub.hub.gate.pending_handshakes == 0)
    assert hub.hub.metrics.connections["handshake_timeout"] == before + 1
    await assert_healthy(hub)


async def test_one_address_cannot_hold_every_pending_place(hub_factory) -> None:
    hub = await hub_factory(max_pending_handshakes=10, max_pending_per_source=2, open_timeout=3.0)
    held = []
    for _ in range(2):
        wire = await Wire.open(hub.hub.port, local_host="127.0.0.2")
        await wire.send(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        held.append(wire)
    await wait_for(lambda: hub.hub.gate.pending_handshakes == 2)
    assert hub.hub.gate.pending_by_source == {"127.0.0.2": 2}
    # A third from that address is shed as if the hub's own cap were reached...
    before = hub.hub.metrics.connections["source_overloaded"]
    third = await Wire.open(hub.hub.port, local_host="127.0.0.2")
    await third.send(upgrade_request("/ws", await hub.agent_token("edge-1")))
    response = await third.read_response()
    assert (response.status, response.json()) == (503, {"error": "overloaded"})
    assert 1 <= int(response.headers["retry-after"]) <= 10
    assert hub.hub.metrics.connections["source_overloaded"] == before + 1
    # ...its health probes are still answered...
    probe = await Wire.open(hub.hub.port, local_host="127.0.0.2")
    await probe.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await probe.read_response()).status == 200
    # ...and another address is served.
    agent = await Wire.upgrade(
        hub.hub.port, "/ws", await hub.agent_token("edge-2"), local_host="127.0.0.3"
    )
    assert (await agent.register("edge-2"))["type"] == "welcome"
    # Once its handshakes end, the address is admitted again and forgotten.
    for wire in held:
        wire.abort()
    await wait_for(
        lambda: hub.hub.gate.pending_by_source == {} and hub.hub.gate.pending_handshakes == 0
    )
    again = await Wire.upgrade(
        hub.hub.port, "/ws", await hub.agent_token("edge-1"), local_host="127.0.0.2"
    )
    assert (await again.register("edge-1"))["type"] == "welcome"
    assert hub.hub.gate.pending_by_source == {}
    await assert_healthy(hub)


async def test_newcomers_refused_at_the_cap_get_503_or_their_probe(hub_factory) -> None:
    # The gate's clock stands still: the held handshakes stay younger than SWAP_AGE, so a
    # newcomer from their own address takes none of their places and is refused (the fair
    # share that sheds them for other addresses: test_handshake_flood.py).
    hub = await hub_factory(max_pending_handshakes=3, open_timeout=3.0)
    clock = hub.hub.gate.clock = FakeClock()
    held = []
    for _ in range(3):
        wire = await Wire.open(hub.hub.port)
        await wire.send(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        held.append(wire)
    await wait_for(lambda: hub.hub.gate.pending_handshakes == 3)
    # Past the cap a connection is answered from its first bytes, without a parse: 503 with
    # a Retry-After drawn per refusal (1 s while few are refused), then closed...
    before = hub.hub.metrics.connections["overloaded"]
    for request in (
        upgrade_request("/ws", await hub.agent_token("edge-1")),
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /heal",  # a probe cut short is no probe
    ):
        response = await refused(hub.hub.port, request)
        assert response.status == 503
        assert response.json() == {"error": "overloaded"}
        assert 1 <= int(response.headers["retry-after"]) <= 10
    # ...except the health probes: a load balancer must not drop a busy hub.
    response = await refused(hub.hub.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (response.status, response.json()) == (200, {"status": "ok"})
    response = await refused(hub.hub.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (response.status, response.json()) == (200, {"status": "ready"})
    head = await Wire.open(hub.hub.port)
    await head.send(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = await head.eof()
    assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"\r\n\r\n")  # no body
    assert hub.hub.gate.pending_handshakes == 3  # none of them counted as pending
    # A connection that says nothing gets the 503 all the same.
    silent = await Wire.open(hub.hub.port)
    response = await silent.read_response()
    assert response.status == 503
    assert hub.hub.metrics.connections["overloaded"] == before + 4
    await wait_for(lambda: hub.hub.gate.refusing == 0, what="refusals closed")
    # The held ones time out (at the cap: open_timeout_min, 2 s), asked back later.
    clock.now += 2.0
    for wire in held:
        assert (await wire.read_response()).status == 503
        assert await wire.eof() == b""
    await wait_for(lambda: hub.hub.gate.pending_handshakes == 0)
    await assert_healthy(hub)


async def test_frames_pipelined_before_the_101_refuse_the_upgrade(hub_factory) -> None:
    # No periodic credential sync during the test: the only store read for credentials is
    # the lookup of the unknown token below.
    hub = await hub_factory(credential_sync_interval=3600)
    token = await hub.agent_token("edge-1")
    register = text({"type": "register", "agent_id": "edge-1"})
    await expect_refusal(hub, upgrade_request("/ws", token) + register, 400, "bad_request")
    # No pong ahead of the HTTP answer either: expect_refusal parses the status line first.
    await expect_refusal(hub, upgrade_request("/ws", token) + frame(PING, b"x"), 400, "bad_request")
    # The same for a credential this hub has not cached yet (made by the CLI, say), whose
    # check finishes after a store lookup: the frame arrives while the answer is pending.
    record, fresh = hub.hub.credentials.make("agent", agent_id="edge-2")
    await hub.hub.store.add_credential(record)
    # Every store reader is kept busy by a read waiting on a gate, so the real lookup
    # cannot finish until the frame is in the hub's socket.
    gate = threading.Event()
    store = hub.hub.store
    busy = [store._read(lambda conn: gate.wait(10)) for _ in range(store.readers)]
    try:
        wire = await Wire.open(hub.hub.port)
        await wire.send(upgrade_request("/ws", fresh))
        await wait_for(lambda: hub.hub.credentials._syncing is not None, what="lookup under way")
        await wire.send(text({"type": "register", "agent_id": "edge-2"}))
    finally:
        gate.set()
    await asyncio.gather(*busy)
    response = await wire.read_response()
    assert (response.status, response.json()) == (400, {"error": "bad_request"})
    assert await wire.eof() == b""
    assert "edge-1" not in hub.hub.registry.records
    assert "edge-2" not in hub.hub.registry.records
    entry = (await audit(hub, "connection.refused"))[0]
    assert "before the handshake" in entry["detail"]["reason"]
    await assert_healthy(hub)


async def test_every_refusal_feeds_the_metrics_exposition(hub_factory) -> None:
    hub = await hub_factory(**FRIENDLY)
    token = await hub.agent_token("edge-1")
    await refused(hub.hub.port, upgrade_request("/nope", token))
    await refused(hub.hub.port, upgrade_request("/ws", token, key="abc"))
    await refused(hub.hub.port, upgrade_request("/ws", token, method="POST"))
    await dropped(hub.hub.port, b"HELLO\r\n\r\n")
    exposition = (await http_get(hub.hub.port, "/metrics")).body.decode()
    for result, count in (
        ("not_found", 1),
        ("bad_request", 2),
        ("method_not_allowed", 1),
    ):
        assert f'tether_connections_total{{result="{result}"}} {count}.0' in exposition
    refusals = await audit(hub, "connection.refused")
    assert len(refusals) == 4
    assert {e["source"] for e in refusals} == {"127.0.0.1"}
