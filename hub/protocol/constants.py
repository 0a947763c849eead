"""Names and numbers of the wire contract: paths, subprotocols, close codes, limits."""

from __future__ import annotations

import re
from enum import IntEnum

#: What an agent id may be (PROTOCOL §4.1): used by the messages, the CLIs and identities.
AGENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
AGENT_ID = re.compile(AGENT_ID_PATTERN)

AGENT_PATH = "/ws"
ADMIN_PATH = "/admin"
AGENT_SUBPROTOCOL = "tether.agent.v1"
ADMIN_SUBPROTOCOL = "tether.admin.v1"

#: Largest message a hub accepts (after decompression), PROTOCOL §3.
MAX_MESSAGE_BYTES = 1024 * 1024
#: Largest message an admin client accepts from the hub: snapshots of big fleets are large.
MAX_ADMIN_INBOUND_BYTES = 256 * 1024 * 1024

#: More than this many invalid messages in the window closes the connection with 1008.
INVALID_MESSAGE_BUDGET = 20
INVALID_MESSAGE_WINDOW = 60.0

REGISTER_TIMEOUT = 10.0


class Close(IntEnum):
    """Close codes of PROTOCOL §3 and §4.5."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    INVALID_DATA = 1007
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    SUPERSEDED = 4001
    REVOKED = 4003


#: Admin roles, each allowing what the one before allows and more (PROTOCOL §2).
ROLES = ("viewer", "operator", "admin")
