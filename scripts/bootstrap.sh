#!/usr/bin/env bash
# Set up everything Tether needs on this machine, idempotently:
# a Python >= 3.11 virtualenv in .venv with the project and its dev extras, and the
# system packages the tests and the console need (installed with apt-get when missing).
# Sourced by scripts/demo and scripts/test; safe to run again at any time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

say() { printf '\033[1m[tether]\033[0m %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else return 1
  fi
}

APT_UPDATED=""
apt_install() {
  command -v apt-get >/dev/null 2>&1 || { say "cannot install $* (no apt-get): install it yourself"; return 1; }
  if [ -z "$APT_UPDATED" ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || true
    APT_UPDATED=1
  fi
  say "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
    >/dev/null 2>"${TMPDIR:-/tmp}/tether-apt.log"
}

find_python() {
  for candidate in "${TETHER_PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  return 1
}

ensure_python() {
  if ! PYTHON="$(find_python)"; then
    apt_install python3 python3-venv python3-pip || true
    PYTHON="$(find_python)" || { say "Python 3.11 or newer is required"; exit 2; }
  fi
  if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv || true
  fi
}

# Shared libraries the Qt wheels load even offscreen; present on desktops, not on servers.
ensure_qt_libraries() {
  local missing=()
  for lib in libEGL.so.1 libGL.so.1 libxkbcommon.so.0 libfontconfig.so.1 libdbus-1.so.3 libglib-2.0.so.0; do
    ldconfig -p 2>/dev/null | grep -q "$lib" || missing+=("$lib")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  apt_install libegl1 libgl1 libxkbcommon0 libxkbcommon-x11-0 libfontconfig1 libdbus-1-3 \
    libglib2.0-0 libx11-xcb1 libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-shape0 \
    libxcb-xinerama0 libxcb-randr0 libxcb-render-util0 libxcb-image0 fonts-dejavu-core || \
    say "could not install Qt's system libraries (${missing[*]}); GUI tests may fail"
}

ensure_redis() {
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server || \
    say "redis-server missing and not installable; cluster tests will fail"
}

# nginx in front of two hubs is part of the cluster tests (docs/cluster.md's example).
ensure_nginx() {
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || apt_install nginx-light || \
    apt_install nginx || say "nginx missing and not installable; the nginx test will fail"
}

ensure_venv() {
  ensure_python
  local stamp="$VENV/.tether-installed"
  local want
  want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
  fi
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing Tether and its dev dependencies into .venv"
    local log="$VENV/pip-install.log"
    if ! { "$VENV/bin/python" -m pip install -q --upgrade pip &&
           "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"; } >"$log" 2>&1; then
      cat "$log" >&2
      say "installing the dependencies failed (log: $log)"
      exit 2
    fi
    echo "$want" > "$stamp"
  fi
}

# The edge tests (tests/edge, tests/agent/test_proxy.py) run real proxies, network
# namespaces, nftables, libfaketime and promtool; each test fails loudly without its tool.
ensure_edge_tools() {
  local missing=()
  command -v tinyproxy >/dev/null 2>&1 || missing+=(tinyproxy)
  command -v danted >/dev/null 2>&1 || [ -x /usr/sbin/danted ] || missing+=(dante-server)
  command -v faketime >/dev/null 2>&1 || missing+=(faketime)
  command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing+=(nftables)
  command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || missing+=(iproute2)
  command -v tc >/dev/null 2>&1 || [ -x /usr/sbin/tc ] || missing+=(iproute2)
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
  [ ${#missing[@]} -eq 0 ] && return 0
  # Debian enables the daemons' services on install; nothing here starts them (tests run
  # their own, in the foreground, on ports of their own).
  apt_install "${missing[@]}" || say "could not install ${missing[*]}; the edge tests will fail"
}

bootstrap() {
  ensure_venv
  ensure_qt_libraries
  ensure_redis
  ensure_nginx
  ensure_edge_tools
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  bootstrap
  say "ready: $VENV"
fi
