#!/usr/bin/env bash
# One H100 run for the Mosaic GPU GPTQ kernel (issue #6):
#   bash benchmarks/mgpu_check.sh          (from anywhere; OUT=dir to choose where results go)
# 1. the kernel's GPU tests (compiled for real), stopping at the first failure;
# 2. Mosaic kernel (several tile configs) vs the Triton-lowered kernel (default config) vs XLA bf16
#    at KxN = 8192x28672 and 4096x4096, M = 1, 16, 64, 256; device-timed medians with weights
#    rotated over copies larger than L2 (benchmarks/bench_kernels.py --mgpu).
# Writes $OUT/mgpu_pytest.txt, $OUT/bench_log.txt, $OUT/bench_kernels.json; prints the table last.
# A config that fails to compile is reported (the first failure with its full error) and skipped.
set -u
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/mgpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
# Import this checkout's package whatever is installed: jgptq.models / jgptq.pallas_kernels live in
# models/ and pallas_kernels/ (pyproject package-dir), so build a jgptq/ of symlinks.
SHIM="$(mktemp -d)"
mkdir -p "$SHIM/jgptq"
ln -s "$REPO"/jgptq/* "$SHIM/jgptq/"
ln -s "$REPO/models" "$SHIM/jgptq/models"
ln -s "$REPO/pallas_kernels" "$SHIM/jgptq/pallas_kernels"
export PYTHONPATH="$SHIM"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
cd "$SHIM"
"$PY" -c "import jax, jgptq.pallas_kernels.gptq_matmul_mgpu as m; print('jax', jax.__version__, jax.devices(), 'kernel:', m.__file__, flush=True)"
echo "=== 1/2 pytest -m gpu (mgpu kernel) ==="
timeout 90 "$PY" -m pytest -c "$REPO/pyproject.toml" --rootdir "$REPO" -p no:cacheprovider \
  "$REPO/tests/pallas_kernels/test_gptq_matmul_mgpu.py" -m gpu -x -q 2>&1 | tee "$OUT/mgpu_pytest.txt" | tail -120
echo "pytest exit: ${PIPESTATUS[0]}"
echo "=== 2/2 benchmark ==="
timeout 145 "$PY" "$REPO/benchmarks/bench_kernels.py" --shapes 8192x28672,4096x4096 --ms 1,16,64,256 \
  --no-torch --no-xla-dequant --triton-default-only --mgpu --max-mgpu-cfgs 6 --max-mgpu-cfgs-rest 3 \
  --budget-s 115 --out "$OUT" 2>&1 | tee "$OUT/bench_log.txt" | grep -v '^{"K"'
echo "bench exit: ${PIPESTATUS[0]} (124 = killed at 145 s; per-point JSON lines are in $OUT/bench_log.txt)"
