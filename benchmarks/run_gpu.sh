#!/usr/bin/env bash
# The one prepared GPU run (for a task lent a GPU machine, which has torch but no optree):
#   here:   echo /.whl/ >> .git/info/exclude
#           python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#             --implementation cp --platform manylinux_2_17_x86_64 -d .whl optree
#   device: run(command="bash benchmarks/run_gpu.sh", carry=[".whl"], timeout_s=540)
# It runs the CUDA tests, then the benchmarks on CUDA, writing results under $OUT.
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/out}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, optree; print('torch', torch.__version__, 'optree', optree.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_vmap_spec.py 2>&1 | tee "$OUT/cuda_tests.log"
python3 -m benchmarks --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log"
