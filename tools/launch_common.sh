# shellcheck shell=bash
# Helpers shared by the launchers tools/launch_tpu_pod.sh and tools/launch_slurm.sh: a library
# to `source`, not to run. It only defines functions, and sets no shell options (the launchers
# set their own).
#
#   die MESSAGE...           print "$PROG: error: MESSAGE (see --help)" to stderr, exit 2
#   quote ARG                ARG as the shell reads it: bare when it has no special
#                            characters, else in single quotes
#   command_line ARGV...     ARGV as one paste-able, shell-quoted line (with a newline)
#   run ARGV...              print ARGV, then run it unless it is a dry run
#   parse_options ARGS...    read the launcher's command line: set its option variables,
#                            dry_run and the array train_args
#   require_options OPTION...  die "missing OPTION..." for those of OPTION... not given
#
# The functions read the caller's variables PROG (the launcher's name, for messages) and
# dry_run (1: print the commands, run none; 0: run them); parse_options and require_options
# also the caller's arrays value_options and flag_options, and its function usage.
# shellcheck disable=SC2154  # PROG, dry_run, value_options and flag_options are the caller's

die() {
    echo "$PROG: error: $* (see --help)" >&2
    exit 2
}

# One argument as the shell reads it: bare when it has no special characters, else in single
# quotes, so that a printed command can be pasted back.
quote() {
    if [[ -n $1 && $1 =~ ^[A-Za-z0-9_./:=,@+%^-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

command_line() {
    local arg line=""
    for arg in "$@"; do
        line+="$(quote "$arg") "
    done
    printf '%s\n' "${line% }"
}

# Print a command, then run it unless dry_run is 1. In a dry run the commands go to stdout
# bare (paste-able); in a real run to stderr after "+ ", like `set -x`.
run() {
    if ((dry_run)); then
        command_line "$@"
    else
        echo "+ $(command_line "$@")" >&2
        "$@"
    fi
}

# variable_of OPTION OPTION1 VARIABLE1 OPTION2 VARIABLE2...: print the VARIABLE paired with
# OPTION; fail where there is none.
variable_of() {
    local option=$1
    shift
    while (($# >= 2)); do
        if [[ $1 == "$option" ]]; then
            printf '%s' "$2"
            return 0
        fi
        shift 2
    done
    return 1
}

# parse_options "$@": the launcher's arguments into the variables named by the caller's arrays
#   value_options  OPTION VARIABLE pairs of the options with a value: VARIABLE=the value
#   flag_options   OPTION VARIABLE pairs of the options without: VARIABLE=1
# --option=value counts as --option value; --dry-run sets dry_run=1; -h/--help prints usage and
# exits 0; the arguments after "--" go to the array train_args (for bigalign, as they are);
# anything else dies.
# shellcheck disable=SC2034  # train_args and dry_run are the caller's
parse_options() {
    local words=() variable
    while (($#)); do  # --option=value becomes --option value, up to the "--"
        case $1 in
            --) words+=("$@"); break ;;
            --*=*) words+=("${1%%=*}" "${1#*=}") ;;
            *) words+=("$1") ;;
        esac
        shift
    done
    set -- "${words[@]}"
    train_args=()
    while (($#)); do
        if variable=$(variable_of "$1" "${value_options[@]}"); then
            (($# >= 2)) || die "$1 needs a value"
            printf -v "$variable" '%s' "$2"
            shift 2
        elif variable=$(variable_of "$1" "${flag_options[@]}"); then
            printf -v "$variable" 1
            shift
        else
            case $1 in
                --dry-run) dry_run=1; shift ;;
                -h | --help) usage; exit 0 ;;
                --) shift; train_args=("$@"); break ;;
                *) die "unknown argument $(quote "$1")" ;;
            esac
        fi
    done
}

# require_options OPTION...: die "missing OPTION..." naming those of the options (of
# value_options) whose variable is empty, in the order given.
require_options() {
    local option variable missing=()
    for option in "$@"; do
        variable=$(variable_of "$option" "${value_options[@]}")
        [[ -n ${!variable} ]] || missing+=("$option")
    done
    ((${#missing[@]} == 0)) || die "missing ${missing[*]}"
}
