#!/usr/bin/env bash
# torchrun launch, single node or multi-node (c10d rendezvous).
#   single node:  NPROC=8 launch/torchrun.sh --config configs/mixtral_8x7b_adamoe.yaml
#   multi-node:   on every node, NNODES=2 NPROC=8 MASTER_ADDR=<node0 host> launch/torchrun.sh --config ...
#   CPU test:     NPROC=2 launch/torchrun.sh --config configs/tiny_adamoe.yaml --set parallel.ep=2
# SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) / SIGHUP (SSH hang-up) to this script or to torchrun reach the workers, which
# stop after their current step with a checkpoint (moe_train/train/preemption.py); torchrun waits SHUTDOWN_TIMEOUT_S
# for them before SIGKILL (raise it for large checkpoints). torchrun itself then exits 1 (with its traceback), so
# each worker that stopped cleanly leaves a marker in MOE_TRAIN_PREEMPTED_DIR and this script exits 0 when every
# local worker did: the run is saved and the same command resumes it.
# A user mistake met after the check (e.g. on one node only) is printed by rank 0 alone (moe_train/cli.py).
set -euo pipefail
if [ "${NNODES:-1}" = "1" ]; then
  # A second single-node job on a port in use would join the first job's rendezvous and print nothing until that
  # job ends (torchrun's own behaviour): refuse it here, before torchrun starts.
  python - "${MASTER_PORT:-29500}" <<'PY' || exit 2
import socket, sys
port = int(sys.argv[1])
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("", port))
    except OSError:
        sys.exit(f"launch/torchrun.sh: port {port} is already in use on this host (another job?): "
                 f"set MASTER_PORT to a free port")
PY
fi
# The config and every input (init_from, data, out_dir, the layout at NNODES x NPROC ranks) are checked once here,
# before torchrun spawns ranks: a mistake fails with one line and exit 2 (SKIP_CHECK=1 skips; a --miniature
# replaces init_from and data, so it is not checked against them).
case " $* " in *" --miniature "*) SKIP_CHECK=1 ;; esac
if [ "${SKIP_CHECK:-0}" != "1" ]; then
  python -m moe_train.cli train "$@" --check --nnodes "${NNODES:-1}" --procs-per-node "${NPROC:-2}" || exit $?
fi
MOE_TRAIN_PREEMPTED_DIR="$(mktemp -d "${TMPDIR:-/tmp}/moe_train_preempted.XXXXXX")"
export MOE_TRAIN_PREEMPTED_DIR
trap 'rm -rf "$MOE_TRAIN_PREEMPTED_DIR"' EXIT
# torchrun runs in the background so that this shell can forward a signal sent to it (a foreground child would
# delay the trap until torchrun ends; without a trap the shell would die and leave torchrun unsignalled). A kill -9
# of this shell cannot be trapped: setpriv's parent-death signal hands torchrun a SIGTERM then, which it forwards to
# its workers (they checkpoint at the next step boundary and stop) instead of training on without a launcher.
PDEATH=()
if command -v setpriv >/dev/null 2>&1; then PDEATH=(setpriv --pdeathsig TERM --); fi
"${PDEATH[@]}" torchrun \
  --nnodes "${NNODES:-1}" \
  --nproc_per_node "${NPROC:-2}" \
  --rdzv_backend c10d \
  --rdzv_endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" \
  --rdzv_id "${RUN_ID:-moe_train}" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --shutdown-timeout "${SHUTDOWN_TIMEOUT_S:-30}" \
  -m moe_train.cli train "$@" &
pid=$!
signalled=""
for sig in TERM INT HUP USR1 QUIT; do
  # shellcheck disable=SC2064
  trap "signalled=$sig; kill -$sig $pid 2>/dev/null || true" "$sig"
done
set +e
while :; do
  wait "$pid"; rc=$?
  kill -0 "$pid" 2>/dev/null || break  # still running: the wait was cut short by a forwarded signal
done
if [ "$rc" -gt 128 ] && [ -n "$signalled" ]; then  # torchrun ended during the trap: collect its own status
  wait "$pid" 2>/dev/null; r=$?; [ "$r" -ne 127 ] && rc=$r
fi
set -e
stopped=$(find "$MOE_TRAIN_PREEMPTED_DIR" -name 'rank_*' | wc -l)
if [ "$rc" -ne 0 ] && [ "$stopped" -ge "${NPROC:-2}" ]; then
  echo "launch/torchrun.sh: all ${NPROC:-2} workers of this node stopped after a signal with a checkpoint" \
       "(torchrun's exit status $rc above is its shutdown); the same command resumes the run: exit 0" >&2
  exit 0
fi
exit "$rc"
