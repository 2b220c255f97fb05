#!/usr/bin/env bash
# Launch a multi-node GPU bigalign training run under SLURM.
#
# Usage:
#   tools/launch_slurm.sh --config CONFIG --workdir WORKDIR [--nodes N] [--gpus-per-node G]
#       [--port PORT] [--per-node] [--heartbeat-timeout SECONDS] [--dry-run] \
#       [-- EXTRA_TRAIN_ARGS...]
#   sbatch [SBATCH_OPTIONS] tools/launch_slurm.sh --config CONFIG --workdir WORKDIR [...]
#
# Outside a SLURM allocation (no SLURM_JOB_NODELIST) the script submits itself with sbatch,
# from the repo root, passing its options on; in the allocation it starts the processes with
# one srun. The coordinator is the allocation's first host (scontrol show hostnames
# "$SLURM_JOB_NODELIST") at PORT, and every task runs
#   python -m bigalign.train --config CONFIG --workdir WORKDIR --coordinator_address=HOST:PORT \
#       --num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID EXTRA_TRAIN_ARGS...
# with SLURM_NTASKS and SLURM_PROCID read by each task. By default there is one process per
# GPU, each seeing only the SLURM_LOCALID-th of its node's GPUs (CUDA_VISIBLE_DEVICES); with
# --per-node, one process per node sees all of the node's GPUs. Every node must see the repo,
# the Python environment (the one active at submission: sbatch passes the environment on)
# and WORKDIR on a shared filesystem.
#
# Options:
#   --config CONFIG            a config file, e.g. configs/demo.py (relative to the repo root)
#   --workdir WORKDIR          where checkpoints and metrics go, shared by all nodes
#   --nodes N                  nodes to ask for (default: this file's #SBATCH --nodes)
#   --gpus-per-node G          GPUs per node (default: this file's #SBATCH --gpus-per-node)
#   --port PORT                the coordinator's port on the first host (default 12355)
#   --per-node                 one process per node, seeing all its GPUs
#   --heartbeat-timeout SECONDS  seconds after which a lost process ends the whole job
#                              (bigalign's --heartbeat_timeout_seconds; default: bigalign's)
#   --dry-run                  print the sbatch and srun commands, run none
#   -h, --help                 this text
#   -- ARGS...                 passed to bigalign.train, e.g. --config.batch_size=4096
#
# The #SBATCH lines of this file are the defaults; sbatch options (given to sbatch, or as
# SBATCH_* environment variables, e.g. SBATCH_PARTITION, SBATCH_ACCOUNT) override them.
#
# Example:
#   tools/launch_slurm.sh --nodes 4 --config configs/siglip_b16.py \
#       --workdir /shared/runs/siglip_b16 -- --config.total_steps=10000
#SBATCH --job-name=bigalign
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --output=bigalign-%j.out

set -euo pipefail

PROG=launch_slurm.sh  # under sbatch $0 is a copy of the script in SLURM's spool directory

usage() {
    # The comment block at the top of this file, without its leading "# ".
    awk 'NR == 1 { next } /^#SBATCH/ { exit } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

# The value of this file's "#SBATCH --KEY=VALUE" line.
sbatch_default() {
    awk -v prefix="#SBATCH --$1=" \
        'index($0, prefix) == 1 { print substr($0, length(prefix) + 1); exit }' "$0"
}

# die, quote, command_line, run (they read PROG and dry_run), parse_options and
# require_options come from tools/launch_common.sh. Outside an allocation (and when run by
# hand inside one, e.g. under salloc) it lies next to $0. Under sbatch it does not: $0 is then
# a copy of this script in SLURM's spool directory. But there the job's working directory is
# the repo root: the submission below passes --chdir=REPO, and a plain `sbatch
# tools/launch_slurm.sh` starts the job where it was run, in SLURM_SUBMIT_DIR (tried too, in
# case sbatch got another --chdir).
lib=""
for dir in "$(dirname "$0")" "$PWD/tools" ${SLURM_SUBMIT_DIR:+"$SLURM_SUBMIT_DIR/tools"}; do
    if [[ -f $dir/launch_common.sh ]]; then
        lib=$dir/launch_common.sh
        break
    fi
done
if [[ -z $lib ]]; then
    echo "$PROG: error: cannot find tools/launch_common.sh next to $0 or in $PWD:" \
        "start the job in the repo root" >&2
    exit 2
fi
# shellcheck source=tools/launch_common.sh
source "$lib"

dry_run=0

config="" workdir="" nodes="" gpus_per_node="" port=12355 heartbeat_timeout=""
per_node=0
# OPTION VARIABLE pairs, for parse_options.
value_options=(--config config --workdir workdir --nodes nodes --gpus-per-node gpus_per_node
               --port port --heartbeat-timeout heartbeat_timeout)
flag_options=(--per-node per_node)
parse_options "$@"
require_options --config --workdir

positive() {  # positive OPTION VALUE: VALUE is a whole number >= 1
    if ! [[ $2 =~ ^[0-9]+$ ]] || ((10#$2 < 1)); then
        die "$1 $(quote "$2"): give a whole number >= 1"
    fi
}
[[ -z $nodes ]] || positive --nodes "$nodes"
[[ -z $gpus_per_node ]] || positive --gpus-per-node "$gpus_per_node"
[[ -z $heartbeat_timeout ]] || positive --heartbeat-timeout "$heartbeat_timeout"
positive --port "$port"
((10#$port <= 65535)) || die "--port $port: give a port up to 65535"

# The srun command of the allocation whose first host is $1, on $2 nodes of $3 GPUs each.
# Each task's bash expands SLURM_* itself: they differ from task to task (hence the $... in
# single quotes, which shellcheck would flag).
# shellcheck disable=SC2016
srun_command() {
    local host=$1 num_nodes=$2 gpus=$3 tasks_per_node task
    task='exec "$@" --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"'
    if ((per_node)); then
        tasks_per_node=1
    else
        tasks_per_node=$gpus
        # The SLURM_LOCALID-th of the GPUs SLURM lets the task see, all of the node's if it
        # sets no CUDA_VISIBLE_DEVICES; one it already gave the task alone stays.
        local pick='IFS=, read -ra gpus <<< "${CUDA_VISIBLE_DEVICES:-}"; '
        pick+='if ((${#gpus[@]} > 1)); then export CUDA_VISIBLE_DEVICES=${gpus[SLURM_LOCALID]}; '
        pick+='elif ((${#gpus[@]} == 0)); then export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID; fi; '
        task=$pick$task
    fi
    local train=(python -m bigalign.train --config "$config" --workdir "$workdir"
                 "--coordinator_address=$host:$port")
    [[ -z $heartbeat_timeout ]] || train+=("--heartbeat_timeout_seconds=$heartbeat_timeout")
    srun=(srun "--nodes=$num_nodes" "--ntasks-per-node=$tasks_per_node" --kill-on-bad-exit=1
          bash -c "$task" bigalign-task "${train[@]}" "${train_args[@]}")
}

if [[ -z ${SLURM_JOB_NODELIST:-} ]]; then
    # Outside an allocation: submit this script, which then runs the branch below.
    script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
    repo=$(dirname "$(dirname "$script")")
    nodes=${nodes:-$(sbatch_default nodes)}
    gpus_per_node=${gpus_per_node:-$(sbatch_default gpus-per-node)}
    if ((per_node)); then tasks_per_node=1; else tasks_per_node=$gpus_per_node; fi
    script_args=(--config "$config" --workdir "$workdir" --gpus-per-node "$gpus_per_node"
                 --port "$port")
    ((per_node == 0)) || script_args+=(--per-node)
    [[ -z $heartbeat_timeout ]] || script_args+=(--heartbeat-timeout "$heartbeat_timeout")
    script_args+=(-- "${train_args[@]}")
    run sbatch "--nodes=$nodes" "--gpus-per-node=$gpus_per_node" \
        "--ntasks-per-node=$tasks_per_node" "--chdir=$repo" "$script" "${script_args[@]}"
    if ((dry_run)); then
        srun_command FIRST_HOST "$nodes" "$gpus_per_node"
        echo "# then, in the allocation, with FIRST_HOST the first of" \
            "\`scontrol show hostnames \"\$SLURM_JOB_NODELIST\"\`:"
        command_line "${srun[@]}"
    fi
    exit 0
fi

# In the allocation.
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
host=${hosts%%$'\n'*}
[[ -n $host ]] || die "no hosts in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
nodes=${nodes:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}}
[[ -n $nodes ]] || die "SLURM sets no SLURM_JOB_NUM_NODES: give --nodes"
if [[ -z $gpus_per_node ]]; then
    gpus_per_node=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
    gpus_per_node=${gpus_per_node##*:}  # SLURM_GPUS_PER_NODE may read TYPE:COUNT
    [[ $gpus_per_node =~ ^[0-9]+$ ]] ||
        die "cannot tell the GPUs per node from SLURM: give --gpus-per-node"
fi
srun_command "$host" "$nodes" "$gpus_per_node"
run "${srun[@]}"
