#!/usr/bin/env bash
# Starts this node's training process of a multi-node GPU job.
#
# Run it once on every node, with the same COORDINATOR and NUM_PROCESSES and
# each node's own PROCESS_ID (0 on the node whose address COORDINATOR names):
#
#   COORDINATOR=10.0.0.1:8476 NUM_PROCESSES=4 PROCESS_ID=0 \
#     train/launch_gpu_multinode.sh --config=configs/pod_lm.py --workdir=/shared/runs/lm
#
# Each process uses all GPUs of its node (LOCAL_DEVICE_IDS=0,1 restricts it, for
# one process per GPU). The arguments go to `python -m train`. The workdir must
# be one directory every node sees (NFS, Lustre, gs://): every process writes
# its shards of each checkpoint there.
#
# Environment:
#   COORDINATOR       HOST:PORT of process 0; the port must be free there and
#                     reachable from every node
#   NUM_PROCESSES     processes in the job (nodes, or nodes x GPUs per node)
#   PROCESS_ID        this process's index, 0 .. NUM_PROCESSES-1
#   LOCAL_DEVICE_IDS  optional, comma-separated local GPU ids of this process
#   INIT_TIMEOUT      optional, seconds to wait for all processes (default 300)
#   PYTHON            optional, the interpreter (default python3)
#   DRY_RUN=1         print the command instead of running it
#
# Under Slurm (srun) or Open MPI (mpirun), leave COORDINATOR, NUM_PROCESSES
# and PROCESS_ID unset: JAX reads the job's layout from their environment
# (one process per GPU by default).
set -euo pipefail

die() { echo "launch_gpu_multinode.sh: $*" >&2; exit 2; }

set_count=0
for v in COORDINATOR NUM_PROCESSES PROCESS_ID; do
  [[ -n "${!v:-}" ]] && set_count=$((set_count + 1))
done
if ((set_count == 0)); then
  if [[ -z "${SLURM_JOB_ID:-}" && -z "${OMPI_MCA_orte_hnp_uri:-}${PMIX_RANK:-}" ]]; then
    die "set COORDINATOR=HOST:PORT, NUM_PROCESSES and PROCESS_ID (or launch under Slurm / Open MPI)"
  fi
elif ((set_count < 3)); then
  die "COORDINATOR, NUM_PROCESSES and PROCESS_ID go together; got \
COORDINATOR='${COORDINATOR:-}' NUM_PROCESSES='${NUM_PROCESSES:-}' PROCESS_ID='${PROCESS_ID:-}'"
else
  [[ "$COORDINATOR" =~ ^.+:[0-9]+$ ]] || die "COORDINATOR='$COORDINATOR' must be HOST:PORT"
  [[ "$NUM_PROCESSES" =~ ^[0-9]+$ && "$PROCESS_ID" =~ ^[0-9]+$ ]] \
    || die "NUM_PROCESSES and PROCESS_ID must be integers"
  ((PROCESS_ID < NUM_PROCESSES)) \
    || die "PROCESS_ID=$PROCESS_ID must be in [0, NUM_PROCESSES=$NUM_PROCESSES)"
  # Read by adamw_flax.distributed.initialize (called by python -m train).
  export JAX_COORDINATOR_ADDRESS="$COORDINATOR"
  export JAX_NUM_PROCESSES="$NUM_PROCESSES"
  export JAX_PROCESS_ID="$PROCESS_ID"
fi
[[ -n "${LOCAL_DEVICE_IDS:-}" ]] && export JAX_LOCAL_DEVICE_IDS="$LOCAL_DEVICE_IDS"
[[ -n "${INIT_TIMEOUT:-}" ]] && set -- --initialization_timeout="$INIT_TIMEOUT" "$@"

cd "$(dirname "$0")/.."
cmd=("${PYTHON:-python3}" -m train "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  env | grep -E '^JAX_(COORDINATOR_ADDRESS|NUM_PROCESSES|PROCESS_ID|LOCAL_DEVICE_IDS)=' | sort
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
