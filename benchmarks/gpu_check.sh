#!/usr/bin/env bash
# The GPU checks of the chunked path, prepared as one command for a session that is lent
# an NVIDIA GPU through the device tool. NOT YET RUN: no session so far was lent a GPU.
#
# That machine has torch, pytest, hypothesis, numpy and matplotlib, but not autograd (which the
# package imports) or pytorch-metric-learning; both are pure Python and travel as wheels. Here,
# in the repo's root, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl autograd==1.9.1 pytorch-metric-learning==2.9.0
# then `run` with carry [".whl"] and the command `bash benchmarks/gpu_check.sh` (timeout_s 600).
# It writes into $OUT (gpu-out/ outside the device tool): the device, the CUDA tests' summary, the
# benchmark's CUDA grid (bf16 inputs, D = 512, B in {1024, 4096}, C in {1e5, 3e5, 1e6}) as JSON and
# a plot, with torch's linear_cross_entropy (reference and 32-row chunked paths, each checked
# against the project's CE before it is timed) among the contestants, and torch's default
# chunking ("stock chunked auto", opt-in) at one shape. Copy the JSON to benchmarks/runs/ and
# report the ratios in RESULTS.md, "GPU". Time limits: 170 + 270 + 90 + 40 s, under the tool's 600.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee "$OUT/device.txt"
# 1. the suite's CUDA tests (each is a device parameter or a CUDA-only check; they skip without CUDA)
HYPOTHESIS_PROFILE=ci timeout 170 python3 -m pytest -q -p no:cacheprovider -rs -k cuda tests 2>&1 |
    tee "$OUT/tests.txt" | tail -15
# 2. the CUDA grid of the benchmark (every default contestant, the stock ones included)
timeout 270 python3 benchmarks/bench_margin_ce.py --repeats 5 --json "$OUT/gpu-run1.json" \
    --plot "$OUT/margin_ce_gpu.png" 2>&1 | tee "$OUT/bench.txt"
# 3. torch's default chunking of linear_cross_entropy at the largest shape, against the chunked path
timeout 90 python3 benchmarks/bench_margin_ce.py --shape 4096 512 1000000 --repeats 3 --no-memory \
    --only chunked "stock chunked" "stock chunked auto" --json "$OUT/gpu-stock-auto.json" 2>&1 |
    tee "$OUT/bench-stock-auto.txt"
# 4. the class-sharded step on NCCL (one rank: the machine has one GPU), C = 1e6, D = 512, B = 256
timeout 40 python3 benchmarks/sharded_scale.py --device cuda --world 1 --json "$OUT/sharded-nccl.json" 2>&1 |
    tee "$OUT/sharded-nccl.txt"
