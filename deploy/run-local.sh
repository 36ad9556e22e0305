#!/usr/bin/env bash
# Installs dependencies, builds sflb (Release, Ninja, build/) and runs a local controlplane plus
# one dataplane in the foreground. Ctrl-C (or SIGTERM) stops everything cleanly.
#
#   bash deploy/run-local.sh
#
# Keys: with ./keys.txt (or $SFLB_KEYS_FILE) or SILICONFLOW_API_KEY_1..N in the environment, sflb
# serves the real SiliconFlow API at $SILICONFLOW_BASE_URL. With neither it runs in DEMO MODE
# against the simulated SiliconFlow from tests/fake_upstream, with generated demo keys.
#
# Environment (all optional):
#   LB_API_KEY, LB_ADMIN_KEY  client key and admin key; generated once and kept in
#                             .sflb-local/credentials (mode 600) when unset
#   PORT                      dataplane HTTP port (default 3000)
#   SFLB_HOST                 dataplane listen address (default 127.0.0.1; 0.0.0.0 exposes it)
#   SFLB_CONTROLPLANE_PORT    controlplane gRPC port on 127.0.0.1 (default 50051)
#   SFLB_KEYS_FILE            keys file (default ./keys.txt)
#   SILICONFLOW_BASE_URL      upstream in real mode (default https://api.siliconflow.cn/v1)
#   SFLB_STATE_FILE           controlplane state file (default .sflb-local/controlplane-state-<mode>.json)
#   SFLB_AUDIT_LOG            controlplane audit log (default .sflb-local/audit-<mode>.jsonl)
#   SFLB_CONTROLPLANE_METRICS controlplane /metrics listener (default 127.0.0.1:9091, off if taken)
#   SFLB_DATAPLANE_METRICS    dataplane /metrics listener (default 127.0.0.1:9090, off if taken)
#   SFLB_DRAIN_GRACE          dataplane drain grace on stop (default 0 here)
#   SFLB_DATAPLANE_TOKEN      key-service token shared by both (default: random per run)
#   SFLB_BUILD_DIR            build folder (default build)
#   SFLB_BUILD_JOBS           parallel compile jobs (default: nproc)
#   SFLB_SKIP_BUILD=1         use the binaries already in the build folder
#   SFLB_SKIP_DEPS=1          do not check system packages
# Any other setting of the binaries (SFLB_LOG_LEVEL, SFLB_REQUEST_LOG, ...) passes through.
#
# Logs: controlplane and dataplane lines are shown here with a prefix and also written to
# .sflb-local/logs/; the simulated SiliconFlow logs to .sflb-local/logs/fake-upstream.log only.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "run-local: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac

# Resolve user-given paths before changing directory.
keys_file_env="${SFLB_KEYS_FILE:-}"
if [[ -n "$keys_file_env" && "$keys_file_env" != /* ]]; then keys_file_env="$PWD/$keys_file_env"; fi
build_dir="${SFLB_BUILD_DIR:-build}"
if [[ "$build_dir" != /* ]]; then build_dir="$root/$build_dir"; fi
cd "$root"

state_dir="$root/.sflb-local"
log_dir="$state_dir/logs"
mkdir -p "$log_dir"
chmod 700 "$state_dir"

port="${PORT:-3000}"
http_host="${SFLB_HOST:-127.0.0.1}"
cp_port="${SFLB_CONTROLPLANE_PORT:-50051}"
cp_address="127.0.0.1:$cp_port"

if [[ -t 1 ]]; then
  bold=$'\e[1m' red=$'\e[31m' green=$'\e[32m' yellow=$'\e[33m' cyan=$'\e[36m' magenta=$'\e[35m'
  reset=$'\e[0m'
else
  bold='' red='' green='' yellow='' cyan='' magenta='' reset=''
fi
say() { printf '%s==>%s %s\n' "$bold" "$reset" "$*"; }
die() { printf '%srun-local: %s%s\n' "$red" "$*" "$reset" >&2; exit 1; }

# True if something accepts TCP connections on 127.0.0.1:$1.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---- 1. Dependencies and build. --------------------------------------------------------------

bash "$root/deploy/install-deps.sh"

if [[ "${SFLB_SKIP_BUILD:-0}" != 1 ]]; then
  say "Building sflb (Release) in ${build_dir#"$root"/}"
  configure=(cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release)
  # An existing build folder keeps its generator (CMake refuses to switch).
  [[ -f "$build_dir/CMakeCache.txt" ]] || configure+=(-G Ninja)
  "${configure[@]}" >"$log_dir/configure.log" 2>&1 ||
    { cat "$log_dir/configure.log" >&2; die "cmake configure failed (log above)"; }
  cmake --build "$build_dir" -j "${SFLB_BUILD_JOBS:-$(nproc)}" \
    --target sflb-controlplane sflb-dataplane sflbctl sflb-fake-upstream ||
    die "the build failed (compiler output above); nothing was started"
fi
cp_bin="$build_dir/controlplane/sflb-controlplane"
dp_bin="$build_dir/dataplane/sflb-dataplane"
ctl_bin="$build_dir/ctl/sflbctl"
fake_bin="$build_dir/tests/fake_upstream/sflb-fake-upstream"
for bin in "$cp_bin" "$dp_bin" "$ctl_bin"; do
  [[ -x "$bin" ]] || die "$bin is missing (build failed?)"
done

# ---- 2. Client and admin keys. ---------------------------------------------------------------

credentials="$state_dir/credentials"
stored() {  # stored NAME: the value saved in .sflb-local/credentials, or "".
  [[ -f "$credentials" ]] || return 0
  sed -n "s/^export $1='\(.*\)'\$/\1/p" "$credentials" | tail -n 1
}
random_key() {  # random_key PREFIX: PREFIX + 48 hex digits.
  local hex
  hex=$(openssl rand -hex 24 2>/dev/null || od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
  printf '%s%s' "$1" "$hex"
}
api_key_source=environment
admin_key_source=environment
api_key="${LB_API_KEY:-}"
admin_key="${LB_ADMIN_KEY:-}"
if [[ -z "$api_key" ]]; then
  api_key=$(stored LB_API_KEY); api_key_source="$credentials"
  [[ -n "$api_key" ]] || api_key=$(random_key sflb-user-)
fi
if [[ -z "$admin_key" ]]; then
  admin_key=$(stored LB_ADMIN_KEY); admin_key_source="$credentials"
  [[ -n "$admin_key" ]] || admin_key=$(random_key sflb-admin-)
fi
[[ "$api_key" != "$admin_key" ]] || die "LB_API_KEY and LB_ADMIN_KEY must differ"
[[ "$api_key" != *"'"* && "$admin_key" != *"'"* ]] || die "keys must not contain single quotes"
if [[ "$api_key_source" != environment || "$admin_key_source" != environment ]]; then
  # Keep what was generated (or reused) so the next run and sflbctl use the same keys.
  old_umask=$(umask); umask 077
  {
    echo "# sflb local credentials, written by deploy/run-local.sh. Load with:"
    echo "#   source .sflb-local/credentials"
    # A key taken from the environment this time keeps its stored value for a later run.
    keep_api=$api_key keep_admin=$admin_key
    [[ "$api_key_source" != environment ]] || keep_api=$(stored LB_API_KEY)
    [[ "$admin_key_source" != environment ]] || keep_admin=$(stored LB_ADMIN_KEY)
    [[ -z "$keep_api" ]] || echo "export LB_API_KEY='$keep_api'"
    [[ -z "$keep_admin" ]] || echo "export LB_ADMIN_KEY='$keep_admin'"
  } >"$credentials.tmp"
  umask "$old_umask"
  chmod 600 "$credentials.tmp"
  mv "$credentials.tmp" "$credentials"
fi

# ---- 3. Real or demo mode. ---------------------------------------------------------------------

mode=real
keys_file=""
base_url="${SILICONFLOW_BASE_URL:-https://api.siliconflow.cn/v1}"
if [[ -n "$keys_file_env" ]]; then
  keys_file="$keys_file_env"
  if [[ ! -f "$keys_file" && -z "${SILICONFLOW_API_KEY_1:-}" ]]; then
    die "SFLB_KEYS_FILE=$keys_file does not exist (and SILICONFLOW_API_KEY_1 is not set)"
  fi
elif [[ -f "$root/keys.txt" ]]; then
  keys_file="$root/keys.txt"
elif [[ -n "${SILICONFLOW_API_KEY_1:-}" ]]; then
  # No keys file: the controlplane falls back to SILICONFLOW_API_KEY_1..N. Point it at a path
  # that does not exist so a keys.txt elsewhere cannot win.
  keys_file="$state_dir/no-keys-file"
  rm -f "$keys_file"
else
  mode=demo
fi

for p in "$port" "$cp_port"; do
  if port_busy "$p"; then
    die "port $p is already in use (another sflb? set PORT / SFLB_CONTROLPLANE_PORT)"
  fi
done

# ---- 4. Start the processes. ---------------------------------------------------------------------

pids=()
names=()
stopping=0

# start NAME COLOR LOGFILE SHOW COMMAND...: runs COMMAND in the background, output appended to
# LOGFILE and, with SHOW=1, echoed here with a colored "[NAME]" prefix. COMMAND runs in its own
# session (setsid execs in place, so $! is its pid): Ctrl-C reaches only this script, which then
# stops the processes in order (dataplane first, so it can send its last report).
start() {
  local name=$1 color=$2 log=$3 show=$4
  shift 4
  : >"$log"
  if [[ "$show" == 1 ]]; then
    local prefix
    prefix=$(printf '%s%-14s%s ' "$color" "[$name]" "$reset")
    setsid "$@" > >(trap '' INT TERM; tee -a "$log" |
      while IFS= read -r line; do printf '%s%s\n' "$prefix" "$line"; done) 2>&1 &
  else
    setsid "$@" >>"$log" 2>&1 &
  fi
  pids+=($!)
  names+=("$name")
}

stop_all() {
  stopping=1
  trap '' INT TERM
  local i
  # Dataplane first (it drains and sends a last report), then the controlplane, then the fake.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    if kill -0 "${pids[i]}" 2>/dev/null; then
      kill -TERM "${pids[i]}" 2>/dev/null || true
      wait "${pids[i]}" 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true  # the log prefixers
}
on_signal() {
  echo
  say "Stopping sflb..."
  stop_all
  say "Stopped. Logs are in .sflb-local/logs/"
  exit 0
}
trap on_signal INT TERM
trap 'if ((!stopping)); then stop_all; fi' EXIT

fake_port=""
if [[ "$mode" == demo ]]; then
  [[ -x "$fake_bin" ]] || die "$fake_bin is missing (build failed?)"
  demo_keys="$state_dir/demo-keys.txt"
  if [[ ! -s "$demo_keys" ]]; then
    {
      echo "# Demo keys for the simulated SiliconFlow (deploy/run-local.sh). Not real keys."
      for i in 1 2 3 4; do
        echo "$(random_key "sk-demo$i-") account=demo-$(( (i + 1) / 2 ))"
      done
    } >"$demo_keys"
  fi
  keys_file="$demo_keys"
  fake_log="$log_dir/fake-upstream.log"
  start fake-upstream "$magenta" "$fake_log" 0 \
    "$fake_bin" --host 127.0.0.1 --port 0 --chunks 12 --chunk-delay-ms 80
  # The fake prints {"event":"listening","port":N} on stdout once it accepts connections.
  for _ in $(seq 100); do
    fake_port=$(sed -n 's/.*"event":"listening","port":\([0-9]*\).*/\1/p' "$fake_log" | head -n 1)
    [[ -n "$fake_port" ]] && break
    kill -0 "${pids[0]}" 2>/dev/null || die "the simulated SiliconFlow did not start: $(tail -n 5 "$fake_log")"
    sleep 0.1
  done
  [[ -n "$fake_port" ]] || die "the simulated SiliconFlow did not report its port"
  base_url="http://127.0.0.1:$fake_port/v1"
fi

# Controlplane state (key states, counters) and audit log live in .sflb-local/, one set per
# mode, so demo keys never mix with real ones and nothing lands beside keys.txt in the repo.
state_file="${SFLB_STATE_FILE:-$state_dir/controlplane-state-$mode.json}"
audit_log="${SFLB_AUDIT_LOG:-$state_dir/audit-$mode.jsonl}"
# Prometheus listeners on localhost only; a port already taken turns that listener off.
metrics_listen() {  # metrics_listen DEFAULT_PORT
  if port_busy "$1"; then echo off; else echo "127.0.0.1:$1"; fi
}
cp_metrics="${SFLB_CONTROLPLANE_METRICS:-$(metrics_listen 9091)}"
# Only the dataplane may read keys from the controlplane: a fresh token per run (both processes
# get it here), unless SFLB_DATAPLANE_TOKEN is set.
dataplane_token="${SFLB_DATAPLANE_TOKEN:-$(random_key sflb-dp-)}"
dp_metrics="${SFLB_DATAPLANE_METRICS:-$(metrics_listen 9090)}"
say "Starting the controlplane on $cp_address ($mode mode)"
start controlplane "$cyan" "$log_dir/controlplane.log" 1 \
  env SFLB_LISTEN="$cp_address" SFLB_KEYS_FILE="$keys_file" LB_ADMIN_KEY="$admin_key" \
      SILICONFLOW_BASE_URL="$base_url" SFLB_STATE_FILE="$state_file" \
      SFLB_AUDIT_LOG="$audit_log" SFLB_METRICS_LISTEN="$cp_metrics" \
      SFLB_DATAPLANE_TOKEN="$dataplane_token" "$cp_bin"
# Start the dataplane once the controlplane listens: its first Watch then succeeds at once
# instead of waiting out gRPC's reconnect backoff.
for _ in $(seq 100); do
  port_busy "$cp_port" && break
  kill -0 "${pids[-1]}" 2>/dev/null ||
    die "the controlplane exited during start-up; see .sflb-local/logs/controlplane.log"
  sleep 0.1
done
say "Starting a dataplane on $http_host:$port"
# No drain grace by default: Ctrl-C on a local run should not wait for load balancers.
start dataplane "$green" "$log_dir/dataplane.log" 1 \
  env PORT="$port" SFLB_HOST="$http_host" LB_API_KEY="$api_key" LB_ADMIN_KEY="$admin_key" \
      SILICONFLOW_BASE_URL="$base_url" SFLB_CONTROLPLANE="$cp_address" \
      SFLB_METRICS_LISTEN="$dp_metrics" SFLB_DRAIN_GRACE="${SFLB_DRAIN_GRACE:-0}" \
      SFLB_DATAPLANE_TOKEN="$dataplane_token" "$dp_bin"

# ---- 5. Wait until the dataplane is ready. -------------------------------------------------------

case "$http_host" in
  0.0.0.0|127.0.0.1|localhost|::|"") url_host=localhost; probe_host=127.0.0.1 ;;
  *:*) url_host="[$http_host]"; probe_host="[$http_host]" ;;
  *) url_host="$http_host"; probe_host="$http_host" ;;
esac
url="http://$url_host:$port"
probe="http://$probe_host:$port"
ready=0
for _ in $(seq 300); do
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[i]}" 2>/dev/null; then
      die "${names[i]} exited during start-up; see .sflb-local/logs/${names[i]}.log"
    fi
  done
  if curl -fsS -o /dev/null --max-time 1 "$probe/readyz" 2>/dev/null; then
    ready=1
    break
  fi
  sleep 0.1
done
((ready)) || die "the dataplane did not become ready within 30 s; see .sflb-local/logs/"

health=$(curl -sS --max-time 2 -H "Authorization: Bearer $api_key" "$probe/health" || true)
active=$(sed -n 's/.*"activeKeys":\([0-9]*\).*/\1/p' <<<"$health")
total=$(sed -n 's/.*"totalKeys":\([0-9]*\).*/\1/p' <<<"$health")

# ---- 6. Tell the user what to do. ----------------------------------------------------------------

rel() { local p=$1; printf '%s' "${p#"$root"/}"; }
ctl_rel=$(rel "$ctl_bin")
ctl_env=""
if [[ "$admin_key_source" != environment ]]; then ctl_env="source .sflb-local/credentials && "; fi
[[ "$cp_port" == 50051 ]] || ctl_env+="SFLB_CONTROLPLANE=$cp_address "

echo
if [[ "$mode" == demo ]]; then
  bar="${yellow}${bold}$(printf '%.0s#' $(seq 78))${reset}"
  echo "$bar"
  echo "${yellow}${bold}#  DEMO MODE: no keys.txt / SILICONFLOW_API_KEY_1 found; answering from the${reset}"
  echo "${yellow}${bold}#  simulated SiliconFlow, not the real API.${reset}"
  echo "${yellow}${bold}#${reset}"
  echo "${yellow}${bold}#  Simulator: http://127.0.0.1:$fake_port/v1 with ${total:-?} demo keys from .sflb-local/demo-keys.txt${reset}"
  echo "${yellow}${bold}#  To use the real API: put your SiliconFlow keys in keys.txt (one per line) or${reset}"
  echo "${yellow}${bold}#  export SILICONFLOW_API_KEY_1=sk-..., then restart: bash deploy/run-local.sh${reset}"
  echo "$bar"
else
  if [[ -n "${SILICONFLOW_API_KEY_1:-}" && "$keys_file" == "$state_dir/no-keys-file" ]]; then
    source_text="SILICONFLOW_API_KEY_1..N"
  else
    source_text=$(rel "$keys_file")
  fi
  plural=s; [[ "$total" == 1 ]] && plural=""
  say "Real mode: ${total:-?} key$plural from $source_text, upstream $base_url"
  # Findings of the keys parser (duplicates, skipped lines; never a key), from the log.
  warnings=$(grep -m1 '"event":"keys_loaded"' "$log_dir/controlplane.log" |
    sed -n 's/.*"warnings":\[\(.*\)\].*/\1/p' | sed 's/^"//; s/"$//; s/","/\n/g' || true)
  if [[ -n "$warnings" ]]; then
    echo "${yellow}Key source warnings:${reset}"
    while IFS= read -r w; do echo "${yellow}  $w${reset}"; done <<<"$warnings"
  fi
  if [[ -z "$active" || "$active" == 0 ]]; then
    echo "${red}${bold}WARNING: no usable key is loaded; requests will fail with 503.${reset}"
    reason=$(grep -m1 '"event":"no_keys_loaded"' "$log_dir/controlplane.log" |
      sed -n 's/.*"reason":"\([^"]*\)".*/\1/p' || true)
    [[ -z "$reason" ]] || echo "${red}Reason: $reason${reset}"
    echo "${red}Check .sflb-local/logs/controlplane.log, fix the keys, then: ${ctl_env}$ctl_rel reload${reset}"
  fi
fi

metrics_note=""
for m in "dataplane $dp_metrics" "controlplane $cp_metrics"; do
  read -r m_name m_addr <<<"$m"
  [[ "$m_addr" == off ]] || metrics_note+="${metrics_note:+, }$m_name http://$m_addr/metrics"
done
[[ -z "$metrics_note" ]] || metrics_note="  Metrics: $metrics_note
"
if [[ "$api_key_source" != environment ]]; then
  key_note="LB_API_KEY: generated once, kept in .sflb-local/credentials"
else
  key_note="LB_API_KEY from your environment"
fi
cat <<EOF

${green}${bold}sflb is ready${reset} at $url  ($key_note)

  Chat completion:
    curl $url/v1/chat/completions -H "Authorization: Bearer $api_key" -H "Content-Type: application/json" -d '{"model":"Qwen/Qwen2.5-7B-Instruct","messages":[{"role":"user","content":"Hello"}]}'

  Streaming (-N prints events as they arrive):
    curl -N $url/v1/chat/completions -H "Authorization: Bearer $api_key" -H "Content-Type: application/json" -d '{"model":"Qwen/Qwen2.5-7B-Instruct","messages":[{"role":"user","content":"Hello"}],"stream":true}'

  OpenAI SDKs: base_url $url/v1, api_key = the LB_API_KEY above.

  Admin CLI:
    ${ctl_env}$ctl_rel stats

  Logs: .sflb-local/logs/ (tail -f .sflb-local/logs/*.log).  Stop: Ctrl-C.
$metrics_note

EOF

# ---- 7. Run until a signal or until a process dies. ----------------------------------------------

while :; do
  wait -n "${pids[@]}" 2>/dev/null || true
  ((stopping)) && break
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[i]}" 2>/dev/null; then
      rc=0
      wait "${pids[i]}" 2>/dev/null || rc=$?
      echo "${red}${bold}${names[i]} exited unexpectedly (status $rc); stopping the rest." \
           "See .sflb-local/logs/${names[i]}.log${reset}" >&2
      stop_all
      exit 1
    fi
  done
done
