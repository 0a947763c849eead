"""TLS sessions on the agent's side: resumed from the hub's ticket, shown by doctor."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from agent.doctor import DoctorOptions, doctor
from agent.profile import AgentProfile
from hub.protocol.tls import TlsOptions, make_ssl_context

from . import test_tls
from .conftest import eventually
from .test_tls import TlsHub

# The hub and agents of tests/agent/test_tls.py.
tls_hub = test_tls.tls_hub
start = test_tls.start


async def test_a_returning_agent_resumes_its_tls_session(
    tls_hub: TlsHub, start: Callable[..., Any]
) -> None:
    client = await start(tls_hub, TlsOptions(ca_file=str(tls_hub.ca_file)), "tls-back")
    live = tls_hub.handle.hub.registry.live
    await eventually(lambda: client.registered, message="registered over wss")
    assert client.tls_resumed is False  # the first handshake is a full one
    first = live["tls-back"].conn
    first.close(1012, "restart")  # the hub sends it away: it dials again at once-ish
    await eventually(
        lambda: client.registered and live.get("tls-back") and live["tls-back"].conn is not first,
        timeout=20,
        message="back",
    )
    assert client.tls_resumed is True
    sslobj = live["tls-back"].conn.transport.get_extra_info("ssl_object")
    assert sslobj.session_reused  # seen from the hub too


async def test_doctor_shows_version_cipher_and_resumption(tls_hub: TlsHub) -> None:
    token = await tls_hub.handle.agent_token("doc-tls")
    context = make_ssl_context(TlsOptions(ca_file=str(tls_hub.ca_file)))
    out = io.StringIO()
    options = DoctorOptions(
        url=tls_hub.url, token=token, profile=AgentProfile(agent_id="doc-tls"), ssl_context=context
    )
    assert await doctor(options, out)
    line = next(line.strip() for line in out.getvalue().splitlines() if " TLS " in line)
    assert line.startswith("ok    TLS        TLSv1.3 TLS_AES_256_GCM_SHA384, sha256 "), line
    assert line.endswith(", session resumed"), line
