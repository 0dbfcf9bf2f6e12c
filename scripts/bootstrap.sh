#!/usr/bin/env bash
# Installs what meshgate needs on a Debian machine, as root: the Debian packages
# and the virtual environment in .venv with every distribution editable.
# Safe to run again: it installs only what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(etcd-server etcd-client wireguard-go wireguard-tools nftables iproute2 iperf3 iputils-ping procps python3-venv prometheus dnsmasq-base)
missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: missing Debian packages (${missing[*]}); run as root to install them" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # Without --no-install-recommends wireguard-tools pulls in a kernel image.
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  # Debian starts etcd as a system service on install; meshgate runs its own.
  # The same for Prometheus (the metrics tests run their own).
  for svc in etcd prometheus; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
      systemctl disable --now "$svc" || true
    fi
  done
fi

PY=${PYTHON:-python3}
DISTS=(clients/api clients/sdk services/common services/controlplane services/keyservice services/gatewayd)
stamp=.venv/.meshgate-installed
inputs=(constraints.txt "${DISTS[@]/%//pyproject.toml}")
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
needs=0
[ -f "$stamp" ] || needs=1
for f in "${inputs[@]}"; do [ "$f" -nt "$stamp" ] 2>/dev/null && needs=1; done
if [ $needs = 1 ]; then
  echo "bootstrap: installing the virtual environment"
  # The test tools (pytest-xdist: `make test` runs the suite in several worker
  # processes, see the Makefile), then the static checks `make lint` runs (ruff,
  # mypy with the stubs of the untyped libraries, import-linter).
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt \
    grpcio-tools mypy-protobuf pytest pytest-asyncio pytest-timeout pytest-xdist hypothesis pyyaml \
    ruff mypy import-linter types-protobuf types-grpcio \
    types-grpcio-reflection types-grpcio-status types-PyYAML
  args=()
  for d in "${DISTS[@]}"; do args+=(-e "$d"); done
  .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt "${args[@]}"
  touch "$stamp"
fi
