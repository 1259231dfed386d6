#!/usr/bin/env bash
# Single host (CPU, one GPU or one 8-GPU box). Usage: launch/local.sh STAGE WORKDIR [extra flags...]
#   launch/local.sh 2 runs/s2 --config.train.num_steps=1000
#   CONFIG_VARIANTS=paper,h100x8 launch/local.sh 2 runs/s2_h100
# One of several processes started by hand: set JAX_COORDINATOR_ADDRESS=host0:port, JAX_NUM_PROCESSES=N and
# JAX_PROCESS_ID=0..N-1 on each (the same command otherwise).
set -euo pipefail
stage=${1:?stage (1 or 2)}; workdir=${2:?workdir}; shift 2
cd "$(dirname "$0")/.."
exec .venv/bin/python -m handi_jax.main --config="configs/stage${stage}.py:${CONFIG_VARIANTS:-demo}" \
  --workdir="$workdir" --mode="${MODE:-train}" "$@"
