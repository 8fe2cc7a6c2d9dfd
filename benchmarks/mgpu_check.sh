#!/usr/bin/env bash
# One GPU run for the Mosaic GPU GPTQ kernel (issue #6), sized to fit one 10-minute device call:
#   bash benchmarks/mgpu_check.sh            (from anywhere; OUT=dir chooses where results go)
# 1. the Pallas kernels' GPU tests (compiled for real), stopping at the first failure;
# 2. the Mosaic kernel (default + persistent stream-K / tile schedules + grid tilings) vs XLA bf16,
#    XLA dequant + cuBLAS and torch bf16 / tinygemm at K x N = 8192 x 28672, M = 1 ... 4096;
# 3. the same with fewer configs at the other Llama shapes (M = 1 ... 256).
# Device-timed medians with weights rotated over copies larger than L2 (benchmarks/bench_kernels.py).
# Writes $OUT/gpu_pytest.txt, $OUT/bench_big.log + bench_big.json, $OUT/bench_rest.log +
# bench_rest.json; prints the tables last. A config that fails to compile is reported and skipped.
# 4. (E2E_S > 0) the 7B-shape decode benchmark: bf16 vs GPTQ 4-bit (fused q/k/v + gate/up, and unfused).
#    E2E_ARGS replaces its extra flags (default --e2e-nofuse; --e2e-variants adds nk-layout / session-4 models;
#    models are timed in 3 interleaved rounds, --e2e-rounds; --e2e-trace adds GPU busy / idle per step).
# Time boxes (seconds): DUMP_S (default 0: part 0, Mosaic dumps, skipped), TESTS_S (default 130), BIG_S (250), REST_S (120),
# L2_S (0: bench_l2_residency.py, flags L2_ARGS), PP_S (0: probes/persistent_phases.py, flags PP_ARGS), RS_S (0: probes/ring_stream.py, flags RS_ARGS), PM_S (0: the persistent decode MLP's GPU tests and timing, flags PM_ARGS), DA_S (0: the decode-attention benchmark, bench_kernels.py --decode-attn), DU_S (0: the fused decode step kernel's
# config sweep, --decode-attn-update on DU_SHAPES, extra flags DU_ARGS), E2E_S (0); 0 skips that part.
# PERSIST=0 skips the persistent-schedule tests of part 1.
# TESTS_PATH narrows part 1 (one or more space-separated paths, e.g. tests/pallas_kernels/test_gptq_matmul_mgpu.py);
# TESTS_MARK replaces its marker expression (default gpu; "gpu or not gpu" runs every test of those paths),
# TESTS_K its -k expression (default "not persistent_compiled"). TESTS_N=6 runs part 1 in 6 pytest-xdist
# workers on the one GPU (compiles are CPU-bound: 37 kernel tests in 146 s instead of 23 in 200 s, H100 session 17).
# REST_SHAPES / REST_MS replace part 3's shapes (KxN,...) and token counts (e.g. the 7B decode layers:
# REST_SHAPES=4096x12288,4096x4096,4096x22016,11008x4096). BIG_MS / BIG_CFGS / REST_CFGS choose the
# big shape's token counts and configs per point; PARTS=0 drops the kernel-only / empty-body decode
# diagnostics.
set -u
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/mgpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
TESTS_S="${TESTS_S:-130}" BIG_S="${BIG_S:-250}" REST_S="${REST_S:-120}" E2E_S="${E2E_S:-0}"
BIG_MS="${BIG_MS:-1,16,64,256,1024,4096}" BIG_CFGS="${BIG_CFGS:-9}" REST_CFGS="${REST_CFGS:-4}"
REST_SHAPES="${REST_SHAPES:-4096x4096,4096x14336,14336x4096}" REST_MS="${REST_MS:-1,16,64,256}"
BENCH_ARGS="${BENCH_ARGS:-}"  # extra bench_kernels.py flags for parts 2 and 3 (e.g. --mgpu-exclude z-xsum)
# Import this checkout's package whatever is installed: jgptq.models / jgptq.pallas_kernels live in
# models/ and pallas_kernels/ (pyproject package-dir), so build a jgptq/ of symlinks.
SHIM="$(mktemp -d)"
mkdir -p "$SHIM/jgptq"
ln -s "$REPO"/jgptq/* "$SHIM/jgptq/"
ln -s "$REPO/models" "$SHIM/jgptq/models"
ln -s "$REPO/pallas_kernels" "$SHIM/jgptq/pallas_kernels"
export PYTHONPATH="$SHIM" XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
cd "$SHIM"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv,noheader
"$PY" -c "import jax, jgptq.pallas_kernels.gptq_matmul_mgpu as m; print('jax', jax.__version__, jax.devices(), 'kernel:', m.__file__, flush=True)"
if [ "${DUMP_S:-0}" != 0 ]; then
  # 0. the default decode / small-batch kernels compiled once with Mosaic GPU's dump flags: ptxas
  # resource use (registers, spills, shared memory) and SASS under $OUT/dump (kernel self-check + timing)
  echo "=== 0 Mosaic GPU dumps (ptxas -v, SASS) of the default kernels ==="
  mkdir -p "$OUT/dump"
  MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO="$OUT/dump" \
    timeout "$DUMP_S" "$PY" -m jgptq.pallas_kernels.gptq_matmul_mgpu > "$OUT/dump.log" 2>&1
  echo "dump exit: $?"; grep "^M=" "$OUT/dump.log"; grep -ih "registers\|spill" -r "$OUT/dump" "$OUT/dump.log" | sort | uniq -c | head -20
fi
if [ "$TESTS_S" != 0 ]; then
  echo "=== 1/3 pytest -m gpu (Pallas kernels; the persistent-schedule test in its own process) ==="
  T="$REPO/tests/pallas_kernels"
  timeout "$TESTS_S" "$PY" -m pytest -c "$REPO/pyproject.toml" --rootdir "$REPO" -p no:cacheprovider \
    $(for p in ${TESTS_PATH:-tests/pallas_kernels}; do echo "$REPO/$p"; done) -m "${TESTS_MARK:-gpu}" \
    -k "${TESTS_K:-not persistent_compiled}" ${TESTS_N:+-n "$TESTS_N"} --maxfail=4 -v 2>&1 \
    | tee "$OUT/gpu_pytest.txt" | grep -v "Warning\|rule(ctx" | tail -30  # -v: a run cut by the box still names what passed
  echo "pytest exit: ${PIPESTATUS[0]} (124 = cut at ${TESTS_S} s)"
fi
if [ "$TESTS_S" != 0 ] && [ "${PERSIST:-1}" != 0 ]; then
  T="$REPO/tests/pallas_kernels"
  timeout "$TESTS_S" "$PY" -m pytest -c "$REPO/pyproject.toml" --rootdir "$REPO" -p no:cacheprovider \
    "$T/test_gptq_matmul_mgpu.py" -m gpu -k "persistent_compiled" -q 2>&1 | tee "$OUT/gpu_pytest_persistent.txt" \
    | grep -v "cuda_event.cc\|Source Location\|cuda_status.cc\|allocator.cc\|^$" | tail -30
  echo "pytest (persistent) exit: ${PIPESTATUS[0]}"
fi
if [ "$BIG_S" != 0 ]; then
  echo "=== 2/3 benchmark 8192 x 28672 ==="
  mkdir -p "$OUT/big"
  timeout $((BIG_S + 40)) "$PY" "$REPO/benchmarks/bench_kernels.py" --shapes 8192x28672 --ms "$BIG_MS" \
    --no-triton --mgpu --max-mgpu-cfgs "$BIG_CFGS" $( [ "${PARTS:-1}" = 1 ] && echo --mgpu-parts) --budget-s "$BIG_S" --out "$OUT/big" $BENCH_ARGS 2>&1 \
    | tee "$OUT/bench_big.log" | grep -v '^{"K"' | tail -40
  echo "bench exit: ${PIPESTATUS[0]}"
  mv "$OUT/big/bench_kernels.json" "$OUT/bench_big.json" 2>/dev/null; rmdir "$OUT/big" 2>/dev/null
fi
if [ "$REST_S" != 0 ]; then
  echo "=== 3/3 benchmark $REST_SHAPES ==="
  mkdir -p "$OUT/rest"
  timeout $((REST_S + 40)) "$PY" "$REPO/benchmarks/bench_kernels.py" --shapes "$REST_SHAPES" \
    --ms "$REST_MS" --no-triton --no-xla-dequant --mgpu --max-mgpu-cfgs "$REST_CFGS" --max-mgpu-cfgs-rest "$REST_CFGS" \
    --budget-s "$REST_S" --out "$OUT/rest" $BENCH_ARGS 2>&1 | tee "$OUT/bench_rest.log" | grep -v '^{"K"' | tail -25
  echo "bench exit: ${PIPESTATUS[0]}"
  mv "$OUT/rest/bench_kernels.json" "$OUT/bench_rest.json" 2>/dev/null; rmdir "$OUT/rest" 2>/dev/null
fi
if [ "${DA_S:-0}" != 0 ]; then
  echo "=== decode attention: Pallas kernel vs XLA (bench_kernels.py --decode-attn) ==="
  mkdir -p "$OUT/da"
  timeout "$DA_S" "$PY" "$REPO/benchmarks/bench_kernels.py" --decode-attn --out "$OUT/da" 2>&1 \
    | tee "$OUT/bench_decode_attention.log" | grep -v '^{' | tail -24
  echo "decode-attn exit: ${PIPESTATUS[0]}"
  mv "$OUT/da/bench_decode_attention.json" "$OUT/" 2>/dev/null; rmdir "$OUT/da" 2>/dev/null
fi
if [ "${DU_S:-0}" != 0 ]; then
  echo "=== fused decode step kernel: config sweep (bench_kernels.py --decode-attn-update) ==="
  mkdir -p "$OUT/du"
  timeout $((DU_S + 30)) "$PY" "$REPO/benchmarks/bench_kernels.py" --decode-attn-update --budget-s "$DU_S" \
    --decode-attn-shapes "${DU_SHAPES:-1x32x32x128x256,16x32x32x128x256,1x32x32x128x4096}" --out "$OUT/du" ${DU_ARGS:-} 2>&1 \
    | tee "$OUT/bench_decode_update.log" | grep -v '^{' | tail -12
  echo "decode-update exit: ${PIPESTATUS[0]}"
  mv "$OUT/du/bench_decode_update.json" "$OUT/" 2>/dev/null; rmdir "$OUT/du" 2>/dev/null
fi
if [ "${PP_S:-0}" != 0 ]; then
  echo "=== persistent kernel vs launch chain: grid-barrier and streaming probe (probes/persistent_phases.py) ==="
  timeout "$PP_S" "$PY" "$REPO/benchmarks/probes/persistent_phases.py" ${PP_ARGS:-} --out "$OUT" 2>&1 \
    | tee "$OUT/persistent_phases.log" | grep -v '^{' | tail -12
  echo "persistent-phases exit: ${PIPESTATUS[0]}"
fi
if [ "${RS_S:-0}" != 0 ]; then
  echo "=== few long-lived CTAs vs many short ones: streaming probe (probes/ring_stream.py) ==="
  timeout "$RS_S" "$PY" "$REPO/benchmarks/probes/ring_stream.py" ${RS_ARGS:-} --out "$OUT" 2>&1 \
    | tee "$OUT/ring_stream.log" | grep -v '^{' | tail -24
  echo "ring-stream exit: ${PIPESTATUS[0]}"
fi
if [ "${PM_S:-0}" != 0 ]; then
  # the persistent decode MLP: its GPU tests (each launch hangs if the barrier never opens, hence the
  # time box), then its timing against the two-launch path (python -m ...persistent_mlp, flags PM_ARGS)
  echo "=== persistent decode MLP (pallas_kernels/persistent_mlp.py): GPU tests, then timing ==="
  timeout "$PM_S" "$PY" -m pytest -c "$REPO/pyproject.toml" --rootdir "$REPO" -p no:cacheprovider \
    "$REPO/tests/pallas_kernels/test_persistent_mlp.py" -m gpu -x -v 2>&1 | tee "$OUT/persistent_mlp_tests.txt" | tail -6
  echo "persistent-mlp tests exit: ${PIPESTATUS[0]} (124 = cut at $PM_S s)"
  timeout "$PM_S" "$PY" -m jgptq.pallas_kernels.persistent_mlp ${PM_ARGS:-} 2>&1 | tee "$OUT/persistent_mlp.log" | tail -6
  echo "persistent-mlp timing exit: ${PIPESTATUS[0]}"
fi
if [ "${L2_S:-0}" != 0 ]; then
  echo "=== matmuls on cold vs L2-resident weights (bench_l2_residency.py) ==="
  mkdir -p "$OUT/l2"
  timeout "$L2_S" "$PY" "$REPO/benchmarks/bench_l2_residency.py" ${L2_ARGS:-} --out "$OUT/l2" 2>&1 \
    | tee "$OUT/bench_l2_residency.log" | grep -v '^{' | tail -16
  echo "l2-residency exit: ${PIPESTATUS[0]}"
  mv "$OUT/l2/bench_l2_residency.json" "$OUT/" 2>/dev/null; rmdir "$OUT/l2" 2>/dev/null
fi
if [ "$E2E_S" != 0 ]; then
  echo "=== 4/4 end to end: 7B-shape decode ==="
  mkdir -p "$OUT/e2e"
  timeout "$E2E_S" "$PY" "$REPO/benchmarks/bench_kernels.py" --e2e ${E2E_ARGS:---e2e-nofuse} --out "$OUT/e2e" 2>&1 \
    | tee "$OUT/bench_e2e.log" | tail -12
  echo "e2e exit: ${PIPESTATUS[0]}"
  mv "$OUT/e2e/bench_e2e.json" "$OUT/bench_e2e.json" 2>/dev/null; rmdir "$OUT/e2e" 2>/dev/null
fi
