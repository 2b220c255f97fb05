#!/usr/bin/env bash
# Launch a bigalign training run on a Cloud TPU VM slice (one host or many) with gcloud.
#
# Usage:
#   tools/launch_tpu_pod.sh --name NAME --zone ZONE --accelerator-type TYPE --version RUNTIME \
#       --config CONFIG --workdir WORKDIR [--project PROJECT] [--spot] [--keep] [--log FILE] \
#       [--dry-run] [-- EXTRA_TRAIN_ARGS...]
#
# Steps, each printed before it runs:
#   1. git archive of the repo's HEAD into a tarball (uncommitted changes are not copied);
#   2. gcloud compute tpus tpu-vm create NAME (a spot VM with --spot);
#   3. gcloud compute tpus tpu-vm scp of the tarball to every worker, and over ssh on every
#      worker: unpack it into ~/bigalign, pip install "jax[tpu]", pip install -e .;
#   4. on every worker, in ~/bigalign:
#        python3 -m bigalign.train --config CONFIG --workdir WORKDIR EXTRA_TRAIN_ARGS...
#      jax.distributed finds the slice's other hosts by itself; the workers' output streams
#      to this console (and is appended to FILE with --log FILE);
#   5. gcloud compute tpus tpu-vm delete NAME, also when a step fails or on Ctrl-C once the
#      VM is being created; --keep keeps it (and prints the command that deletes it).
#
# Options:
#   --name NAME               the TPU VM's name
#   --zone ZONE               e.g. us-central2-b
#   --accelerator-type TYPE   e.g. v4-8 (one host) or v4-32 (four hosts)
#   --version RUNTIME         the TPU software version, e.g. tpu-ubuntu2204-base
#   --project PROJECT         the Google Cloud project (default: gcloud's configured one)
#   --config CONFIG           a config file relative to the repo root, e.g. configs/demo.py
#   --workdir WORKDIR         where checkpoints and metrics go; a gs:// path on a multi-host
#                             slice, since every worker reads and writes the same workdir
#   --spot                    create a spot (preemptible) VM
#   --keep                    do not delete the VM at the end
#   --log FILE                also append the training output to the local FILE
#   --dry-run                 print the commands, run none
#   -h, --help                this text
#   -- ARGS...                passed to bigalign.train, e.g. --config.batch_size=4096
#
# Example:
#   tools/launch_tpu_pod.sh --name bigalign-v4-32 --zone us-central2-b --accelerator-type v4-32 \
#       --version tpu-ubuntu2204-base --config configs/siglip_b16.py \
#       --workdir gs://my-bucket/runs/siglip_b16 -- --config.total_steps=10000

set -euo pipefail

PROG=$(basename "$0")
REPO=$(cd "$(dirname "$0")/.." && pwd)

usage() {
    # The comment block at the top of this file, without its leading "# ".
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

# die, quote, command_line, run (they read PROG and dry_run), parse_options, require_options.
# shellcheck source=tools/launch_common.sh
source "$REPO/tools/launch_common.sh"

dry_run=0

# run, with the command's output also appended to the file $1.
run_logged() {
    local log=$1
    shift
    if [[ -z $log ]]; then
        run "$@"
    elif ((dry_run)); then
        echo "$(command_line "$@") 2>&1 | tee -a $(quote "$log")"
    else
        echo "+ $(command_line "$@") 2>&1 | tee -a $(quote "$log")" >&2
        "$@" 2>&1 | tee -a "$log"
    fi
}

name="" zone="" accelerator_type="" runtime="" project="" config="" workdir="" log=""
spot=0 keep=0
# OPTION VARIABLE pairs, for parse_options.
value_options=(--name name --zone zone --accelerator-type accelerator_type --version runtime
               --project project --config config --workdir workdir --log log)
flag_options=(--spot spot --keep keep)
parse_options "$@"
require_options --name --zone --accelerator-type --version --config --workdir

[[ $config != /* ]] || die "--config $config: give the config file relative to the repo root" \
    "(the workers get the repo's files), e.g. configs/demo.py"

# A slice of more than 8 (TensorCores on v2-v4 and v5p, chips on v5e and v6e) has more than
# one host; a type whose size cannot be read is taken to have many.
size=${accelerator_type##*-}
if [[ $size =~ ^[0-9]+$ ]] && ((10#$size <= 8)); then
    multi_host=0
else
    multi_host=1
fi
if ((multi_host)) && [[ $workdir != gs://* ]]; then
    die "--workdir $workdir: $accelerator_type is a multi-host slice, whose workers all write" \
        "the same workdir: give a gs:// path"
fi

gcloud_flags=(--zone "$zone")
[[ -z $project ]] || gcloud_flags+=(--project "$project")

if ((dry_run)); then
    tmpdir="${TMPDIR:-/tmp}/bigalign-launch.XXXXXX"  # made by mktemp -d in a real run
else
    tmpdir=$(mktemp -d)
fi
tarball="$tmpdir/bigalign.tar.gz"

# none: nothing made yet; creating: the create command is running; created: the VM exists.
tpu_state=none
interrupted=0

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local delete=(gcloud compute tpus tpu-vm delete "$name" "${gcloud_flags[@]}" --quiet)
    if [[ $tpu_state == created || ($tpu_state == creating && $interrupted == 1) ]]; then
        if ((keep)); then
            echo "$PROG: keeping the TPU VM $name; delete it with:" \
                "$(command_line "${delete[@]}")" >&2
        elif ! run "${delete[@]}"; then
            echo "$PROG: warning: deleting the TPU VM $name failed; delete it with:" \
                "$(command_line "${delete[@]}")" >&2
            ((status != 0)) || status=1
        fi
    elif [[ $tpu_state == creating ]]; then
        echo "$PROG: creating the TPU VM $name failed; if it was made nonetheless, delete it" \
            "with: $(command_line "${delete[@]}")" >&2
    fi
    ((dry_run)) || rm -rf "$tmpdir"
    exit "$status"
}
trap cleanup EXIT
trap 'interrupted=1; exit 130' INT
trap 'interrupted=1; exit 143' TERM

if ! git -C "$REPO" diff --quiet HEAD 2>/dev/null; then
    echo "$PROG: note: the workers get the repo's HEAD; uncommitted changes are not copied" >&2
fi
run git -C "$REPO" archive --format=tar.gz --output="$tarball" HEAD

create=(gcloud compute tpus tpu-vm create "$name" "${gcloud_flags[@]}"
        --accelerator-type "$accelerator_type" --version "$runtime")
((spot == 0)) || create+=(--spot)
tpu_state=creating
run "${create[@]}"
tpu_state=created

run gcloud compute tpus tpu-vm scp "$tarball" "$name:" --worker=all "${gcloud_flags[@]}"

# The remote commands run in the home directory, where scp put the tarball.
install='set -e; rm -rf bigalign; mkdir bigalign; tar -xzf bigalign.tar.gz -C bigalign; cd bigalign'
install+='; python3 -m pip install "jax[tpu]" && python3 -m pip install -e .'
run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${gcloud_flags[@]}" --command "$install"

train="cd bigalign && $(command_line python3 -m bigalign.train --config "$config" \
    --workdir "$workdir" "${train_args[@]}")"
run_logged "$log" gcloud compute tpus tpu-vm ssh "$name" --worker=all "${gcloud_flags[@]}" \
    --command "$train"
