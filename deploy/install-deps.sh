#!/usr/bin/env bash
# Installs the Debian 12 packages sflb needs to build, test and run locally. Safe to re-run:
# it asks dpkg what is missing and only then runs `apt-get update` and `apt-get install`.
#
#   bash deploy/install-deps.sh            # install what is missing
#   bash deploy/install-deps.sh --check    # list what is missing, install nothing (exit 1 if any)
#   bash deploy/install-deps.sh --list     # print the package list
#
# Runs apt-get directly as root, through sudo otherwise. SFLB_SKIP_DEPS=1 skips the script
# (for machines whose packages are managed some other way).
#
# This is the one place that lists sflb's system packages: add new ones to PACKAGES below.
set -euo pipefail

PACKAGES=(
  # Toolchain.
  g++ cmake ninja-build pkg-config
  # gRPC and protobuf. libgrpc++-dev does not pull in libprotobuf-dev, and CMake's gRPC
  # package fails without protobuf-compiler-grpc: all four are needed.
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  # HTTP server/client (built with OpenSSL), TLS, JSON, abseil, metrics.
  libcpp-httplib-dev libssl-dev nlohmann-json3-dev libabsl-dev prometheus-cpp-dev
  # Allocator of the server binaries outside sanitizer builds (see SFLB_JEMALLOC).
  libjemalloc-dev
  # Tests.
  libgtest-dev libgmock-dev
  # Scripts: deploy/run-local.sh uses curl (readiness checks) and openssl (random keys);
  # the dataplane verifies SiliconFlow's certificate against the system CA store.
  curl openssl ca-certificates
)

mode=install
case "${1:-}" in
  "") ;;
  --check) mode=check ;;
  --list) printf '%s\n' "${PACKAGES[@]}"; exit 0 ;;
  -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "install-deps.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac

if [[ "${SFLB_SKIP_DEPS:-0}" == 1 ]]; then
  echo "install-deps: SFLB_SKIP_DEPS=1, not checking system packages"
  exit 0
fi

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-deps: no dpkg/apt-get here (sflb targets Debian 12); make sure these are" \
       "installed, or set SFLB_SKIP_DEPS=1:" >&2
  echo "  ${PACKAGES[*]}" >&2
  exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  # "ii" = wanted and installed; anything else (not known, removed, half-configured) counts
  # as missing.
  status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
  [[ "$status" == ii* ]] || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi
echo "install-deps: missing: ${missing[*]}"
[[ "$mode" == check ]] && exit 1

as_root=()
if [[ "$(id -u)" != 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
  else
    echo "install-deps: not root and no sudo; as root, run:" >&2
    echo "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
  --no-install-recommends "${missing[@]}"
echo "install-deps: installed ${missing[*]}"
