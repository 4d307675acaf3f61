#!/usr/bin/env bash
# Train on one cloud GPU machine with every GPU it has:
#
#   docker/run.sh train --config configs/1b.yaml --set run.dir=runs/1b-lotus
#   NPROC_PER_NODE=4 IMAGE=lotus-dist:dev docker/run.sh train --config configs/350m.yaml
#
# Data, run directories and caches live on the host (LOTUS_HOME, default ./lotus-home),
# so checkpoints outlive the container and a second run resumes from them. Multi-node:
# run this on every machine with NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT set
# (docs/clusters.md). Every NCCL_*, TORCH_NCCL_* and FI_* (libfabric, EFA) variable set
# here reaches the ranks. IB_DEVICES: the host's InfiniBand/EFA device folder, mapped
# when it exists (default /dev/infiniband; empty: map nothing).
set -euo pipefail

IMAGE=${IMAGE:-lotus-dist}
LOTUS_HOME=${LOTUS_HOME:-$PWD/lotus-home}
mkdir -p "$LOTUS_HOME"/{data,runs,cache}

env_args=()
for var in NNODES NPROC_PER_NODE NODE_RANK MASTER_ADDR MASTER_PORT HF_TOKEN DRY_RUN; do
    if [[ -n ${!var:-} ]]; then
        env_args+=(-e "$var")
    fi
done
while read -r var; do
    if [[ $var =~ ^(NCCL|TORCH_NCCL|FI)_ ]]; then
        env_args+=(-e "$var")
    fi
done < <(compgen -e)

# InfiniBand, RoCE and EFA: the verbs devices, and IPC_LOCK (with the unlimited memlock
# below) so that NCCL can pin its buffers; without them NCCL falls back to TCP sockets.
net_args=(--network=host --cap-add=IPC_LOCK)
IB_DEVICES=${IB_DEVICES-/dev/infiniband}
if [[ -n $IB_DEVICES && -e $IB_DEVICES ]]; then
    net_args+=(--device="$IB_DEVICES")
fi

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
    "${net_args[@]}" \
    --stop-timeout=300 \
    -v "$LOTUS_HOME/data:/opt/lotus/data" \
    -v "$LOTUS_HOME/runs:/opt/lotus/runs" \
    -v "$LOTUS_HOME/cache:/cache" \
    "${env_args[@]}" \
    "$IMAGE" "$@"
