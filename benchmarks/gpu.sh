#!/usr/bin/env bash
# Everything that needs a GPU, in one go on a machine with one CUDA device, within a lease's 10-minute
# command limit: the tests marked gpu, the speed matrix (K = 1, 5, 10, 50; first and second order;
# meta-batch 25 and 1000; loop, batched, CUDA graph, bf16; rules and modes; Omniglot- and mini-ImageNet-
# shaped images), memory on CUDA (estimate against measured), and Omniglot 5-way 1-shot trained with the
# CUDA graph for OMNIGLOT_SECONDS when OMNIGLOT points at the data. Each part has its own time limit and
# runs even if an earlier one failed; JSON results land in benchmarks/results/, logs in $OUT.
#
#   OUT=gpu_out OMNIGLOT=path/to/omniglot OMNIGLOT_SECONDS=120 bash benchmarks/gpu.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD WANDB_MODE=disabled
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"

echo "== tests marked gpu"
timeout 150 python3 -m pytest -m gpu tests/engine/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"

echo "== speed"
timeout 240 python3 -m benchmarks.speed --device cuda --windows 3 --seconds 0.3 2>&1 | tee "$OUT/speed_cuda.txt"
cp benchmarks/results/speed_cuda.json "$OUT/" 2>/dev/null

echo "== memory"
timeout 120 python3 -m benchmarks.memory --device cuda --only conv4 resnet12 2>&1 | tee "$OUT/memory_cuda.txt"
cp benchmarks/results/memory_cuda.json "$OUT/" 2>/dev/null

if [ -n "${OMNIGLOT:-}" ]; then
    echo "== Omniglot 5-way 1-shot, CUDA graph, ${OMNIGLOT_SECONDS:=120} s"
    timeout $((OMNIGLOT_SECONDS + 90)) python3 -m distmaml train configs/omniglot_5w1s.yaml engine.device=cuda \
        engine.cuda_graph=true data.root="$OMNIGLOT" train.time_limit="$OMNIGLOT_SECONDS" \
        run.dir=/tmp/omniglot_5w1s logging.progress=false 2>&1 | tail -n 14 | tee "$OUT/omniglot_5w1s.txt"
    cp /tmp/omniglot_5w1s/summary.json "$OUT/omniglot_5w1s_summary.json" 2>/dev/null
fi
