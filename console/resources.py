"""Find the console's data files (map outlines, style sheets) wherever Tether runs from.

The files live in the repository's top-level ``resources/`` folder, beside the ``console``
package, because they are shared data rather than code. How they ship in a wheel is not
settled yet, so the lookup tries, in order:

1. ``$TETHER_RESOURCES`` — an explicit folder (tests, unusual installs);
2. ``<checkout>/resources`` — a source checkout or editable install (a folder holding
   ``pyproject.toml``);
3. ``console/resources/`` — if packaging later copies them into the package;
4. ``<sys.prefix>/share/tether/resources`` — where ``pyproject.toml``'s data-files put them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path, PurePosixPath

__all__ = ["ENV_VAR", "resource_dirs", "resource_path"]

ENV_VAR = "TETHER_RESOURCES"

_PACKAGE_DIR = Path(__file__).resolve().parent


def resource_dirs() -> list[Path]:
    """The folders searched, most specific first (read afresh so the env var can change)."""
    dirs = []
    override = os.environ.get(ENV_VAR)
    if override:
        dirs.append(Path(override))
    checkout = _PACKAGE_DIR.parent
    # Only a real checkout: an installed site-packages/resources would be someone else's.
    if (checkout / "pyproject.toml").is_file():
        dirs.append(checkout / "resources")
    dirs += [
        _PACKAGE_DIR / "resources",
        Path(sys.prefix) / "share" / "tether" / "resources",
    ]
    return dirs


def resource_path(name: str) -> Path:
    """Path of the resource file ``name`` (e.g. ``"world-110m.json.gz"``).

    ``name`` is relative and may not climb out of the folder, so a caller can't be talked
    into reading arbitrary files. Raises :class:`FileNotFoundError` naming every folder
    tried, which is what a packager needs to see when a file did not ship.
    """
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise ValueError(f"not a plain relative resource name: {name!r}")
    tried = resource_dirs()
    for folder in tried:
        candidate = folder.joinpath(*rel.parts)
        if candidate.is_file():
            return candidate
    where = ", ".join(str(d) for d in tried)
    raise FileNotFoundError(f"resource {name!r} not found in: {where}")
