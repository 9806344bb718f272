#!/usr/bin/env bash
# Shared by dist_train.sh and dist_test.sh: tools/dist_run.sh NPROC TOOL [TOOL args...] starts
# NPROC processes of tools/TOOL with torchrun, this repository first on PYTHONPATH.
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, PORT.
NPROC=$1
TOOL=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}

PYTHONPATH="$(dirname "$0")/..":$PYTHONPATH \
exec python -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROC" \
    --master_port="$PORT" \
    "$(dirname "$0")/$TOOL" \
    "${@:3}"
