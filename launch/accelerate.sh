#!/usr/bin/env bash
# Meta-train through `accelerate launch`, for those whose cluster tooling expects it. Every argument
# goes to `distmaml train` (a config file, then key.sub=value overrides):
#
#   launch/accelerate.sh configs/sine_maml.yaml                       # one process per GPU
#   NPROC=2 launch/accelerate.sh configs/sine_debug.yaml              # 2 processes; gloo without GPUs
#   ACCELERATE_CONFIG=launch/accelerate/cpu.yaml launch/accelerate.sh configs/sine_debug.yaml   # 1 CPU process
#
# One process needs no launcher at all: `distmaml train CONFIG` or `python -m distmaml train CONFIG`.
# accelerate only starts the processes (via torchrun); distmaml reads the environment it sets and
# reduces meta-gradients itself, so nothing here calls accelerator.prepare.
#
# Environment (defaults in brackets):
#   ACCELERATE_CONFIG  an accelerate config file [launch/accelerate/multi_gpu.yaml]
#   NPROC              processes [the config's num_processes, 1 in cpu.yaml]
#   MAIN_PROCESS_PORT  port of rank 0 [29500]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$here/accelerate/multi_gpu.yaml}
extra=()
[[ -n "${NPROC:-}" ]] && extra+=(--num_processes "$NPROC")
[[ -n "${MAIN_PROCESS_PORT:-}" ]] && extra+=(--main_process_port "$MAIN_PROCESS_PORT")

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec accelerate launch --config_file "$ACCELERATE_CONFIG" "${extra[@]}" -m distmaml train "$@"
