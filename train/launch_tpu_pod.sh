#!/usr/bin/env bash
# Runs one training command on every worker of a Cloud TPU VM slice.
#
# Every worker runs the same `python -m train` command; JAX finds the slice's
# layout by itself (adamw_flax.distributed.initialize -> jax.distributed
# .initialize() with no arguments). The workdir must be a gs:// path: every
# worker writes its shards of each checkpoint there, so all of them must see
# the same directory. Rerunning the same command resumes the run.
#
# Usage:
#   train/launch_tpu_pod.sh --tpu=NAME --zone=ZONE --workdir=gs://BUCKET/PATH \
#       [--project=P] [--config=configs/pod_lm.py] [--copy] [--install] \
#       [--background] [--dry_run] [-- EXTRA TRAIN FLAGS]
#   train/launch_tpu_pod.sh --tpu=NAME --zone=ZONE --stop
#
#   --copy        copy this repository to ~/adamw_flax on every worker first
#   --install     pip install jax[tpu] and this package (editable) on every worker
#   --background  run under nohup, output in ~/adamw_flax_train.log on each worker
#   --stop        end the training processes this script started on every worker
#   --dry_run     print the gcloud commands instead of running them
#   after --       passed to python -m train, e.g. --config.trainer.num_steps=100
#
# Example:
#   train/launch_tpu_pod.sh --tpu=my-v4-32 --zone=us-central2-b --copy --install \
#       --workdir=gs://my-bucket/runs/pod_lm -- --config.optimizer.learning_rate=2e-4
set -euo pipefail

tpu="" zone="" project="" workdir="" config="configs/pod_lm.py"
copy=0 install=0 background=0 stop=0 dry_run=0
extra=()
while (($#)); do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --copy) copy=1 ;;
    --install) install=1 ;;
    --background) background=1 ;;
    --stop) stop=1 ;;
    --dry_run) dry_run=1 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "launch_tpu_pod.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

die() { echo "launch_tpu_pod.sh: $*" >&2; exit 2; }
[[ -n "$tpu" ]] || die "--tpu=NAME is required (the TPU VM's name)"
[[ -n "$zone" ]] || die "--zone=ZONE is required (e.g. us-central2-b)"
if ((!stop)); then
  [[ -n "$workdir" ]] || die "--workdir=gs://BUCKET/PATH is required"
  [[ "$workdir" == gs://* ]] || die "--workdir must be a gs:// path that every worker \
sees (got '$workdir'); a local path would give each worker its own, partial checkpoints"
fi

gcloud_args=(compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")

run() {  # run or, with --dry_run, print a command (quoted so it can be pasted)
  if ((dry_run)); then printf '%q ' "$@"; echo; else "$@"; fi
}
on_all_workers() {
  run gcloud "${gcloud_args[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$1"
}

# The pattern of the processes this script starts, for --stop.
pattern="python3 -m train --config="

if ((stop)); then
  on_all_workers "pkill -f '$pattern' || true"
  exit 0
fi

repo_dir="$(cd "$(dirname "$0")/.." && pwd)"
if ((copy)); then
  run gcloud "${gcloud_args[@]}" scp --recurse "$repo_dir" "$tpu:~/adamw_flax" "${where[@]}" \
    --worker=all
fi
if ((install)); then
  on_all_workers "cd ~/adamw_flax && pip install -U 'jax[tpu]' gcsfs && pip install -e ."
fi

printf -v flags ' %q' "--config=$config" "--workdir=$workdir" "${extra[@]}"
train_cmd="python3 -m train$flags"  # starts with $pattern
if ((background)); then
  on_all_workers "cd ~/adamw_flax && nohup $train_cmd < /dev/null > ~/adamw_flax_train.log 2>&1 &"
else
  on_all_workers "cd ~/adamw_flax && $train_cmd"
fi
