#!/usr/bin/env bash
# A TPU pod slice (default v5p-64: 8 hosts x 4 chips). Runs the same command on every worker; each host
# calls jax.distributed.initialize() (config.multihost = True in the tpu_v5p_64 variant).
#   launch/tpu_pod.sh TPU_NAME ZONE STAGE gs://bucket/workdir [extra flags...]
# The repo must be cloned at ~/handi-jax on every worker with `pip install -r requirements.txt "jax[tpu]==0.7.1"`.
set -euo pipefail
tpu=${1:?tpu name}; zone=${2:?zone}; stage=${3:?stage}; workdir=${4:?workdir}; shift 4
printf -v extra '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/handi-jax && python3 -m handi_jax.main --config=configs/stage${stage}.py:paper,tpu_v5p_64 \
   --workdir=$workdir --mode=train $extra"
