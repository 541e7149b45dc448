#!/usr/bin/env bash
# One entry point for a fresh Debian/Ubuntu machine: installs what is missing (Debian packages,
# a virtualenv with the package and its dev extras), then runs `customscripts <command>`.
#   deploy/local/bootstrap.sh demo   # local stack + demo on real sample market data
#   deploy/local/bootstrap.sh test   # local stack + the whole test suite
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

debs=(python3 python3-venv python3-pip postgresql redis-server nats-server bubblewrap libseccomp2 ca-certificates)
missing=()
for pkg in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# python3 from elsewhere (pyenv, a container image) is fine as long as it can make a venv.
if command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null; then
  missing=("${missing[@]/python3-venv}"); missing=("${missing[@]/python3-pip}"); missing=("${missing[@]/python3}")
fi
read -r -a missing <<<"${missing[*]:-}"
if ((${#missing[@]})); then
  echo "[bootstrap] installing Debian packages: ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Container images (customscripts/faas/images.py, `customscripts build`): podman and buildah build and run
# function images with runc (crun fails on these VMs), mmdebstrap makes their base offline, uidmap for
# rootless podman. CS_BOOTSTRAP_CONTAINERS=0 skips them (the process runtime needs none).
if [ "${CS_BOOTSTRAP_CONTAINERS:-1}" != 0 ]; then
  image_debs=()
  for pkg in podman buildah runc mmdebstrap uidmap; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || image_debs+=("$pkg")
  done
  if ((${#image_debs[@]})); then
    echo "[bootstrap] installing container packages: ${image_debs[*]}"
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${image_debs[@]}" >/dev/null
  fi
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"python3 >= 3.11 is needed, found {sys.version.split()[0]}")
PY

stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv"
  python3 -m venv .venv
fi
if [ ! -e "$stamp" ]; then
  echo "[bootstrap] installing the customscripts package and its dependencies into .venv"
  # PYTHONWARNINGS reaches setuptools in pip's build subprocess: no "!!" notice boxes among the output
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v -i warning || true
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e "$root[dev]" 2>&1 | grep -v -i warning || true
  .venv/bin/python -c 'import customscripts, minio, psycopg, nats, pytest' 
  rm -f .venv/.installed-*; touch "$stamp"
fi

exec .venv/bin/customscripts "$@"
