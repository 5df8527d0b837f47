#!/usr/bin/env bash
# Render the `accelerate launch` command line of this node from the SLURM environment.
#
#   source scripts/slurm/render_launch.sh; rlx_launch_cmd CONFIG_FILE recipe=NAME key=value ...
#   bash scripts/slurm/render_launch.sh CONFIG_FILE recipe=NAME ...     # prints the line (dry run)
#
# Reads (set by SLURM, or faked by a test):
#   SLURM_NNODES               number of machines
#   SLURM_NODEID               this machine's rank (falls back to SLURM_PROCID: one task per node)
#   SLURM_JOB_NODELIST         hosts; the first is the main process (expanded with `scontrol show hostnames`)
#   SLURM_GPUS_ON_NODE         GPUs per node (else GPUS_PER_NODE, else 8)
#   MAIN_PROCESS_PORT          rendezvous port (default 29500)
#   RLX_ACCELERATE             the accelerate command (default: `accelerate` on PATH), e.g. /opt/venv/bin/accelerate
# Prints one line: the command, each argument shell-quoted, so it can be eval'ed or compared in a test.
# It runs `-m rlx.train`: the installed rlx (pip install or make setup), with recipes shipped in the package.

_rlx_first_host() {
    # `scontrol show hostnames` expands compact lists such as gpu[001-002]; tests stub `scontrol`.
    if command -v scontrol >/dev/null 2>&1; then
        # No `| head -n 1`: under pipefail, scontrol's SIGPIPE would fail the pipeline at random.
        local hosts
        hosts="$(scontrol show hostnames "$1")" || return 2
        echo "${hosts%%$'\n'*}"
    else
        # Without scontrol, accept a plain comma-separated list (no bracket ranges).
        case "$1" in
            *\[*) echo "render_launch: cannot expand '$1' without scontrol" >&2; return 2 ;;
        esac
        echo "${1%%,*}"
    fi
}

rlx_launch_cmd() {
    local config_file="$1"
    shift
    local nnodes="${SLURM_NNODES:?SLURM_NNODES is not set: run inside an allocation (sbatch/salloc)}"
    local node_rank="${SLURM_NODEID:-${SLURM_PROCID:?neither SLURM_NODEID nor SLURM_PROCID is set}}"
    local nodelist="${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}"
    local gpus="${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE:-8}}"
    gpus="${gpus##*:}" # SLURM may report "type:count"
    local port="${MAIN_PROCESS_PORT:-29500}"
    local main_ip
    main_ip="$(_rlx_first_host "$nodelist")" || return 2
    local nproc=$((nnodes * gpus))
    local -a cmd=(${RLX_ACCELERATE:-accelerate} launch
        --config_file "$config_file"
        --num_machines "$nnodes"
        --num_processes "$nproc"
        --machine_rank "$node_rank"
        --main_process_ip "$main_ip"
        --main_process_port "$port"
        --rdzv_backend static
        --same_network
        -m rlx.train "$@")
    printf '%q ' "${cmd[@]}" | sed 's/ $//'
    echo
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    if [[ $# -lt 1 ]]; then
        echo "usage: $0 CONFIG_FILE recipe=NAME [key=value ...]" >&2
        exit 2
    fi
    rlx_launch_cmd "$@"
fi
