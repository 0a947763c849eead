"""What a selector means (PROTOCOL §5): shell-style globs, case-sensitive, whole values.

One definition for the hub's dispatch and listings, the console's preview of a dispatch
and the console's filter terms with a wildcard, so that ``region:eu-*`` selects the same
agents wherever it is typed.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from functools import lru_cache

from .messages import Selector

__all__ = ["glob_match", "is_glob", "live", "selector_matches"]

#: Agent states in which an agent counts as ``online`` for a selector's ``status``.
_LIVE = frozenset({"online", "stale"})


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def glob_match(value: str | None, pattern: str) -> bool:
    """``*``, ``?`` and ``[…]`` as a shell has them, over the whole value, case-sensitive."""
    return value is not None and _compile(pattern).match(value) is not None


def live(state: str) -> bool:
    return state in _LIVE


def selector_matches(
    selector: Selector,
    *,
    agent_id: str,
    region: str | None,
    platform: str | None,
    labels: Mapping[str, str],
    state: str,
) -> bool:
    """Whether an agent with these fields is one the selector names."""
    if selector.status == "online" and state not in _LIVE:
        return False
    if selector.status == "offline" and state in _LIVE:
        return False
    if selector.agent_id is not None and not glob_match(agent_id, selector.agent_id):
        return False
    if selector.region is not None and not glob_match(region, selector.region):
        return False
    if selector.platform is not None and not glob_match(platform, selector.platform):
        return False
    return all(glob_match(labels.get(key), pattern) for key, pattern in selector.labels.items())
