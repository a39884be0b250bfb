#!/usr/bin/env bash
# Meta-train with torchrun: NPROC processes on each of NNODES nodes. Every argument goes to
# `distmaml train` (a config file, then key.sub=value overrides):
#
#   launch/torchrun.sh configs/sine_maml.yaml train.meta_batch=50      # one node, one process per GPU
#   NPROC=2 launch/torchrun.sh configs/sine_debug.yaml                 # two CPU processes (gloo)
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node01:29400 launch/torchrun.sh configs/...   # on node01
#   NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=node01:29400 launch/torchrun.sh configs/...   # on node02
#
# One process needs no launcher: `distmaml train CONFIG` or `python -m distmaml train CONFIG`.
# On SLURM use slurm/*.sbatch, which run this same entry point.
#
# Environment (defaults in brackets):
#   NPROC          processes per node [number of GPUs, or 1 without GPUs]
#   NNODES         nodes [1]
#   NODE_RANK      this node's index, 0..NNODES-1 [0]
#   RDZV_ENDPOINT  host:port of the c10d rendezvous, the same on every node
#                  [unset with one node: --standalone picks a free local port]
#   RDZV_ID        rendezvous id, the same on every node and unique per job [distmaml]
#   MAX_RESTARTS   times torchrun restarts all workers after one fails; each restart resumes from
#                  the newest checkpoint in run.dir (run.resume=auto) [0]
#
# Preemption: send SIGTERM to torchrun (it forwards it to every worker); the workers finish the
# current iteration, write a checkpoint and exit with status 143. Run the same command to resume.
set -euo pipefail

if [[ -z "${NPROC:-}" ]]; then
    NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ "$NPROC" -gt 0 ]] || NPROC=1
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
RDZV_ID=${RDZV_ID:-distmaml}
MAX_RESTARTS=${MAX_RESTARTS:-0}

if [[ -z "${RDZV_ENDPOINT:-}" && "$NNODES" == 1 ]]; then
    rendezvous=(--standalone)
else
    rendezvous=(--rdzv-backend c10d --rdzv-endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port for several nodes}"
                --rdzv-id "$RDZV_ID")
fi

# One BLAS thread per process unless told otherwise: the processes already share the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Workers of a restart otherwise share the agent's store with the failed attempt and can read its
# stale addresses: about half of all restarts then fail to connect (pytorch/pytorch#135712, #167288).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" "${rendezvous[@]}" \
    --max-restarts "$MAX_RESTARTS" -m distmaml train "$@"
