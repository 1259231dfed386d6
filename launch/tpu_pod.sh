#!/usr/bin/env bash
# A TPU pod slice (default v5p-64: 8 hosts x 4 chips). Runs the same command on every worker; each host
# calls jax.distributed.initialize() (config.multihost = True in the tpu_v5p_64 variant).
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE STAGE gs://bucket/workdir [extra flags...]
# --dry-run prints the command instead of running it. The config string is the one the compile report measured
# (tests/benchmarks/README.md, "Compile report"): configs/stage<STAGE>.py:paper,tpu_v5p_64.
# The repo must be cloned at ~/handi-jax on every worker with `pip install -r requirements.txt "jax[tpu]==0.7.1"`.
set -euo pipefail
dry_run=0
source "$(dirname "$0")/common.sh"
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
tpu=${1:?tpu name}; zone=${2:?zone}; stage=${3:?stage}; workdir=${4:?workdir}; shift 4
extra=$(quote_all "$@")
command=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command
  "cd ~/handi-jax && python3 -m handi_jax.main --config=configs/stage${stage}.py:paper,tpu_v5p_64 \
--workdir=$workdir --mode=train$extra")
if (( dry_run )); then show "${command[@]}"; exit 0; fi
"${command[@]}"
