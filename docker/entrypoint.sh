#!/usr/bin/env bash
# Container entry point: lotus-train in one process, or torchrun from the environment.
#
#   docker run IMAGE train --config configs/60m.yaml --set run.dir=runs/60m
#   docker run -e NPROC_PER_NODE=8 IMAGE train --config configs/1b.yaml
#   docker run -e NNODES=2 -e NODE_RANK=0 -e MASTER_ADDR=10.0.0.1 IMAGE train ...
#   docker run -it IMAGE bash          # anything that is not a lotus-train command runs as is
#
# Environment (torchrun's names):
#   NNODES          machines in the job (default 1)
#   NPROC_PER_NODE  ranks on this machine (default: its GPU count, 1 without GPUs)
#   NODE_RANK       this machine's index, 0..NNODES-1 (default 0)
#   MASTER_ADDR     address of node 0, reachable from every node (required if NNODES > 1)
#   MASTER_PORT     TCP port on node 0 (default 29500)
#   DRY_RUN=1       print the command instead of running it
# NCCL_*, TORCH_NCCL_* and FI_* reach the ranks as set; the image's defaults (Dockerfile:
# a flight-recorder trace in runs/nccl-trace when a collective times out) apply otherwise.
# One rank on one machine runs lotus-train directly; anything more goes through torchrun.
set -euo pipefail

gpu_count() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
    fi
    echo $((n > 0 ? n : 1))
}

run() {
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        printf '%q ' "$@"
        echo
        return
    fi
    exec "$@"
}

case ${1:-} in
    train | bench | data | tokenizer | -h | --help) ;;
    "") set -- train --config configs/tiny.yaml ;;
    *) run "$@"; exit ;;  # a shell or any other program
esac

NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpu_count)}
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
for var in NNODES NPROC_PER_NODE NODE_RANK MASTER_PORT; do
    if [[ ! ${!var} =~ ^[0-9]+$ ]]; then
        echo "entrypoint: $var must be a whole number, got '${!var}'" >&2
        exit 2
    fi
done

# The flight recorder's folder, so that a dump on a timeout has somewhere to go.
if [[ ${DRY_RUN:-0} != 1 && -n ${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-} ]]; then
    mkdir -p "$(dirname "$TORCH_NCCL_DEBUG_INFO_TEMP_FILE")" ||
        echo "entrypoint: no folder for TORCH_NCCL_DEBUG_INFO_TEMP_FILE; a timeout leaves no trace" >&2
fi

if [[ $1 != train ]] || ((NNODES == 1 && NPROC_PER_NODE == 1)); then
    run lotus-train "$@"
elif ((NNODES == 1)); then
    run torchrun --standalone --nproc-per-node="$NPROC_PER_NODE" \
        --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 -m launcher "$@"
else
    if [[ -z ${MASTER_ADDR:-} ]]; then
        echo "entrypoint: NNODES=$NNODES needs MASTER_ADDR (node 0's address)" >&2
        exit 2
    fi
    if ((NODE_RANK >= NNODES)); then
        echo "entrypoint: NODE_RANK=$NODE_RANK must be below NNODES=$NNODES" >&2
        exit 2
    fi
    # Static rendezvous: every node names node 0 and its own rank, as on a cloud VM
    # fleet without a scheduler. SIGUSR1/SIGTERM reach the ranks, which checkpoint.
    run torchrun --nnodes="$NNODES" --node-rank="$NODE_RANK" \
        --nproc-per-node="$NPROC_PER_NODE" \
        --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
        --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 -m launcher "$@"
fi
