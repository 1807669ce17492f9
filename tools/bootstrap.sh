#!/usr/bin/env bash
# Install what nephele needs on a Debian 12 machine, as root: apt packages (only the missing ones),
# then a venv with nephele installed editable. Safe to re-run; does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

APT_PACKAGES=(
  # build of libvirt-python (PyPI has only an sdist)
  gcc pkg-config libvirt-dev python3-dev python3-venv
  # the hypervisor and its tools
  qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
  # local cloudlet nodes: namespaces, sshd, test guest build
  iproute2 openssh-server openssh-client kmod cpio e2fsprogs busybox-static curl
  # the connector to a node's agent daemon (docs/agent-protocol.md)
  socat
  # the tools nephele is benchmarked against
  xdelta3 zstd rsync
  git make
  # a real browser for the heatmap page test (tests/e2e/test_heatmap_browser.py), headless
  chromium
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: missing Debian packages (run as root to install): ${missing[*]}" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip
fi
# Reinstall only when the project's metadata changed.
stamp="$VENV/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/pip" install -q -e '.[test]'
  touch "$stamp"
fi
