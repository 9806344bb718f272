#!/usr/bin/env bash
# Data-parallel evaluation with torchrun: tools/dist_test.sh CONFIG CHECKPOINT NPROC [test.py args...]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, PORT (tools/dist_run.sh).
CONFIG=$1
CHECKPOINT=$2
NPROC=$3
exec "$(dirname "$0")/dist_run.sh" "$NPROC" test.py "$CONFIG" "$CHECKPOINT" --launcher pytorch \
    "${@:4}"
