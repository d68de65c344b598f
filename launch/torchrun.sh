#!/usr/bin/env bash
# torchrun launch, single node or multi-node (c10d rendezvous).
#   single node:  NPROC=8 launch/torchrun.sh --config configs/mixtral_8x7b_adamoe.yaml
#   multi-node:   on every node, NNODES=2 NPROC=8 MASTER_ADDR=<node0 host> launch/torchrun.sh --config ...
#   CPU test:     NPROC=2 launch/torchrun.sh --config configs/tiny_adamoe.yaml --set parallel.ep=2
# SIGTERM / SIGUSR1 to torchrun reach the workers, which stop after their current step with a checkpoint
# (moe_train/train/preemption.py); torchrun waits SHUTDOWN_TIMEOUT_S for them before SIGKILL (raise it for
# large checkpoints). torchrun itself then exits non-zero; the workers exit 0.
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
exec torchrun \
  --nnodes "${NNODES:-1}" \
  --nproc_per_node "${NPROC:-2}" \
  --rdzv_backend c10d \
  --rdzv_endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" \
  --rdzv_id "${RUN_ID:-moe_train}" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --shutdown-timeout "${SHUTDOWN_TIMEOUT_S:-30}" \
  -m moe_train.cli train "$@"
