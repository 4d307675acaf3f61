#!/usr/bin/env bash
# Train on one cloud GPU machine with every GPU it has:
#
#   docker/run.sh train --config configs/1b.yaml --set run.dir=runs/1b-lotus
#   NPROC_PER_NODE=4 IMAGE=lotus-dist:dev docker/run.sh train --config configs/350m.yaml
#
# Data, run directories and caches live on the host (LOTUS_HOME, default ./lotus-home),
# so checkpoints outlive the container and a second run resumes from them. Multi-node:
# run this on every machine with NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT set
# (docs/clusters.md).
set -euo pipefail

IMAGE=${IMAGE:-lotus-dist}
LOTUS_HOME=${LOTUS_HOME:-$PWD/lotus-home}
mkdir -p "$LOTUS_HOME"/{data,runs,cache}

env_args=()
for var in NNODES NPROC_PER_NODE NODE_RANK MASTER_ADDR MASTER_PORT NCCL_DEBUG \
    NCCL_SOCKET_IFNAME HF_TOKEN DRY_RUN; do
    if [[ -n ${!var:-} ]]; then
        env_args+=(-e "$var")
    fi
done

# --ipc=host: NCCL and data-loader workers share memory through /dev/shm, which Docker
# caps at 64 MB; where host IPC is not allowed, set SHM_SIZE (e.g. 16g) to size a private
# /dev/shm instead. memlock unlimited: NCCL/InfiniBand pin buffers; a 64 MB stack for
# deep native call stacks. --network=host: NCCL and the rendezvous need the host's
# interfaces and ports. --init: a small PID 1 passes SIGTERM on to torchrun and reaps
# zombies, and --stop-timeout leaves time for the checkpoint that SIGTERM triggers.
# The container runs as the image's uid (build with --build-arg LOTUS_UID=$(id -u) when
# yours is not 1000) so that it can write to the mounted folders.
if [[ -n ${SHM_SIZE:-} ]]; then
    ipc_args=(--shm-size="$SHM_SIZE")
else
    ipc_args=(--ipc=host)
fi
exec docker run --rm --init \
    --gpus all "${ipc_args[@]}" \
    --ulimit memlock=-1 --ulimit stack=67108864 \
    --network=host \
    --stop-timeout=300 \
    -v "$LOTUS_HOME/data:/opt/lotus/data" \
    -v "$LOTUS_HOME/runs:/opt/lotus/runs" \
    -v "$LOTUS_HOME/cache:/cache" \
    "${env_args[@]}" \
    "$IMAGE" "$@"
