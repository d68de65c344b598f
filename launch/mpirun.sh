#!/usr/bin/env bash
# mpirun launch: MPI gives rank / size / master (mpi4py broadcasts rank 0's host), torch.distributed does the rest.
#   NP=2 launch/mpirun.sh --config configs/tiny_adamoe.yaml --set parallel.ep=2
# Open MPI refuses to run as root unless told: OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.
# Multi-node: add a hostfile (MPI_ARGS="--hostfile hosts --map-by ppr:8:node").
set -euo pipefail
exec mpirun -np "${NP:-2}" ${MPI_ARGS:---oversubscribe} python -m moe_train.cli train "$@"
