#!/usr/bin/env bash
# Data-parallel training with torchrun: tools/dist_train.sh CONFIG NPROC [train.py args...]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, PORT. Without GPUs it runs NPROC CPU
# processes over gloo (our train.py starts the gloo group itself; mmdet's dist_train.sh cannot run
# on CPU because mmengine's init_dist always calls torch.cuda.set_device: see docs/tools.md).
CONFIG=$1
NPROC=$2
exec "$(dirname "$0")/dist_run.sh" "$NPROC" train.py "$CONFIG" --launcher pytorch "${@:3}"
