#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one command for a short lease: versions, the GPU-marked tests and the
# training benchmark on the TinyLlama-1.1B shape (Trainer vs recipe, bf16 vs fp8). Results go to $OUT.
# Usage: OUT=outputs/gpu_checks bash scripts/gpu_checks.sh   (needs torch with CUDA, and torchao for the fp8 row)
set -u
OUT=${OUT:-outputs/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, accelerate, datasets, pyarrow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)"
$PY -c "import torchao; print('torchao', torchao.__version__)" || echo "torchao missing: the fp8 row will fail"

$PY -m pytest -q -p no:cacheprovider -m gpu -rs \
    tests/test_env.py tests/test_metrics.py tests/test_activations.py tests/test_export_tensorrt.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15

$PY scripts/bench_train.py --device cuda --rows "${BENCH_ROWS:-trainer,single_gpu:off,single_gpu:selective,fp8:off}" \
    --steps "${BENCH_STEPS:-30}" --log-every 10 --row-timeout "${ROW_TIMEOUT:-150}" \
    --output-dir /tmp/bench_train --json-out "$OUT/bench_train.json" 2>&1 | tee "$OUT/bench_train.log" | grep -v "it/s\]" | tail -40
