#!/usr/bin/env bash
# torchrun launch, single node or multi-node (c10d rendezvous).
#   single node:  NPROC=8 launch/torchrun.sh --config configs/mixtral_8x7b_adamoe.yaml
#   multi-node:   on every node, NNODES=2 NPROC=8 MASTER_ADDR=<node0 host> launch/torchrun.sh --config ...
#   CPU test:     NPROC=2 launch/torchrun.sh --config configs/tiny_adamoe.yaml --set parallel.ep=2
# SIGTERM / SIGUSR1 to torchrun reach the workers, which stop after their current step with a checkpoint
# (moe_train/train/preemption.py); torchrun waits SHUTDOWN_TIMEOUT_S for them before SIGKILL (raise it for
# large checkpoints). torchrun itself then exits non-zero; the workers exit 0.
set -euo pipefail
exec torchrun \
  --nnodes "${NNODES:-1}" \
  --nproc_per_node "${NPROC:-2}" \
  --rdzv_backend c10d \
  --rdzv_endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" \
  --rdzv_id "${RUN_ID:-moe_train}" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  --shutdown-timeout "${SHUTDOWN_TIMEOUT_S:-30}" \
  -m moe_train.cli train "$@"
