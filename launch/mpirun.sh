#!/usr/bin/env bash
# mpirun launch: MPI gives rank / size / master (mpi4py broadcasts rank 0's host), torch.distributed does the rest.
#   NP=2 launch/mpirun.sh --config configs/tiny_adamoe.yaml --set parallel.ep=2
# Open MPI refuses to run as root unless told: OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.
# Multi-node: add a hostfile (MPI_ARGS="--hostfile hosts --map-by ppr:8:node").
# The config and every input are checked once for NP ranks before mpirun starts them (exit 2, one line;
# SKIP_CHECK=1 skips).
set -euo pipefail
case " $* " in *" --miniature "*) SKIP_CHECK=1 ;; esac
if [ "${SKIP_CHECK:-0}" != "1" ]; then
  python -m moe_train.cli train "$@" --check --nnodes 1 --procs-per-node "${NP:-2}" || exit $?
fi
exec mpirun -np "${NP:-2}" ${MPI_ARGS:---oversubscribe} python -m moe_train.cli train "$@"
