#!/usr/bin/env bash
# sflb benchmark: one command that installs what it needs, builds Release into build-bench/,
# starts everything on 127.0.0.1 (ephemeral ports, a temp dir), runs the scenarios, prints one
# table of figures side by side from the same run, and tears everything down.
#
#   tests/bench/run-bench.sh                 # default (scaled for a 2-core machine)
#   tests/bench/run-bench.sh --quick         # smoke run, short durations
#   tests/bench/run-bench.sh --full          # issue 6 sizes: 1k/5k/10k streams, 100k fairness
#   tests/bench/run-bench.sh --scenarios nonstream,stream   # subset (also: control, profile)
#   tests/bench/run-bench.sh --profile       # add the CPU profile of the dataplane (c=64)
#
# Options:
#   --quick | --full        durations and sizes (see README.md for the exact values)
#   --scenarios LIST        comma-separated: nonstream, stream, control, profile
#                           (default nonstream,stream,control)
#   --profile               same as adding "profile" to the scenarios
#   --profiler NAME         auto (perf if hardware counters work, else callgrind), perf, callgrind
#   --results FILE          also write the raw results as JSON to FILE
#   --keep                  keep the temp dir (logs, nginx configs, perf data) and print its path
#   --no-install            do not apt-get anything (fail if something is missing)
#   --no-build              use the binaries already in build-bench/
#   --dp-env KEY=VALUE      extra dataplane environment, repeatable (A/B experiments, e.g.
#                           SFLB_REQUEST_LOG=false or SFLB_REQUEST_LOG_FLUSH=0)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${ROOT}/build-bench"
MODE=default
SCENARIOS="nonstream,stream,control"
PROFILE=0
PROFILER=auto
RESULTS=""
KEEP=0
INSTALL=1
BUILD_IT=1
DP_ENV=()

usage() { sed -n '2,/^[^#]/{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) MODE=quick ;;
    --full) MODE=full ;;
    --scenarios) SCENARIOS="${2:?--scenarios needs a list}"; shift ;;
    --scenarios=*) SCENARIOS="${1#*=}" ;;
    --profile) PROFILE=1 ;;
    --profiler) PROFILER="${2:?--profiler needs a name}"; shift ;;
    --profiler=*) PROFILER="${1#*=}" ;;
    --results) RESULTS="${2:?--results needs a file}"; shift ;;
    --results=*) RESULTS="${1#*=}" ;;
    --keep) KEEP=1 ;;
    --no-install) INSTALL=0 ;;
    --no-build) BUILD_IT=0 ;;
    --dp-env) DP_ENV+=(--dp-env "${2:?--dp-env needs KEY=VALUE}"); shift ;;
    --dp-env=*) DP_ENV+=(--dp-env "${1#*=}") ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run-bench.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [[ ${PROFILE} == 1 && ",${SCENARIOS}," != *",profile,"* ]]; then
  SCENARIOS="${SCENARIOS},profile"
fi
for s in ${SCENARIOS//,/ }; do
  case "$s" in nonstream|stream|control|profile) ;;
    *) echo "run-bench.sh: unknown scenario '$s'" >&2; exit 2 ;;
  esac
done

say() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }

# ------------------------------------------------------------------------------ packages
need_pkgs=(wrk python3 procps cmake ninja-build g++ pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libcpp-httplib-dev libssl-dev nlohmann-json3-dev libabsl-dev libgtest-dev libgmock-dev)
if ! command -v nginx >/dev/null 2>&1; then need_pkgs+=(nginx-light); fi
if [[ ",${SCENARIOS}," == *",profile,"* ]]; then
  if [[ ${PROFILER} == callgrind || ${PROFILER} == auto ]]; then need_pkgs+=(valgrind); fi
  if [[ ${PROFILER} == perf || ${PROFILER} == auto ]] && ! command -v perf >/dev/null; then
    need_pkgs+=(linux-perf)
  fi
fi
missing=()
for p in "${need_pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
  if [[ ${INSTALL} == 0 ]]; then
    echo "run-bench.sh: missing packages: ${missing[*]}" >&2; exit 1
  fi
  say "installing: ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  ${SUDO} apt-get update -qq
  DEBIAN_FRONTEND=noninteractive ${SUDO} apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

# ------------------------------------------------------------------------------ build
SSE_LOAD=""
if [[ ${BUILD_IT} == 1 ]]; then
  if [[ ! -f "${BUILD}/build.ninja" ]]; then
    say "configuring ${BUILD} (Release)"
    cmake -S "${ROOT}" -B "${BUILD}" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DSFLB_BUILD_TESTS=ON >/dev/null
  fi
  targets=(sflb-controlplane sflb-dataplane sflbctl sflb-fake-upstream)
  if grep -q 'add_subdirectory(bench)' "${ROOT}/tests/CMakeLists.txt"; then
    targets+=(sflb-sse-load)
  fi
  say "building ${targets[*]} (ninja -j2)"
  ninja -C "${BUILD}" -j2 "${targets[@]}" >&2
  if ! grep -q 'add_subdirectory(bench)' "${ROOT}/tests/CMakeLists.txt"; then
    # tests/bench is not part of the main build yet: build it from a scratch top level.
    SCRATCH="${BUILD}/bench-scratch"
    mkdir -p "${SCRATCH}"
    cat > "${SCRATCH}/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.25)
project(sflb_bench_scratch LANGUAGES CXX)
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
find_package(Threads REQUIRED)
find_package(nlohmann_json CONFIG REQUIRED)
function(sflb_target_defaults target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow -Wno-unused-parameter)
  target_include_directories(${target} PUBLIC ${SFLB_ROOT})
endfunction()
add_subdirectory(${SFLB_ROOT}/tests/bench bench)
EOF
    if [[ ! -f "${SCRATCH}/build/build.ninja" ]]; then
      cmake -S "${SCRATCH}" -B "${SCRATCH}/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DSFLB_ROOT="${ROOT}" >/dev/null
    fi
    ninja -C "${SCRATCH}/build" -j2 sflb-sse-load >&2
    SSE_LOAD="${SCRATCH}/build/bench/sflb-sse-load"
  fi
fi
if [[ -z ${SSE_LOAD} ]]; then
  for c in "${BUILD}/tests/bench/sflb-sse-load" "${BUILD}/bench-scratch/build/bench/sflb-sse-load"; do
    [[ -x $c ]] && { SSE_LOAD=$c; break; }
  done
fi
BIN="${BUILD}/bin-links"
mkdir -p "${BIN}"
ln -sf "${BUILD}/controlplane/sflb-controlplane" "${BUILD}/dataplane/sflb-dataplane" \
  "${BUILD}/ctl/sflbctl" "${BUILD}/tests/fake_upstream/sflb-fake-upstream" "${BIN}/"
for b in sflb-controlplane sflb-dataplane sflbctl sflb-fake-upstream; do
  [[ -x "${BIN}/$b" ]] || { echo "run-bench.sh: ${BIN}/$b missing (build failed?)" >&2; exit 1; }
done
[[ -x ${SSE_LOAD} ]] || { echo "run-bench.sh: sflb-sse-load not built" >&2; exit 1; }

# ------------------------------------------------------------------------------ run
# Thousands of streams need thousands of descriptors in every process (children inherit it).
NOFILE=$(ulimit -Hn)
[[ ${NOFILE} == unlimited ]] && NOFILE=1048576
[[ ${NOFILE} -gt 1048576 ]] && NOFILE=1048576
ulimit -n "${NOFILE}"

WORK="$(mktemp -d /tmp/sflb-bench.XXXXXX)"
cleanup() {
  local rc=$?
  # Every process the orchestrator started is listed in WORK/pids; end those still running
  # (normally none: it stops them itself).
  if [[ -f "${WORK}/pids" ]]; then
    while read -r pid; do
      if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; fi
    done < "${WORK}/pids"
    sleep 0.5
    while read -r pid; do
      if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    done < "${WORK}/pids"
  fi
  if [[ ${KEEP} == 1 ]]; then
    say "kept ${WORK}"
  else
    rm -rf "${WORK}"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "mode=${MODE} scenarios=${SCENARIOS} workdir=${WORK} nofile=${NOFILE}"
args=(--root "${ROOT}" --workdir "${WORK}" --bindir "${BIN}" --sse-load "${SSE_LOAD}"
  --mode "${MODE}" --scenarios "${SCENARIOS}" --profiler "${PROFILER}" --nofile "${NOFILE}")
[[ -n ${RESULTS} ]] && args+=(--results "${RESULTS}")
args+=("${DP_ENV[@]}")
/usr/bin/python3 "${ROOT}/tests/bench/bench.py" "${args[@]}"
