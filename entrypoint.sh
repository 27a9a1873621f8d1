#!/usr/bin/env bash
# entrypoint.sh — boot and supervise the container: health server, llama-server, gateway.
#
# Order: check env, model and llama-server (nothing is started when one is wrong); write state
# `starting`; start the health server (answers 204 at once); start the gateway (answers API calls
# with 503 JSON until the state is `ready`); start llama-server on its Unix socket (or
# 127.0.0.1:PORT_BACKEND) and poll its /health until 200; once the gateway port accepts too, write
# `ready` (health 200).
#
# State file $RUN_DIR/health (one word, replaced atomically; read by health_server.py and the
# gateway; the contract: scripts/llamagw/backend_state.py): starting -> ready -> (starting while
# restarting) -> failed | stopping.
#
# Restarts. llama-server exiting (or not ready within MODEL_LOAD_TIMEOUT) is a failure: the state
# goes back to `starting`, so the health server answers 204 — RunPod reads 204 as "initializing"
# and routes nothing to the worker, while any other non-200 marks it unhealthy and may replace it;
# a restart usually succeeds within seconds, so we keep the worker. API calls meanwhile get 503 +
# Retry-After from the gateway. It is restarted after a backoff of RESTART_BACKOFF_INITIAL *
# 2^(failures-1) s, capped at RESTART_BACKOFF_MAX. More than MAX_RESTARTS failures within
# RESTART_WINDOW s: state `failed` (health 503), everything stops, exit 1 — the platform replaces
# the worker. A dead gateway or health server is restarted the same way (own failure count); the
# gateway exiting 2 means bad config: exit 2 at once. Every restart is logged with its reason.
#
# SIGTERM/SIGINT: state `stopping` (health 503); the gateway drains (TERM, KILL after
# GRACEFUL_TIMEOUT+2 s), then llama-server (TERM, KILL after LLAMA_STOP_TIMEOUT s), then the health
# server; exit 0.
#
# Environment (defaults in brackets; "config" for a setting this script shares with the gateway
# and the health server, whose default is written in scripts/llamagw/config.py only):
#   DATA_DIR        [config: /runpod-volume or /workspace when present, else /data] logs, models,
#                   keys
#   RUN_DIR         [config] per-worker runtime state: state file, pid files.
#                   Never under DATA_DIR: on RunPod that is a network volume shared by workers.
#   MODEL_PATH      a .gguf file; else MODEL_NAME, a file under $DATA_DIR/models
#   LLAMA_SERVER_BIN  [llama-server on PATH, else next to this script, else /app/llama-server
#                   (the llama.cpp image keeps it in /app)]
#   PORT [config] gateway, PORT_HEALTH [config] health server, PORT_BACKEND [config] llama-server
#   (BACKEND_TRANSPORT=tcp only), HOST [config] where the gateway and the health server listen.
#   BACKEND_TRANSPORT [unix] how the gateway reaches llama-server: `unix`, a Unix socket at
#                   BACKEND_SOCKET [config: $RUN_DIR/llama-server.sock], created 0600: no other
#                   user can reach llama-server around the gateway's keys, and a send and its
#                   receive cost a third of loopback TCP's CPU; `tcp`, 127.0.0.1:PORT_BACKEND.
#   CTX [16384] context size, NGL [99] layers on the GPU (llama-server runs on the CPU when there is
#   no GPU), PARALLEL [1] llama-server slots: the context is split between slots, so 1 gives every
#   request the whole CTX; raise PARALLEL together with CTX for throughput.
#   EXTRA_ARGS      more llama-server flags, split on whitespace on purpose (no quoting, no globbing)
#   WORKER_TYPE [config] names the server log folder.
#   MODEL_LOAD_TIMEOUT [600] GRACEFUL_TIMEOUT [config] LLAMA_STOP_TIMEOUT [10]
#   RESTART_BACKOFF_INITIAL [1] RESTART_BACKOFF_MAX [30] RESTART_WINDOW [600] (seconds, decimals ok)
#   MAX_RESTARTS [5]
#   PYTHON [python3] the interpreter for the health server and the gateway
#   Router mode (many models, llama-server's router), when MODELS_DIR is set and non-empty:
#   MODELS_DIR      the models: NAME.gguf files and NAME/ folders (split or multimodal files)
#   MODELS_MAX [1]  models in memory at once (0: no limit); MODEL_NAME / MODEL_PATH then name
#                   the default model (optional), MODELS_PRELOAD [the default model] the models
#                   loaded at start, comma-separated (health 200 once all are loaded)
#   MODELS_PRESET [$DATA_DIR/models.ini when it exists] per-model settings, checked by
#                   scripts/models_preset.py, which writes the preset llama-server reads to
#                   $RUN_DIR/models-preset.ini. CTX, NGL and PARALLEL become its [*] defaults
#                   (never router flags: those would override every model's own settings).
#                   llama-server runs with --no-models-autoload: the gateway decides every load.
#   Models by URL (scripts/fetch_model.py; downloaded after the health server starts, so the
#   probe answers 204 meanwhile; a failed download: state `failed`, health 503 for
#   DOWNLOAD_FAIL_HOLD [10] s, exit 1, or 2 when the URL names nothing usable):
#   MODEL_URL       http(s)://.../NAME.gguf, hf://OWNER/REPO/PATH.gguf or hf://OWNER/REPO:QUANT,
#                   downloaded into $DATA_DIR/models (as MODEL_NAME, or to MODEL_PATH, when set)
#   MODEL_SHA256    its expected sha256 (hf:// files are checked against the hub's digest anyway)
#   MODELS_URLS     router mode: comma-separated, downloaded into MODELS_DIR before the preset
#   HF_ENDPOINT [https://huggingface.co] HF_TOKEN (sent to HF_ENDPOINT's host only, never logged)
# Every setting is checked before anything starts (a bad one: FATAL naming the variable, exit 2):
# this script's own here, all of the gateway's by scripts/llamagw/config.py, asked once (see
# "configuration" below; the health server and the gateway check them again as they start).
#
# Logs, everything also mirrored to stdout for platform log viewers:
#   $DATA_DIR/logs/_boot/<ts>_boot_<host>.log            this script, health server, gateway
#   $DATA_DIR/logs/llama-$WORKER_TYPE/<ts>_server_<host>.log   llama-server (all restarts)
#   each folder has latest.txt, a relative symlink to its newest file.
#
# Exit codes: 0 stopped by TERM/INT; 1 missing model or llama-server, gave up restarting; 2 bad
# configuration.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPTS="$HERE/scripts"
PYTHON="${PYTHON:-python3}"

# ---- limits (milliseconds unless named otherwise) -------------------------------------------
HEALTH_START_TIMEOUT_MS=10000   # python starts and binds in ~0.1 s; 10 s means it is broken
GATEWAY_START_TIMEOUT_MS=30000  # the gateway binds its port within ~0.2 s of starting
HELPER_STOP_TIMEOUT_MS=3000     # the health server exits on TERM at once
LOAD_POLL_INTERVAL_MS=200       # between llama-server /health polls while it loads (at most)
POLL_FIRST_MS=10                # the first wait of a poll for something that is starting: the
                                # waits then grow by half up to the poll's own interval, so a
                                # fast start is seen within ~10 ms and a slow one costs few polls
LOAD_POLL_TIMEOUT=2             # s per /health poll: loopback; the reply is tiny
PORT_CHECK_TIMEOUT=1            # s per TCP connect check on loopback
STOP_POLL_INTERVAL=0.05         # s between "has it exited yet" checks while stopping
GATEWAY_KILL_MARGIN_MS=2000     # the gateway gets GRACEFUL_TIMEOUT plus this before SIGKILL

# ---- small helpers ----------------------------------------------------------------------------
BOOT_LOG=""
SOCKET_OURS=""      # set once llama-server is started on BACKEND_SOCKET (finish removes it)
BACKEND_SOCKET=${BACKEND_SOCKET:-}
log() {
  local level=$1; shift
  local line
  printf -v line '%(%Y-%m-%dT%H:%M:%S)T entrypoint %s: %s' -1 "$level" "$*"
  printf '%s\n' "$line"
}
fatal() {  # fatal CODE MESSAGE...
  local code=$1; shift
  log FATAL "$*"
  if [[ -n $STATE ]]; then set_state failed; fi  # health 503 until the health server stops
  finish "$code"
}

NOW_MS=0
now_ms() { local us=${EPOCHREALTIME//[!0-9]/}; NOW_MS=$(( us / 1000 )); }

nap() {  # sleep that a trapped signal interrupts
  sleep "$1" &
  local p=$!
  # A trapped signal cuts the wait short: the sleep is killed and bash reaps it by itself. No
  # second `wait` for it: when the sleep ended as the signal came, that wait blocked until some
  # other child (the gateway, llama-server) exited, and the stop hung (1 stop in ~20).
  if ! wait "$p"; then kill "$p" 2>/dev/null || true; fi
}

POLL_WAIT_MS=0
poll_nap() {  # poll_nap MAX_MS: the next wait of a poll (POLL_WAIT_MS, 0 at a poll's start)
  POLL_WAIT_MS=$(( POLL_WAIT_MS ? POLL_WAIT_MS * 3 / 2 : POLL_FIRST_MS ))
  if (( POLL_WAIT_MS > $1 )); then POLL_WAIT_MS=$1; fi
  nap "$(ms_to_s "$POLL_WAIT_MS")"
}

int_var() {  # int_var NAME DEFAULT MIN MAX: validate ${NAME:-DEFAULT} into NAME
  local name=$1 default=$2 lo=$3 hi=$4
  local raw=${!name:-$default}
  if [[ ! $raw =~ ^[0-9]{1,9}$ ]]; then
    fatal 2 "$name must be a whole number, got '$raw'"
  fi
  local value=$(( 10#$raw ))
  if (( value < lo || value > hi )); then
    fatal 2 "$name must be between $lo and $hi, got $value"
  fi
  printf -v "$name" '%s' "$value"
}

secs_var() {  # secs_var NAME DEFAULT MIN_MS: validate seconds (decimals ok) into NAME and NAME_MS
  local name=$1 default=$2 lo_ms=$3
  local raw=${!name:-$default}
  if [[ ! $raw =~ ^([0-9]{1,6})(\.([0-9]+))?$ ]]; then
    fatal 2 "$name must be a number of seconds, got '$raw'"
  fi
  local frac="${BASH_REMATCH[3]}000"
  local ms=$(( 10#${BASH_REMATCH[1]} * 1000 + 10#${frac:0:3} ))
  if (( ms < lo_ms )); then
    fatal 2 "$name must be at least ${lo_ms} ms, got '$raw'"
  fi
  printf -v "$name" '%s' "$raw"
  printf -v "${name}_MS" '%s' "$ms"
}

ms_to_s() { printf '%d.%03d' $(( $1 / 1000 )) $(( $1 % 1000 )); }

describe_exit() {  # describe_exit STATUS -> "exit code N" or "signal NAME"
  if (( $1 > 128 )); then
    printf 'signal %s' "$(kill -l $(( $1 - 128 )) 2>/dev/null || echo $(( $1 - 128 )))"
  else
    printf 'exit code %s' "$1"
  fi
}

set_state() {  # atomic replace: readers never see an empty or half-written file
  local tmp="${HEALTH_FILE%/*}/.health.$$"
  printf '%s\n' "$1" > "$tmp"
  mv -f "$tmp" "$HEALTH_FILE"
  STATE=$1
}

port_open() {  # port_open HOST PORT: a TCP connect succeeds (nothing sent)
  # shellcheck disable=SC2016  # $1/$2 expand in the child bash, on purpose
  timeout "$PORT_CHECK_TIMEOUT" bash -c 'exec 9<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

http_code() {  # http_code URL TIMEOUT [UNIX_SOCKET] -> status code, 000 when no answer
  if command -v curl >/dev/null 2>&1; then
    local via=()
    if [[ -n ${3:-} ]]; then via=(--unix-socket "$3"); fi
    curl -s -o /dev/null -w '%{http_code}' --noproxy '*' --max-time "$2" "${via[@]}" "$1" || true
  else
    "$PYTHON" - "$1" "$2" "${3:-}" <<'PY' || echo 000
import http.client, socket, sys, urllib.parse
url, timeout, unix_path = sys.argv[1], float(sys.argv[2]), sys.argv[3]
u = urllib.parse.urlsplit(url)
try:
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    if unix_path:
        conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.sock.settimeout(timeout)
        conn.sock.connect(unix_path)
    conn.request("GET", u.path or "/")
    print(conn.getresponse().status)
except Exception:
    print("000")
PY
  fi
}

# ---- process bookkeeping ------------------------------------------------------------------------
HEALTH_PID="" GATEWAY_PID="" LLAMA_PID="" FETCH_PID="" BOOT_TEE_PID="" STATE="" STOP_REQUESTED=""
LAST_EXIT=0

reap() {  # reap PID: collect the exit status of a dead child into LAST_EXIT
  LAST_EXIT=0
  wait "$1" 2>/dev/null || LAST_EXIT=$?
}

stop_pid() {  # stop_pid PID NAME TIMEOUT_MS: TERM, wait up to TIMEOUT_MS, then KILL
  local pid=$1 name=$2 timeout_ms=$3
  [[ -n $pid ]] || return 0
  if ! kill -0 "$pid" 2>/dev/null; then reap "$pid"; return 0; fi
  log INFO "stopping $name (pid $pid, SIGTERM, up to $(ms_to_s "$timeout_ms") s)"
  kill -TERM "$pid" 2>/dev/null || true
  now_ms; local deadline=$(( NOW_MS + timeout_ms ))
  while kill -0 "$pid" 2>/dev/null; do
    now_ms
    if (( NOW_MS >= deadline )); then
      log WARN "$name (pid $pid) still running after $(ms_to_s "$timeout_ms") s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    nap "$STOP_POLL_INTERVAL"
  done
  reap "$pid"
  log INFO "$name stopped ($(describe_exit "$LAST_EXIT"))"
}

finish() {  # finish CODE: last words, then exit with no child left behind
  # Only the entrypoint itself stops the stack. A child forked for a background command (nap's
  # `sleep &`) runs bash's code and holds our traps until it execs; a SIGTERM in that window
  # (nap kills its sleep when a signal cuts the nap short) made the child run on_exit, stop
  # every process, kill the log mirror and leave the entrypoint to die of SIGPIPE at its next
  # log line (1 stop in ~40 under load).
  if [[ $BASHPID != "$$" ]]; then exit "$1"; fi
  trap - EXIT
  # (A pid is set only once the configuration that gives these timeouts has been read.)
  stop_pid "$GATEWAY_PID" gateway "$(( ${GRACEFUL_TIMEOUT_MS:-0} + GATEWAY_KILL_MARGIN_MS ))"
  GATEWAY_PID=""
  stop_pid "$LLAMA_PID" llama-server "${LLAMA_STOP_TIMEOUT_MS:-0}"
  LLAMA_PID=""
  # Only a socket our llama-server made: a path we never used may be someone else's.
  if [[ -n $SOCKET_OURS && -S $BACKEND_SOCKET ]]; then rm -f "$BACKEND_SOCKET"; fi
  # a model download: its partial file is kept, the next boot resumes it
  stop_pid "$FETCH_PID" "model download" "$HELPER_STOP_TIMEOUT_MS"
  FETCH_PID=""
  stop_pid "$HEALTH_PID" "health server" "$HELPER_STOP_TIMEOUT_MS"
  HEALTH_PID=""
  if [[ -n ${RUN_DIR:-} && -d ${RUN_DIR:-} ]]; then
    rm -f "$RUN_DIR/llama-server.pid" "$RUN_DIR/gateway.pid" "$RUN_DIR/health_server.pid" \
      "$RUN_DIR/entrypoint.pid"
  fi
  log INFO "exit $1"
  if [[ -n $BOOT_TEE_PID ]]; then  # let the log mirror flush and end before we do
    exec 1>&3 2>&3 3>&-
    local i
    for (( i = 0; i < 40; i++ )); do
      kill -0 "$BOOT_TEE_PID" 2>/dev/null || break
      sleep 0.05
    done
    kill "$BOOT_TEE_PID" 2>/dev/null || true
  fi
  exit "$1"
}

on_exit() {  # an unexpected error (set -e): don't leave children running
  local rc=$?
  if [[ $BASHPID != "$$" ]]; then exit "$rc"; fi   # a forked child: see finish
  log ERROR "entrypoint aborted ($(describe_exit "$rc"))"
  if [[ -n ${HEALTH_FILE:-} && -d ${RUN_DIR:-} ]]; then set_state failed || true; fi
  finish "$(( rc == 0 ? 1 : rc ))"
}
trap on_exit EXIT
trap 'STOP_REQUESTED=TERM' TERM
trap 'STOP_REQUESTED=INT' INT

# ---- configuration ------------------------------------------------------------------------------
# The settings the gateway shares with this script are resolved and checked once, by
# scripts/llamagw/config.py (the health server and the gateway read the same): every one of its
# checks runs here, before anything starts, and this script keeps no copy of its defaults. It
# prints NAME=value lines, or one error=MESSAGE line and exits 2.
BACKEND_TRANSPORT=${BACKEND_TRANSPORT:-unix}
case $BACKEND_TRANSPORT in
  unix|tcp) ;;
  *) fatal 2 "BACKEND_TRANSPORT must be unix or tcp, got '$BACKEND_TRANSPORT'" ;;
esac
settings_rc=0
# shellcheck disable=SC2016  # Python code, not shell
settings=$("$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); from llamagw import config
sys.exit(config.print_supervisor_settings(sys.argv[2:]))' "$SCRIPTS" "$BACKEND_TRANSPORT") \
  || settings_rc=$?
HEALTH_FILE="" LOGS_DIR=""
while IFS= read -r line; do
  case ${line%%=*} in
    error) fatal 2 "${line#*=}" ;;
    DATA_DIR|RUN_DIR|LOGS_DIR|HEALTH_FILE|HOST|PORT|PORT_HEALTH|PORT_BACKEND|BACKEND_SOCKET|\
    WORKER_TYPE|GRACEFUL_TIMEOUT|GRACEFUL_TIMEOUT_MS) printf -v "${line%%=*}" '%s' "${line#*=}" ;;
  esac
done <<< "$settings"
if (( settings_rc != 0 )) || [[ -z $HEALTH_FILE ]]; then
  fatal 1 "cannot read the configuration with $PYTHON (exit code $settings_rc, see above)"
fi
export DATA_DIR RUN_DIR WORKER_TYPE HOST PORT PORT_HEALTH PORT_BACKEND GRACEFUL_TIMEOUT \
  BACKEND_TRANSPORT BACKEND_SOCKET

mkdir -p "$RUN_DIR" || fatal 1 "cannot create RUN_DIR $RUN_DIR"
HOST_TAG=${HOSTNAME:-$(uname -n)}
HOST_TAG=${HOST_TAG//[!A-Za-z0-9._-]/_}
printf -v TS '%(%Y%m%d_%H%M%S)T' -1

# Logs: everything this script and its helpers print goes to stdout and to the boot log.
BOOT_DIR="$LOGS_DIR/_boot"
SERVER_DIR="$LOGS_DIR/llama-$WORKER_TYPE"
if ! mkdir -p "$BOOT_DIR" "$SERVER_DIR" 2>/dev/null; then
  log WARN "cannot create $LOGS_DIR; logs go to $RUN_DIR/logs instead"
  LOGS_DIR="$RUN_DIR/logs" BOOT_DIR="$RUN_DIR/logs/_boot" SERVER_DIR="$RUN_DIR/logs/llama-$WORKER_TYPE"
  mkdir -p "$BOOT_DIR" "$SERVER_DIR"
fi
BOOT_LOG="$BOOT_DIR/${TS}_boot_${HOST_TAG}.log"
SERVER_LOG="$SERVER_DIR/${TS}_server_${HOST_TAG}.log"
: >> "$BOOT_LOG"
: >> "$SERVER_LOG"
ln -sfn "$(basename "$BOOT_LOG")" "$BOOT_DIR/latest.txt"
ln -sfn "$(basename "$SERVER_LOG")" "$SERVER_DIR/latest.txt"
exec 3>&1
exec > >(tee -a "$BOOT_LOG" 3>&-) 2>&1
BOOT_TEE_PID=$!

log INFO "boot on $HOST_TAG: DATA_DIR=$DATA_DIR RUN_DIR=$RUN_DIR boot log $BOOT_LOG"

# llama-server's own settings: only this script reads them.
int_var CTX 16384 1 100000000
int_var NGL 99 0 100000
int_var PARALLEL 1 1 4096
int_var MAX_RESTARTS 5 0 1000000
secs_var MODEL_LOAD_TIMEOUT 600 1
secs_var LLAMA_STOP_TIMEOUT 10 1
secs_var RESTART_BACKOFF_INITIAL 1 1
secs_var RESTART_BACKOFF_MAX 30 1
secs_var RESTART_WINDOW 600 1
if [[ -n $BACKEND_SOCKET ]]; then
  # llama-server reads --host as a socket path only when it ends in .sock (config.py has checked
  # the rest: an absolute path that fits a Unix socket address).
  if [[ $BACKEND_SOCKET != /*.sock ]]; then
    fatal 2 "BACKEND_SOCKET must be an absolute path ending in .sock, got '$BACKEND_SOCKET'"
  fi
  if [[ -e $BACKEND_SOCKET && ! -S $BACKEND_SOCKET ]]; then
    fatal 2 "BACKEND_SOCKET=$BACKEND_SOCKET exists and is not a socket"
  fi
  BACKEND_ADDR="unix:$BACKEND_SOCKET"
else
  BACKEND_ADDR="127.0.0.1:$PORT_BACKEND"
fi
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

case $HOST in  # where to reach our own listeners
  0.0.0.0) LOCAL_ADDR=127.0.0.1 ;;
  ::) LOCAL_ADDR=::1 ;;
  *) LOCAL_ADDR=$HOST ;;
esac

# ---- models by URL (issue 30): checked here, downloaded at boot by fetch_models ----------------
fetched_model() {  # fetched_model PATH: the single model a MODEL_URL download puts at PATH
  MODEL=$1
  export MODEL_NAME="${MODEL_NAME:-$(basename "$MODEL")}"
  export MODEL_PATH="$MODEL"
  MODEL_ALIAS="${MODEL_ALIAS:-$(basename "$MODEL" .gguf)}"
}
FETCH_SPECS="" FETCH_DIR="" FETCH_SHOWN="" FETCH_NAME="" FETCH_ARGS=()
if [[ -n ${MODELS_URLS:-} ]]; then
  if [[ -z ${MODELS_DIR:-} ]]; then fatal 2 "MODELS_URLS needs MODELS_DIR (router mode)"; fi
  FETCH_SPECS=$MODELS_URLS FETCH_DIR=$MODELS_DIR
fi
if [[ -n ${MODEL_URL:-} ]]; then
  if [[ -n ${MODELS_DIR:-} ]]; then
    fatal 2 "MODEL_URL is for one model; in router mode (MODELS_DIR) list URLs in MODELS_URLS"
  fi
  FETCH_SPECS=$MODEL_URL FETCH_DIR="$DATA_DIR/models" FETCH_ARGS=(--one)  # commas and all
  if [[ -n ${MODEL_PATH:-} ]]; then  # the download goes there
    FETCH_DIR=$(dirname -- "$MODEL_PATH")
    FETCH_ARGS+=(--name "$(basename -- "$MODEL_PATH")")
  elif [[ -n ${MODEL_NAME:-} ]]; then
    FETCH_ARGS+=(--name "$MODEL_NAME")
  fi
  if [[ -n ${MODEL_SHA256:-} ]]; then FETCH_ARGS+=(--sha256 "$MODEL_SHA256"); fi
elif [[ -n ${MODEL_SHA256:-} ]]; then
  fatal 2 "MODEL_SHA256 goes with MODEL_URL (a download), which is not set"
fi
secs_var DOWNLOAD_FAIL_HOLD 10 0
if [[ -n $FETCH_SPECS ]]; then
  # The download starts now and the check runs beside it (two Python starts at once: the boot
  # is shorter by one). A bad spec: the check says why and we exit 2 before anything else
  # starts; the download (--checked) exits 2 without saying it again, or is stopped by finish.
  "$PYTHON" "$SCRIPTS/fetch_model.py" --checked --dir "$FETCH_DIR" "${FETCH_ARGS[@]}" \
    "$FETCH_SPECS" > "$RUN_DIR/fetched-models" 3>&- &
  FETCH_PID=$!
  # It prints the specs fit for the log, then the local file names known without the network.
  FETCH_SHOWN=$("$PYTHON" "$SCRIPTS/fetch_model.py" --check "${FETCH_ARGS[@]}" "$FETCH_SPECS") \
    || fatal 2 "MODEL_URL / MODELS_URLS / MODEL_SHA256 invalid (see above)"
  if [[ $FETCH_SHOWN == *$'\n'* ]]; then  # ($(...) drops an empty last line)
    FETCH_NAME=${FETCH_SHOWN#*$'\n'} FETCH_SHOWN=${FETCH_SHOWN%%$'\n'*}
  fi
  log INFO "downloading $FETCH_SHOWN into $FETCH_DIR (health 204 meanwhile)"
fi
# ---- end of models by URL -----------------------------------------------------------------------

# Router mode: the model list is checked (and llama-server's preset generated) before anything
# starts; a bad MODELS_DIR, MODELS_PRESET or MODELS_PRELOAD is exit 2.
ROUTER_MODE="" ROUTER_PRESET="" ROUTER_WAIT="" ROUTER_LOAD=""
if [[ -n ${MODELS_DIR:-} ]]; then
  ROUTER_MODE=1
  int_var MODELS_MAX 1 0 1024
  if [[ -z ${MODELS_PRESET+x} && -f $DATA_DIR/models.ini ]]; then
    MODELS_PRESET=$DATA_DIR/models.ini
  fi
  # The preset generator (body left unindented: unchanged): run now, or with MODELS_URLS once
  # they are downloaded (fetch_models, at boot).
  router_preset() {
  ROUTER_PRESET="$RUN_DIR/models-preset.ini"
  gen_args=(--models-dir "$MODELS_DIR" --out "$ROUTER_PRESET" --max "$MODELS_MAX"
    --ctx "$CTX" --ngl "$NGL" --parallel "$PARALLEL")
  if [[ -n ${MODELS_PRESET:-} ]]; then gen_args+=(--preset "$MODELS_PRESET"); fi
  if [[ -n ${MODELS_PRELOAD+x} ]]; then gen_args+=(--preload "$MODELS_PRELOAD"); fi
  if [[ -n ${MODEL_PATH:-} ]]; then gen_args+=(--default "$MODEL_PATH")
  elif [[ -n ${MODEL_NAME:-} ]]; then gen_args+=(--default "$MODEL_NAME"); fi
  gen_rc=0
  gen_out=$("$PYTHON" "$SCRIPTS/models_preset.py" "${gen_args[@]}") || gen_rc=$?
  if (( gen_rc == 2 )); then
    fatal 2 "router mode: invalid MODELS_DIR / MODELS_PRESET / MODELS_PRELOAD (see above)"
  elif (( gen_rc != 0 )); then
    fatal 1 "router mode: could not write $ROUTER_PRESET"
  fi
  MODELS_DEFAULT="" ROUTER_PRELOAD=""
  while IFS='=' read -r key value; do
    case $key in
      default) MODELS_DEFAULT=$value ;;
      preload) ROUTER_PRELOAD=$value ;;
      gateway_preload) ROUTER_LOAD=$value ;;
    esac
  done <<< "$gen_out"
  # health 200 once these are loaded: llama-server loads ROUTER_PRELOAD itself (load-on-startup),
  # ROUTER_LOAD is asked for once it answers (its load-on-startup breaks with MODELS_MAX=0).
  ROUTER_WAIT=$ROUTER_PRELOAD${ROUTER_PRELOAD:+${ROUTER_LOAD:+,}}$ROUTER_LOAD
  MODELS_PRELOAD=$ROUTER_WAIT
  # The gateway reads these; MODEL_NAME / MODEL_PATH are single-model settings (the default
  # model is MODELS_DEFAULT, by name).
  export MODELS_DIR MODELS_MAX MODELS_PRELOAD MODELS_DEFAULT
  export MODELS_PRESET_FILE=$ROUTER_PRESET
  unset MODEL_NAME MODEL_PATH MODEL_ALIAS
  MODEL="$MODELS_DIR (router mode, MODELS_MAX=$MODELS_MAX, preload: ${ROUTER_WAIT:-none})"
  }
  if [[ -z $FETCH_SPECS ]]; then
    router_preset
  else
    MODEL="$MODELS_DIR (router mode, MODELS_MAX=$MODELS_MAX; MODELS_URLS downloaded first)"
  fi
# The model: checked before anything starts (a MODEL_URL one: once downloaded, fetch_models).
elif [[ -n $FETCH_SPECS ]]; then
  MODEL="$FETCH_SHOWN (downloaded at boot into $FETCH_DIR)"
  if [[ -n $FETCH_NAME ]]; then  # known: the gateway starts during the download (boot block)
    fetched_model "$FETCH_DIR/$FETCH_NAME"
  fi
elif [[ -n ${MODEL_PATH:-} ]]; then
  MODEL=$MODEL_PATH
  WHAT="MODEL_PATH=$MODEL_PATH"
elif [[ -n ${MODEL_NAME:-} ]]; then
  MODEL="$DATA_DIR/models/$MODEL_NAME"
  WHAT="MODEL_NAME=$MODEL_NAME under $DATA_DIR/models"
else
  fatal 1 "no model: set MODEL_PATH to a .gguf file or MODEL_NAME to a file in $DATA_DIR/models"
fi
if [[ -z $ROUTER_MODE && -z $FETCH_SPECS ]]; then
  if [[ ! -f $MODEL || ! -r $MODEL ]]; then
    fatal 1 "model not found or not readable: $MODEL ($WHAT)"
  fi
  export MODEL_NAME="${MODEL_NAME:-$(basename "$MODEL")}"
  export MODEL_PATH="$MODEL"
  # The id clients see in /v1/models and /api/tags: the file name without .gguf (not a full path).
  MODEL_ALIAS="${MODEL_ALIAS:-$(basename "$MODEL" .gguf)}"
fi

# llama-server: LLAMA_SERVER_BIN, else on PATH, else next to this script (the llama.cpp image
# keeps it in /app, where this script goes too), else /app/llama-server.
if [[ -n ${LLAMA_SERVER_BIN:-} ]]; then
  LLAMA_BIN=$LLAMA_SERVER_BIN
  if [[ ! -f $LLAMA_BIN || ! -x $LLAMA_BIN ]]; then
    fatal 1 "LLAMA_SERVER_BIN=$LLAMA_BIN is not an executable file"
  fi
elif LLAMA_BIN=$(command -v llama-server); then
  :
elif [[ -f $HERE/llama-server && -x $HERE/llama-server ]]; then
  LLAMA_BIN=$HERE/llama-server
elif [[ -f /app/llama-server && -x /app/llama-server ]]; then
  LLAMA_BIN=/app/llama-server
else
  fatal 1 "llama-server not found: looked at LLAMA_SERVER_BIN (unset), PATH, $HERE/llama-server, /app/llama-server"
fi

log INFO "model $MODEL; llama-server $LLAMA_BIN; ports gateway $PORT, health $PORT_HEALTH, backend $BACKEND_ADDR"
printf '%s\n' "$$" > "$RUN_DIR/entrypoint.pid"

# ---- the three processes ------------------------------------------------------------------------
start_health() {
  "$PYTHON" "$SCRIPTS/health_server.py" 3>&- &
  HEALTH_PID=$!
  printf '%s\n' "$HEALTH_PID" > "$RUN_DIR/health_server.pid"
}

start_gateway() {
  "$PYTHON" "$SCRIPTS/gateway.py" 3>&- &
  GATEWAY_PID=$!
  printf '%s\n' "$GATEWAY_PID" > "$RUN_DIR/gateway.pid"
  log INFO "gateway started (pid $GATEWAY_PID)"
}

socket_answers() {  # socket_answers PATH: a process accepts connections on that Unix socket
  "$PYTHON" -c 'import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(1)
s.connect(sys.argv[1])' "$1" 2>/dev/null
}

LLAMA_STARTS=0
start_llama() {
  local listen=(--host 127.0.0.1 --port "$PORT_BACKEND")
  if [[ -n $BACKEND_SOCKET ]]; then
    listen=(--host "$BACKEND_SOCKET")
    # A socket file left by a killed llama-server would make its bind fail (EADDRINUSE): it goes.
    # One that a live process answers on is not ours to take.
    if [[ -S $BACKEND_SOCKET ]]; then
      if socket_answers "$BACKEND_SOCKET"; then
        fatal 2 "BACKEND_SOCKET=$BACKEND_SOCKET is in use by another process"
      fi
      rm -f "$BACKEND_SOCKET"
    fi
    SOCKET_OURS=1
  fi
  local args
  if [[ -n $ROUTER_MODE ]]; then
    # No model and no per-model flag here: router flags override every model's preset section.
    args=(--models-preset "$ROUTER_PRESET" --models-max "$MODELS_MAX" --no-models-autoload
      "${listen[@]}" --metrics "${EXTRA[@]}")
    ROUTER_LOAD_SENT=""
  else
    args=(-m "$MODEL" "${listen[@]}" -c "$CTX" -ngl "$NGL"
      -np "$PARALLEL" --metrics --alias "$MODEL_ALIAS" "${EXTRA[@]}")
  fi
  local marker
  LLAMA_STARTS=$(( LLAMA_STARTS + 1 ))
  log INFO "starting llama-server (start #$LLAMA_STARTS): $LLAMA_BIN ${args[*]}"
  printf -v marker '==== %(%Y-%m-%dT%H:%M:%S)T entrypoint: llama-server start #%d ====' -1 \
    "$LLAMA_STARTS"
  printf '%s\n' "$marker" >> "$SERVER_LOG"
  # Output to the server log and to the container's stdout (fd 3); $! stays llama-server's pid.
  # umask 077: the socket file is created 0600, so only this user may connect to it.
  (umask 077 && exec "$LLAMA_BIN" "${args[@]}") > >(tee -a "$SERVER_LOG" >&3) 2>&1 3>&- &
  LLAMA_PID=$!
  printf '%s\n' "$LLAMA_PID" > "$RUN_DIR/llama-server.pid"
}

# Failure bookkeeping: ms timestamps of recent failures, one list per process.
# shellcheck disable=SC2034  # used through the nameref in record_failure
LLAMA_FAILS=() GATEWAY_FAILS=() HEALTH_FAILS=()
BACKOFF_MS=0
record_failure() {  # record_failure LISTNAME WHAT REASON: give up, or set BACKOFF_MS
  local -n fails=$1
  local what=$2 reason=$3 kept=() t
  now_ms
  for t in "${fails[@]}"; do
    if (( NOW_MS - t < RESTART_WINDOW_MS )); then kept+=("$t"); fi
  done
  kept+=("$NOW_MS")
  fails=("${kept[@]}")
  local n=${#fails[@]}
  if (( n > MAX_RESTARTS )); then
    set_state failed
    fatal 1 "$what failed $n times within $RESTART_WINDOW s (MAX_RESTARTS=$MAX_RESTARTS), last: $reason; giving up"
  fi
  BACKOFF_MS=$RESTART_BACKOFF_INITIAL_MS
  local i
  for (( i = 1; i < n && BACKOFF_MS < RESTART_BACKOFF_MAX_MS; i++ )); do
    BACKOFF_MS=$(( BACKOFF_MS * 2 ))
  done
  (( BACKOFF_MS <= RESTART_BACKOFF_MAX_MS )) || BACKOFF_MS=$RESTART_BACKOFF_MAX_MS
  log WARN "$what: $reason; restart $n of at most $MAX_RESTARTS in $(ms_to_s "$BACKOFF_MS") s"
}

backoff() {  # interruptible wait of BACKOFF_MS
  now_ms
  local deadline=$(( NOW_MS + BACKOFF_MS ))
  while [[ -z $STOP_REQUESTED ]] && (( NOW_MS < deadline )); do
    nap "$(ms_to_s $(( deadline - NOW_MS < 200 ? deadline - NOW_MS : 200 )))"
    now_ms
  done
}

check_stop() {
  if [[ -n $STOP_REQUESTED ]]; then
    log INFO "SIG$STOP_REQUESTED received: stopping (gateway drains up to $GRACEFUL_TIMEOUT s)"
    set_state stopping
    finish 0
  fi
}

# Health server and gateway: restart when dead. Called from every wait loop.
check_helpers() {
  if [[ -n $HEALTH_PID ]] && ! kill -0 "$HEALTH_PID" 2>/dev/null; then
    reap "$HEALTH_PID"; HEALTH_PID=""
    check_stop
    if (( LAST_EXIT == 2 )); then fatal 2 "health server: bad configuration (see above)"; fi
    record_failure HEALTH_FAILS "health server" "exited ($(describe_exit "$LAST_EXIT"))"
    backoff; check_stop
    start_health
  fi
  if [[ -n $GATEWAY_PID ]] && ! kill -0 "$GATEWAY_PID" 2>/dev/null; then
    reap "$GATEWAY_PID"; GATEWAY_PID=""
    check_stop
    if (( LAST_EXIT == 2 )); then set_state failed; fatal 2 "gateway: bad configuration (see above)"; fi
    local was=$STATE
    [[ $was != ready ]] || set_state starting
    record_failure GATEWAY_FAILS gateway "exited ($(describe_exit "$LAST_EXIT"))"
    backoff; check_stop
    start_gateway
    if [[ $was == ready ]]; then wait_gateway && set_state ready; fi
  fi
}

wait_port() {  # wait_port PID NAME PORT TIMEOUT_MS: 0 accepting, 1 process died or timed out
  local pid=$1 name=$2 port=$3 timeout_ms=$4
  now_ms; local deadline=$(( NOW_MS + timeout_ms ))
  POLL_WAIT_MS=0
  until port_open "$LOCAL_ADDR" "$port"; do
    if ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    now_ms
    if (( NOW_MS >= deadline )); then
      log WARN "$name (pid $pid) not accepting on port $port after $(ms_to_s "$timeout_ms") s"
      return 1
    fi
    check_stop
    poll_nap 50
  done
}

wait_gateway() {
  while ! wait_port "$GATEWAY_PID" gateway "$PORT" "$GATEWAY_START_TIMEOUT_MS"; do
    check_stop
    if kill -0 "$GATEWAY_PID" 2>/dev/null; then fatal 1 "gateway never accepted on port $PORT"; fi
    check_helpers  # restarts it (or gives up)
  done
}

ROUTER_STATES="" ROUTER_LOAD_SENT=""
router_ready() {  # 0: every preload model loaded; 1: not yet, or failed (LOAD_FAILURE set)
  [[ -n $ROUTER_WAIT ]] || return 0
  local via=(--port "$PORT_BACKEND") load=() rc=0
  if [[ -n $BACKEND_SOCKET ]]; then via=(--socket "$BACKEND_SOCKET"); fi
  if [[ -n $ROUTER_LOAD && -z $ROUTER_LOAD_SENT ]]; then
    load=(--load "$ROUTER_LOAD")
    ROUTER_LOAD_SENT=1
  fi
  ROUTER_STATES=$("$PYTHON" "$SCRIPTS/models_ready.py" "${via[@]}" --models "$ROUTER_WAIT" \
    "${load[@]}" 3>&-) || rc=$?
  case $rc in
    0) log INFO "preload models loaded: $ROUTER_STATES"; return 0 ;;
    1) LOAD_FAILURE="preload model failed: $ROUTER_STATES"; return 1 ;;
    *) return 1 ;;
  esac
}

LOAD_FAILURE=""
wait_llama_ready() {  # 0 ready; 1 failed (LOAD_FAILURE says why)
  LOAD_FAILURE=""
  now_ms; local deadline=$(( NOW_MS + MODEL_LOAD_TIMEOUT_MS )) code
  POLL_WAIT_MS=0
  while :; do
    check_stop
    check_helpers
    if ! kill -0 "$LLAMA_PID" 2>/dev/null; then
      reap "$LLAMA_PID"; LLAMA_PID=""
      LOAD_FAILURE="llama-server exited while loading ($(describe_exit "$LAST_EXIT"))"
      return 1
    fi
    if [[ -n $BACKEND_SOCKET ]]; then
      code=$(http_code "http://localhost/health" "$LOAD_POLL_TIMEOUT" "$BACKEND_SOCKET")
    else
      code=$(http_code "http://127.0.0.1:$PORT_BACKEND/health" "$LOAD_POLL_TIMEOUT")
    fi
    if [[ $code == 200 ]]; then
      if [[ -z $ROUTER_MODE ]]; then return 0; fi
      # Router mode: /health is 200 at once; ready means the preload models are loaded.
      if router_ready; then return 0; fi
      if [[ -n $LOAD_FAILURE ]]; then
        stop_pid "$LLAMA_PID" llama-server "$LLAMA_STOP_TIMEOUT_MS"; LLAMA_PID=""
        return 1
      fi
      code="200, preload: $ROUTER_STATES"
      # each check is a Python start: not more often than every 0.1 s while models load
      if (( POLL_WAIT_MS < 100 )); then POLL_WAIT_MS=100; fi
    fi
    now_ms
    if (( NOW_MS >= deadline )); then
      LOAD_FAILURE="llama-server not ready after MODEL_LOAD_TIMEOUT=$MODEL_LOAD_TIMEOUT s (last /health: $code)"
      stop_pid "$LLAMA_PID" llama-server "$LLAMA_STOP_TIMEOUT_MS"; LLAMA_PID=""
      return 1
    fi
    poll_nap "$LOAD_POLL_INTERVAL_MS"
  done
}

supervise() {  # returns when llama-server dies; LOAD_FAILURE says why
  local which rc
  while :; do
    check_stop
    check_helpers
    # A child that died before `wait -n` starts may already be reaped and gone from the job
    # table (`wait -n` then says "no such job"): check first, and loop when wait returns nothing.
    if ! kill -0 "$LLAMA_PID" 2>/dev/null; then
      reap "$LLAMA_PID"; LLAMA_PID=""
      LOAD_FAILURE="llama-server exited while serving ($(describe_exit "$LAST_EXIT"))"
      return 0
    fi
    which="" rc=0
    wait -n -p which "$LLAMA_PID" ${GATEWAY_PID:+"$GATEWAY_PID"} ${HEALTH_PID:+"$HEALTH_PID"} \
      2>/dev/null || rc=$?
    check_stop
    if [[ -z $which ]]; then nap 0.05; continue; fi  # a signal, or "no such job": re-check
    if [[ $which == "$LLAMA_PID" ]]; then
      LLAMA_PID=""
      LOAD_FAILURE="llama-server exited while serving ($(describe_exit "$rc"))"
      return 0
    elif [[ $which == "$HEALTH_PID" ]]; then  # wait consumed its status: restart it here
      HEALTH_PID=""
      record_failure HEALTH_FAILS "health server" "exited ($(describe_exit "$rc"))"
      backoff; check_stop; start_health
    else
      GATEWAY_PID=""
      if (( rc == 2 )); then fatal 2 "gateway: bad configuration (see above)"; fi
      set_state starting
      record_failure GATEWAY_FAILS gateway "exited ($(describe_exit "$rc"))"
      backoff; check_stop; start_gateway; wait_gateway; set_state ready
    fi
  done
}

# ---- models by URL (issue 30): downloaded while the health server answers 204 --------------------
fetch_models() {  # the download (started with the check) ends: set MODEL or generate the preset
  [[ -n $FETCH_SPECS ]] || return 0
  local out="$RUN_DIR/fetched-models" rc pid=$FETCH_PID which
  health_up  # the health server started just before: its start and the download's overlap
  while :; do  # until the download ends; a signal or the health server's exit wakes us
    which="" rc=0
    wait -n -p which "$pid" ${HEALTH_PID:+"$HEALTH_PID"} 2>/dev/null || rc=$?
    which=${which:-}  # wait -p leaves it unset when a signal cut the wait short
    if [[ $which == "$pid" ]]; then break; fi
    if [[ -n $STOP_REQUESTED ]]; then  # the partial download is kept: the next boot resumes it
      stop_pid "$pid" "model download" "$HELPER_STOP_TIMEOUT_MS"; FETCH_PID=""
      check_stop
    fi
    if [[ -n $which ]]; then  # the health server (wait consumed its status): as in supervise
      HEALTH_PID=""
      record_failure HEALTH_FAILS "health server" "exited ($(describe_exit "$rc"))"
      backoff; check_stop; start_health
    elif ! kill -0 "$pid" 2>/dev/null; then  # gone before wait -n saw it: collect its status
      reap "$pid"; rc=$LAST_EXIT
      break
    fi
  done
  FETCH_PID=""
  check_stop
  if (( rc != 0 )); then
    set_state failed
    log ERROR "model download failed ($(describe_exit "$rc"), reason above): health 503 for $DOWNLOAD_FAIL_HOLD s, then exit"
    now_ms; local until=$(( NOW_MS + DOWNLOAD_FAIL_HOLD_MS ))
    while (( NOW_MS < until )); do check_stop; nap 0.1; now_ms; done
    check_stop
    fatal "$(( rc == 2 ? 2 : 1 ))" "model download failed: $FETCH_SHOWN"
  fi
  if [[ -n $ROUTER_MODE ]]; then
    router_preset
    log INFO "models downloaded; router mode: $MODEL"
  else
    local got
    got=$(head -n 1 "$out")
    [[ -f $got && -r $got ]] || fatal 1 "the downloaded model is not readable: '$got'"
    if [[ -n $GATEWAY_PID && $got != "$MODEL_PATH" ]]; then  # not where the check said
      log WARN "the download is $got, not $MODEL_PATH: restarting the gateway"
      stop_pid "$GATEWAY_PID" gateway "$(( GRACEFUL_TIMEOUT_MS + GATEWAY_KILL_MARGIN_MS ))"
      GATEWAY_PID="" MODEL_NAME="" MODEL_ALIAS=""  # they came from the predicted name
    fi
    fetched_model "$got"
    log INFO "model ready: $MODEL"
  fi
  rm -f "$out"
}
# ---- end of models by URL -----------------------------------------------------------------------

# ---- boot ---------------------------------------------------------------------------------------
health_up() {  # the health server accepts (started by start_health), or exit
  if ! wait_port "$HEALTH_PID" "health server" "$PORT_HEALTH" "$HEALTH_START_TIMEOUT_MS"; then
    check_stop
    if ! kill -0 "$HEALTH_PID" 2>/dev/null; then
      reap "$HEALTH_PID"; HEALTH_PID=""
      fatal "$(( LAST_EXIT == 2 ? 2 : 1 ))" "health server did not start ($(describe_exit "$LAST_EXIT"))"
    fi
    fatal 1 "health server not accepting on port $PORT_HEALTH"
  fi
  log INFO "health server up (pid $HEALTH_PID) on $HOST:$PORT_HEALTH: 204 while starting"
}

set_state starting
start_health  # the three start at once; health_up waits for the first once the others run
HEALTH_PENDING=1
if [[ -n $FETCH_SPECS ]]; then
  # The gateway reads the model settings: it starts now when the file name is known, else
  # once the download is done.
  if [[ -z $ROUTER_MODE && -n $FETCH_NAME ]]; then
    MODEL_DOWNLOADING=1 start_gateway  # its header read waits for the file
  fi
  fetch_models
  HEALTH_PENDING=""  # fetch_models waited for it
fi
if [[ -z $GATEWAY_PID ]]; then start_gateway; fi

while :; do
  check_stop
  start_llama
  if [[ -n $HEALTH_PENDING ]]; then health_up; HEALTH_PENDING=""; fi
  if wait_llama_ready; then
    log INFO "llama-server ready (pid $LLAMA_PID)"
    wait_gateway
    set_state ready
    log INFO "ready: gateway on $HOST:$PORT, health 200"
    supervise
  fi
  check_stop
  set_state starting
  record_failure LLAMA_FAILS llama-server "$LOAD_FAILURE"
  backoff
done
