#!/usr/bin/env bash
# The GPU check: the CUDA test tier and the GPU benchmark, in one call, in under 8 minutes on one GPU.
# Results (JSON + markdown) go to $OUT (default runs/gpu_check):
#   cuda_tests.xml / cuda_tests.log   pytest's junit report and log of tests/test_cuda.py
#   gpu_bench.json / gpu_bench.md      recipes/benchmark_gpu.py (Llama-3.1-8B-shaped LoRA and QLoRA)
#   summary.md                         both, for the README
# On the lent H200 machine (no network; torch 2.11, no torchao): carry wheels made here with
#   scripts/gpu_wheels.sh   (writes .whl/, ignored by git)   and call with carry [".whl"].
# Env: GPU_LAYERS (32: the 8B shape; fewer for a quicker rerun), GPU_STEPS (5), TEST_TIMEOUT (240 s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
                    torch.cuda.get_device_name() if torch.cuda.is_available() else "-", "gpus", torch.cuda.device_count())
try:
    import torchao; print("torchao", torchao.__version__)
except Exception as e: print("torchao missing:", e)
PY
timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -rs tests/test_cuda.py --junitxml="$OUT/cuda_tests.xml" 2>&1 \
  | tee "$OUT/cuda_tests.log" | tail -40
tests_rc=${PIPESTATUS[0]}
timeout 330 "$PY" recipes/benchmark_gpu.py --out "$OUT" --layers "${GPU_LAYERS:-32}" --steps "${GPU_STEPS:-5}" 2>&1 \
  | grep -v "Failed to load" | tail -20
bench_rc=${PIPESTATUS[0]}
{
  echo "# GPU check ($(date -u +%F))"; echo; cat "$OUT/env.txt"; echo
  echo "CUDA tier: exit $tests_rc: $(tail -1 "$OUT/cuda_tests.log")"; echo
  cat "$OUT/gpu_bench.md" 2>/dev/null || echo "benchmark: exit $bench_rc, no table"
} > "$OUT/summary.md"
cat "$OUT/summary.md"
exit $(( tests_rc != 0 || bench_rc != 0 ))
