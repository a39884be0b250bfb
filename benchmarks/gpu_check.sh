#!/usr/bin/env bash
# The GPU checks, in one go on a machine with one CUDA device: the tests marked gpu, the speed and
# memory benchmarks, bf16 against float32 on sine, and Omniglot 5-way 1-shot trained with the CUDA
# graph for as long as OMNIGLOT_SECONDS allows. Each part has its own time limit and runs even if
# an earlier one failed; everything lands in $OUT (default: gpu_out/).
#
#   OMNIGLOT=path/to/omniglot OMNIGLOT_SECONDS=150 [MEMORY=1] [SPEED_ARGS=] bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD WANDB_MODE=disabled
OMNIGLOT=${OMNIGLOT:-.omniglot}
OMNIGLOT_SECONDS=${OMNIGLOT_SECONDS:-150}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"

echo "== tests marked gpu"
timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -q -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"

echo "== speed"
timeout 150 python3 benchmarks/gpu_speed.py ${SPEED_ARGS:---quick} --seconds 0.4 --omniglot-root "$OMNIGLOT" 2>&1 | tee "$OUT/gpu_speed.md"

if [ -n "${MEMORY:-}" ]; then
    echo "== memory"
    timeout 120 python3 benchmarks/memory.py --device cuda --steps 10 100 --repeats 2 2>&1 | tee "$OUT/memory_cuda.md"
fi

echo "== Omniglot 5-way 1-shot, CUDA graph, ${OMNIGLOT_SECONDS} s"
timeout $((OMNIGLOT_SECONDS + 120)) python3 -m distmaml train configs/omniglot_5w1s.yaml engine.device=cuda \
    engine.cuda_graph=true data.root="$OMNIGLOT" train.time_limit="$OMNIGLOT_SECONDS" \
    run.dir=/tmp/omniglot_5w1s logging.progress=false 2>&1 | tail -n 12 | tee "$OUT/omniglot_5w1s.txt"
cp /tmp/omniglot_5w1s/summary.json "$OUT/omniglot_5w1s_summary.json" 2>/dev/null
cp /tmp/omniglot_5w1s/metrics.jsonl "$OUT/omniglot_5w1s_metrics.jsonl" 2>/dev/null

echo "== sine, float32 against bf16 (${SINE_ITERATIONS:=5000} iterations, K = 5, CUDA graph)"
for dtype in float32 bf16; do
    timeout 120 python3 -m distmaml train configs/sine_maml.yaml engine.device=cuda engine.cuda_graph=true \
        engine.dtype=$dtype inner.steps=5 train.iterations=$SINE_ITERATIONS train.log_every=1000 run.dir="/tmp/sine_$dtype" \
        logging.progress=false 2>&1 | tail -n 14 | tee "$OUT/sine_$dtype.txt"
done

