#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian/Ubuntu machine, as root:
# Debian packages, a virtualenv in .venv, and the package itself (compiled build).
# Idempotent: a second run only re-installs the package when its sources changed.
set -euo pipefail
cd "$(dirname "$0")"

DEB_PACKAGES=(build-essential python3-dev python3-venv iproute2 ethtool curl nginx-light lighttpd iperf3
              iputils-ping libpcap-dev libssl-dev tcpdump iptables tmux procps psmisc)
PY=${PYTHON:-python3}
VENV=.venv

need_apt=()
for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup.sh: Debian packages missing (${need_apt[*]}); run as root" >&2; exit 1
    fi
    echo "setup.sh: installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # nginx and lighttpd are started per replica by the lab, never as system services: stop and
    # disable whatever the packages' scripts started (by the system pid files, so a lab's own
    # servers, which keep theirs in the lab dir or none, are never hit).
    for svc in nginx lighttpd; do
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
        service "$svc" stop >/dev/null 2>&1 || true
        update-rc.d "$svc" disable >/dev/null 2>&1 || true
    done
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup.sh: creating $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
fi

# Re-install the package only when something that goes into the build changed.
stamp="$VENV/.appliance-build-stamp"
digest=$(cat pyproject.toml setup.py $(find _fastpath appliance -name '*.py' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.h' | sort) | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    echo "setup.sh: installing the package (compiled build) and its test/benchmark dependencies"
    env -u APPLIANCE_PUREPYTHON APPLIANCE_REQUIRE_EXTENSION=1 "$VENV/bin/python" -m pip install -q -e ".[test,bench]"
    echo "$digest" > "$stamp"
fi
echo "setup.sh: ready ($("$VENV/bin/python" -c 'import _fastpath; print("packet engine build:", _fastpath.BUILD)'))"
