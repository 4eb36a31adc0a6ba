#!/usr/bin/env bash
# bench/peers.sh - pushsvc side by side with the peer WebSocket servers, in ONE run.
#
# 1. copies the shared harness (../shared/peers beside the repo) to bench/.work/peers
#    (refreshed when the shared copy changed; node_modules/.venv/results are kept);
# 2. installs it (npm ci + .venv with pip) when needed;
# 3. runs its run_all.sh: the peers, then pushsvc as a `ws-json` peer (WS_JSON_ARGS),
#    started by the harness on a fresh data directory with bench/bench.toml;
# 4. writes bench/results/<date>-peers.md (+ latest-peers.md and the JSON lines),
#    prefixed with a description of the machine.
#
# Settings (environment; the harness's own defaults in brackets):
#   N [1000] subscribers, T [10] s per run, C [10000] idle connections, RUNS [1],
#   SCENARIOS [fanout,latency,idle], PEERS [run_all.sh's list; "none" = pushsvc only],
#   and every other run_all.sh variable (W, R, PROBES, WAIT_QUIET, SERVER_CPU, ...).
#   PUSHSVC=0            run the peers only (pushsvc not needed; WS_JSON_ARGS passed through)
#   PUSHSVC_BIN [<repo>/.venv/bin/pushsvc]   PUSHSVC_PORT [8899]
#   PUSHSVC_CONFIG [<repo>/bench/bench.toml] PUSHSVC_ARGS  more load.py options for pushsvc
#   SKIP_INSTALL=1       skip npm ci / pip    FORCE_INSTALL=1  reinstall the harness
#   PEERS_SRC            harness to copy [<repo>/../shared/peers]
set -euo pipefail

die() { echo "peers.sh: error: $*" >&2; exit 2; }
say() { echo "peers.sh: $*" >&2; }
sq() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }   # single-quote for eval/shlex

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH/.." && pwd)
SRC=${PEERS_SRC:-$REPO/../shared/peers}
WORK=$BENCH/.work
HARNESS=$WORK/peers
RESULTS=$BENCH/results

# ------------------------------------------------------------------ prerequisites
[ -f "$SRC/run_all.sh" ] || die "no harness at $SRC (expected the shared folder beside the repo: $REPO/../shared/peers; set PEERS_SRC)"
SRC=$(cd "$SRC" && pwd)
for tool in node npm python3 taskset nproc sha256sum; do
  command -v "$tool" >/dev/null || die "'$tool' is not installed (the harness needs Node 20+, Python 3.11+, taskset)"
done
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "python3 is $(python3 -V 2>&1); the harness needs 3.11+"
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 20 ] || die "node is $(node --version); the harness needs Node 20+"
cpus=$(nproc)
for v in "${SERVER_CPU:-0}" "${LOADER_CPU:-1}"; do
  [[ "$v" =~ ^[0-9]+$ ]] && [ "$v" -lt "$cpus" ] || die "CPU '$v' (SERVER_CPU/LOADER_CPU) not available: this machine has $cpus CPU(s); the harness needs 2+"
done
for v in N T C RUNS; do
  val=${!v:-}
  [ -z "$val" ] || [[ "$val" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "$v='$val' is not a number"
done
[[ "${RUNS:-1}" =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a whole number >= 1"

mkdir -p "$WORK" "$RESULTS"
exec 9>"$WORK/.lock"
flock -n 9 || die "another bench/peers.sh is running (lock $WORK/.lock)"

# ------------------------------------------------------------------ copy the harness
fingerprint() {   # hash of the harness sources (not its installs or results)
  (cd "$1" && find . \( -path ./node_modules -o -path ./.venv -o -path ./results \) -prune \
      -o -type f ! -name '.installed-*' -print | LC_ALL=C sort | xargs -d '\n' sha256sum) | sha256sum | cut -d' ' -f1
}
if [ ! -f "$HARNESS/run_all.sh" ]; then
  say "copying the harness $SRC -> $HARNESS"
  rm -rf "$HARNESS.tmp"
  cp -r "$SRC" "$HARNESS.tmp"
  chmod -R u+w "$HARNESS.tmp"
  mv "$HARNESS.tmp" "$HARNESS"
elif [ "$(fingerprint "$SRC")" != "$(fingerprint "$HARNESS")" ]; then
  say "the shared harness changed: refreshing the sources in $HARNESS (installs and results kept)"
  chmod -R u+w "$HARNESS"
  cp -r "$SRC/." "$HARNESS/"
  chmod -R u+w "$HARNESS"
fi

# ------------------------------------------------------------------ install it
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  npm_stamp="$(sha256sum < "$SRC/package-lock.json" | cut -d' ' -f1) node $(node --version)"
  if [ "${FORCE_INSTALL:-0}" = 1 ] || [ ! -d "$HARNESS/node_modules" ] \
     || [ "$(cat "$HARNESS/.installed-npm" 2>/dev/null)" != "$npm_stamp" ]; then
    say "installing node packages (npm ci) in $HARNESS"
    (cd "$HARNESS" && npm ci --no-audit --no-fund >&2) || die "npm ci failed in $HARNESS"
    echo "$npm_stamp" > "$HARNESS/.installed-npm"
  fi
  pip_stamp="$(sha256sum < "$SRC/requirements.txt" | cut -d' ' -f1) $(python3 -V 2>&1)"
  if [ "${FORCE_INSTALL:-0}" = 1 ] || ! "$HARNESS/.venv/bin/python" -c '' 2>/dev/null \
     || [ "$(cat "$HARNESS/.installed-pip" 2>/dev/null)" != "$pip_stamp" ]; then
    say "installing python packages (.venv + pip) in $HARNESS"
    "$HARNESS/.venv/bin/python" -c '' 2>/dev/null || { rm -rf "$HARNESS/.venv"; python3 -m venv "$HARNESS/.venv"; }
    "$HARNESS/.venv/bin/pip" install -q --disable-pip-version-check -r "$HARNESS/requirements.txt" >&2 \
      || die "pip install failed in $HARNESS/.venv"
    echo "$pip_stamp" > "$HARNESS/.installed-pip"
  fi
fi
[ -d "$HARNESS/node_modules" ] && [ -x "$HARNESS/.venv/bin/python" ] \
  || die "the harness in $HARNESS is not installed (run without SKIP_INSTALL=1)"

# ------------------------------------------------------------------ pushsvc as ws-json peer
PUSHSVC=${PUSHSVC:-1}
PUSHSVC_BIN=${PUSHSVC_BIN:-$REPO/.venv/bin/pushsvc}
PUSHSVC_PORT=${PUSHSVC_PORT:-8899}
PUSHSVC_CONFIG=${PUSHSVC_CONFIG:-$BENCH/bench.toml}
DATA_DIR=""
cleanup() { if [ -n "$DATA_DIR" ] && [ -d "$DATA_DIR" ]; then rm -rf -- "$DATA_DIR"; fi; }
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM HUP

pushsvc_version="-"
if [ "$PUSHSVC" = 1 ]; then
  [ -z "${WS_JSON_ARGS:-}" ] || die "WS_JSON_ARGS is set, but peers.sh sets it for pushsvc: add load.py options with PUSHSVC_ARGS, or run with PUSHSVC=0 to use your own WS_JSON_ARGS"
  [ -x "$PUSHSVC_BIN" ] || die "no pushsvc at $PUSHSVC_BIN. Install it into the repo's venv:
    cd $REPO && python3 -m venv .venv && .venv/bin/pip install -e '.[uvloop]'
  (or PUSHSVC_BIN=/path/to/pushsvc, or PUSHSVC=0 to measure the peers only)"
  [ -f "$PUSHSVC_CONFIG" ] || die "no config at $PUSHSVC_CONFIG"
  PUSHSVC_CONFIG=$(cd "$(dirname "$PUSHSVC_CONFIG")" && pwd)/$(basename "$PUSHSVC_CONFIG")
  [[ "$PUSHSVC_PORT" =~ ^[0-9]+$ ]] || die "PUSHSVC_PORT='$PUSHSVC_PORT' is not a port"
  python3 - "$PUSHSVC_PORT" <<'EOF' || die "port $PUSHSVC_PORT on 127.0.0.1 is in use (a leftover server?): the harness would measure that process. Stop it or set PUSHSVC_PORT"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
  token_cmd="$(sq "$PUSHSVC_BIN") token --sub bench --ttl 3600 --config $(sq "$PUSHSVC_CONFIG")"
  say "checking the token command: $token_cmd"
  tok_rc=0
  tok_out=$(cd "$HARNESS" && timeout 30 bash -c "$token_cmd" 2>"$WORK/token.err" </dev/null) || tok_rc=$?
  [ "$tok_rc" -eq 0 ] || die "the token command failed (exit $tok_rc$([ "$tok_rc" -ne 124 ] || echo ": timed out after 30 s")):
$(head -c 1500 "$WORK/token.err")"
  [ -n "$(printf '%s\n' "$tok_out" | awk 'NF' | tail -n 1)" ] || die "the token command printed no token"
  bindir=$(dirname "$PUSHSVC_BIN")
  if [ -x "$bindir/python" ]; then
    pushsvc_version=$("$bindir/python" -c 'import pushsvc; print(getattr(pushsvc, "__version__", "?"))' 2>/dev/null || echo "?")
  fi
  DATA_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pushsvc-bench-data.XXXXXX")
  server_cmd="$(sq "$PUSHSVC_BIN") serve --config $(sq "$PUSHSVC_CONFIG") --port $PUSHSVC_PORT --data-dir $(sq "$DATA_DIR")"
  WS_JSON_ARGS="--label pushsvc --url ws://127.0.0.1:$PUSHSVC_PORT/ws --token-cmd $(sq "$token_cmd")"
  WS_JSON_ARGS+=" --server-cmd $(sq "$server_cmd") --server-loop $(sq "${PUSHSVC_LOOP:-uvloop + tornado (pushsvc $pushsvc_version)}")"
  WS_JSON_ARGS+=" ${PUSHSVC_ARGS:-}"
  export WS_JSON_ARGS
fi
PEERS_SHOWN=${PEERS:-}
if [ "${PEERS:-}" = none ]; then export PEERS=" "; fi   # run_all.sh: non-empty, no peer

commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "none yet")
if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit+="-dirty"; fi
export TAG=${TAG:-"pushsvc $pushsvc_version @ $commit"}

# ------------------------------------------------------------------ run
stamp=$(date +%Y-%m-%d_%H%M%S)
before=$(cd "$HARNESS" && ls results/*.jsonl 2>/dev/null || true)
settings="N=${N:-1000} T=${T:-10} C=${C:-10000} RUNS=${RUNS:-1} SCENARIOS=${SCENARIOS:-fanout,latency,idle}"
[ -z "$PEERS_SHOWN" ] || settings+=" PEERS=\"$PEERS_SHOWN\""
[ "$PUSHSVC" = 1 ] || settings+=" PUSHSVC=0"
say "running the harness: $settings (peers: ${PEERS_SHOWN:-run_all.sh default}${WS_JSON_ARGS:+, then pushsvc}); log: $WORK/last-run.log"
set +e
SKIP_INSTALL=1 "$HARNESS/run_all.sh" 2>&1 | tee "$WORK/last-run.log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -ne 130 ] || { say "interrupted"; exit 130; }

new=()
while IFS= read -r f; do
  if [ -n "$f" ] && ! grep -qxF "$f" <<<"$before"; then new+=("$f"); fi
done < <(cd "$HARNESS" && ls results/*.jsonl 2>/dev/null || true)
[ "${#new[@]}" -gt 0 ] && [ -s "$HARNESS/results/latest.md" ] \
  || die "the harness wrote no results (exit $rc); see $WORK/last-run.log"

# ------------------------------------------------------------------ results
copied=()
if [ "${#new[@]}" -eq 1 ]; then
  cp "$HARNESS/${new[0]}" "$RESULTS/$stamp-peers.jsonl"; copied+=("$stamp-peers.jsonl")
else
  k=0
  for f in "${new[@]}"; do
    k=$((k + 1)); cp "$HARNESS/$f" "$RESULTS/$stamp-peers-run$k.jsonl"; copied+=("$stamp-peers-run$k.jsonl")
  done
fi

pyver() { [ -x "$1" ] && "$1" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo "-"; }
tornado_of() { [ -x "$1" ] && "$1" -c 'import tornado; print(tornado.version)' 2>/dev/null || echo "-"; }
cpu_model=$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)
sockets=$(lscpu 2>/dev/null | sed -n 's/^Socket(s):[[:space:]]*//p' | head -n 1)
per_socket=$(lscpu 2>/dev/null | sed -n 's/^Core(s) per socket:[[:space:]]*//p' | head -n 1)
threads=$(lscpu 2>/dev/null | sed -n 's/^Thread(s) per core:[[:space:]]*//p' | head -n 1)
mem=$(awk '/^MemTotal:/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
repo_py=$(dirname "$PUSHSVC_BIN")/python
md="$RESULTS/$stamp-peers.md"
{
  if [ "$PUSHSVC" = 1 ]; then title="pushsvc beside the peer servers"; else title="the peer servers (pushsvc not run)"; fi
  echo "# Peer benchmark: $title ($stamp)"
  echo
  echo "Command: \`$settings bench/peers.sh\` (harness: \`run_all.sh\` from \`../shared/peers\`)."
  echo
  echo "| machine | |"
  echo "|---|---|"
  echo "| CPU | ${cpu_model:-?} |"
  echo "| cores | $(nproc) online (${sockets:-?} socket(s) × ${per_socket:-?} core(s) × ${threads:-?} thread(s)); server on CPU ${SERVER_CPU:-0}, loader on CPU ${LOADER_CPU:-1} |"
  echo "| memory | $mem |"
  echo "| kernel | $(uname -sr) |"
  echo "| python | $(python3 -V 2>&1 | cut -d' ' -f2) (harness venv $(pyver "$HARNESS/.venv/bin/python"), pushsvc venv $(pyver "$repo_py")) |"
  echo "| node | $(node --version) |"
  echo "| tornado | pushsvc venv $(tornado_of "$repo_py"), harness venv $(tornado_of "$HARNESS/.venv/bin/python") (\`tornado-naive\`) |"
  echo "| pushsvc | $([ "$PUSHSVC" = 1 ] && echo "version $pushsvc_version, commit $commit, \`${PUSHSVC_BIN#"$REPO"/}\`, config \`${PUSHSVC_CONFIG#"$REPO"/}\`" || echo "not run") |"
  echo
  echo "Raw results (bench/results/): $(printf '%s ' "${copied[@]}")- figures compare only inside this run."
  if [ "$rc" -ne 0 ]; then
    echo
    echo "**run_all.sh exited with $rc: at least one peer/scenario failed (see the failed cells).**"
  fi
  echo
  echo "---"
  echo
  cat "$HARNESS/results/latest.md"
} > "$md"
cp "$md" "$RESULTS/latest-peers.md"

say "results: $md (also bench/results/latest-peers.md), $(printf 'bench/results/%s ' "${copied[@]}")"
if [ "$rc" -ne 0 ]; then
  say "run_all.sh exited with $rc: a peer or scenario failed; see the tables, $WORK/last-run.log and $HARNESS/results/logs/"
  if [ "$PUSHSVC" = 1 ] && [ -s "$HARNESS/results/logs/pushsvc.log" ]; then
    say "last lines of the pushsvc server log ($HARNESS/results/logs/pushsvc.log):"
    tail -n 15 "$HARNESS/results/logs/pushsvc.log" >&2
  fi
  exit "$rc"
fi
