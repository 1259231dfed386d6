#!/usr/bin/env bash
# Evaluation on a TPU pod slice (default v5p-64: HOSTS=8 hosts x 4 chips): the evaluate command on every worker,
# one ssh per worker, started together; each host calls jax.distributed.initialize() (config.multihost = True in the
# tpu_v5p_64 variant) and the TPU runtime makes worker i process i.
#   launch/tpu_pod_evaluate.sh [--dry-run] TPU_NAME ZONE STAGE gs://bucket/workdir [extra flags...]
#   launch/tpu_pod_evaluate.sh my-tpu us-east5-a 2 gs://bucket/s2 --config.evaluate.prompts_file=gs://bucket/test.jsonl \
#     --config.evaluate.image_dir=gs://bucket/images --config.evaluate.gt_dir=gs://bucket/videos
# Process i owns the clips at global indices i, i + HOSTS, i + 2 HOSTS, ... (sharding.process_share): it generates
# them, config.generate.batch_size per chip at once, and scores them; process 0 writes the one summary, report and
# plots into <workdir>/evaluate. --dry-run prints each host's command instead of running it. The config string is
# the one the compile report measured (tests/benchmarks/README.md, "Compile report"): configs/stage<STAGE>.py:
# paper,tpu_v5p_64. The repo must be cloned at ~/handi-jax on every worker, as for launch/tpu_pod.sh.
set -euo pipefail
source "$(dirname "$0")/common.sh"
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
tpu=${1:?tpu name}; zone=${2:?zone}; stage=${3:?stage}; workdir=${4:?workdir}; shift 4
hosts=${HOSTS:-8}
extra=$(quote_all "$@")
pids=()
for (( host = 0; host < hosts; host++ )); do
  command=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "--worker=$host" --command
    "cd ~/handi-jax && python3 -m handi_jax.main --config=configs/stage${stage}.py:paper,tpu_v5p_64 \
--workdir=$workdir --mode=evaluate$extra")
  if (( dry_run )); then
    echo "# host $host of $hosts: clips $host, $(( host + hosts )), $(( host + 2 * hosts )), ..."
    show "${command[@]}"
  else
    "${command[@]}" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done  # every host's exit status; the last failure wins
exit "$status"
