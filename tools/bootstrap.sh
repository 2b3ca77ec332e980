#!/usr/bin/env bash
# Installs everything meshbank needs on a bare Debian bookworm machine, idempotently:
# the Debian packages (PostgreSQL 15 server binaries, etcd 3.4), Patroni's own venv in
# /opt/meshbank (Debian's python3, readable by the postgres user), the tracing UI's
# (Phoenix) venv beside it, a virtualenv in .venv
# and the exactly pinned Python packages. A second run with nothing changed takes ~1 s.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(postgresql-15 postgresql-client-15 etcd-server python3-venv util-linux procps iproute2 iptables curl jq)
# Prometheus (and promtool, which checks and unit-tests the alert rules in `make test`).
APT_PACKAGES+=(prometheus)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "bootstrap: missing Debian packages: ${missing[*]} (run as root or install them)" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}"
  # Do not let the package create and start the system-wide cluster: meshbank runs
  # its own PostgreSQL under its state directory.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/meshbank.conf
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Patroni 3.1.2 in its own venv: see regions/replication.py for why this version.
PATRONI_VENV=${MESHBANK_PATRONI_VENV:-/opt/meshbank/patroni-venv}
patroni_want=$(sha256sum regions/patroni-requirements.txt | cut -d' ' -f1)
if [[ ! -f $PATRONI_VENV/.installed || $(cat "$PATRONI_VENV/.installed") != "$patroni_want" ]]; then
  echo "bootstrap: installing Patroni into $PATRONI_VENV"
  mkdir -p "$(dirname "$PATRONI_VENV")"
  /usr/bin/python3 -m venv "$PATRONI_VENV"
  "$PATRONI_VENV/bin/pip" install -q --disable-pip-version-check -r regions/patroni-requirements.txt 2>&1 \
    | { grep -v -E "Location 'file:|DEPRECATION|^ *$" || true; }
  chmod -R a+rX "$(dirname "$PATRONI_VENV")"
  echo "$patroni_want" > "$PATRONI_VENV/.installed"
fi

# The tracing UI (arize-phoenix) in its own venv: it pins its own OpenTelemetry,
# SQLAlchemy and gRPC, which must not meet the services' pins in .venv.
PHOENIX_VENV=${MESHBANK_PHOENIX_VENV:-/opt/meshbank/phoenix-venv}
phoenix_want=$(sha256sum regions/phoenix-requirements.txt | cut -d' ' -f1)
if [[ ! -f $PHOENIX_VENV/.installed || $(cat "$PHOENIX_VENV/.installed") != "$phoenix_want" ]]; then
  echo "bootstrap: installing the tracing UI (Phoenix) into $PHOENIX_VENV (a few minutes)"
  mkdir -p "$(dirname "$PHOENIX_VENV")"
  /usr/bin/python3 -m venv "$PHOENIX_VENV"
  "$PHOENIX_VENV/bin/pip" install -q --disable-pip-version-check -r regions/phoenix-requirements.txt 2>&1 \
    | { grep -v -E "Location 'file:|DEPRECATION|^ *$" || true; }
  echo "$phoenix_want" > "$PHOENIX_VENV/.installed"
fi

PYTHON=${PYTHON:-python3}
stamp=.venv/.meshbank-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
if [[ ! -x .venv/bin/python ]]; then
  echo "bootstrap: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "bootstrap: installing pinned Python packages into .venv"
# pip's output minus the noise of this machine's extra (absent) local indexes and
# setuptools' editable-install banner; errors still show and still fail the script.
quiet() {
  "$@" 2>&1 | { grep -v -E "Location 'file:|BuildBackendWarning|^ *!!|\*{10}|Please be careful|name as your package|with strategy, WheelFile|^ *$" || true; }
}
quiet .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt pip==26.3
quiet .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
echo "$want" > "$stamp"
