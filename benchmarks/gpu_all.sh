#!/usr/bin/env bash
# Every GPU figure kvpool owes, in one go, in under 8 minutes on a lent CUDA machine whose Python
# has torch, Triton, transformers, grpcio, protobuf and prometheus-client and nothing else (no
# Ray, redis-py or vLLM; kvpool itself not installed: it is imported from this checkout). One
# JSON file per step, each with its log beside it:
#
#   kernel_tests.json       tests/kernels on the device (the Triton codec and attention against
#                           the torch spec, the C loop too where its extension builds)
#   codec.json              benchmarks/codec.py --device cuda (Triton kernels vs the device's
#                           copy; v1 with options, v2 and v2 predicted end to end on the device)
#   gpu_breakeven.json      benchmarks/gpu_breakeven.py (prefill vs a hit; K2V2 and v2 predicted,
#                           its basis and maps on the device)
#   attention_kernels.json  benchmarks/attention_kernels.py (fused Triton attention over packed KV)
#
#   bash benchmarks/gpu_all.sh [DIR]           # DIR: default $OUT, else benchmarks/results/gpu-<UTC>
#   bash benchmarks/gpu_all.sh --fetch-wheels  # where an index is reachable: the pure-Python wheels
#                                              # the device lacks into .whl/ (pytest and its
#                                              # dependencies, grpcio-health-checking)
#   bash benchmarks/gpu_all.sh --smoke [DIR]   # the same steps on the CPU, tiny: checks the script
#
# The device has no index: carry .whl/ along (the run tool's `carry`). Without pytest the kernel
# tests are reported as not run; without grpcio-health-checking the shard server of
# gpu_breakeven cannot start. Exit status: 0 when every step wrote its JSON, 2 without a CUDA
# device (nothing is run), 1 when a step failed or ran out of its time (its log says which).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
WHEELS="$ROOT/.whl"
# pure-Python packages the device image lacks; versions as this checkout's own environment pins
WHEEL_SPECS=(pytest pluggy iniconfig packaging pygments exceptiongroup tomli "grpcio-health-checking==1.85.1")

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p "$WHEELS"
    # pure-Python wheels (any platform, Python 3.10 on), whatever the device's Python is
    exec "$PY" -m pip download --no-deps --only-binary=:all: --platform any --implementation py \
        --python-version 3.10 -d "$WHEELS" "${WHEEL_SPECS[@]}"
fi

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then
    SMOKE=1
    shift
fi
OUT_DIR=${1:-${OUT:-$ROOT/benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
START=$(date +%s)
BUDGET=${KVPOOL_GPU_BUDGET_S:-470} # all steps together, under the 8 minutes
say() { echo "gpu_all: $*" >&2; }

if [ $SMOKE = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    say "no CUDA device here (torch.cuda.is_available() is False, or torch is missing): nothing run"
    printf '{"error": "no CUDA device", "host": "%s"}\n' "$(hostname)" >"$OUT_DIR/no_device.json"
    exit 2
fi

# kvpool from this checkout without installing it: a package folder of links (the import names
# of pyproject.toml's package-dir), and the C extensions built in place where a compiler is
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/kvpool"
for f in "$ROOT"/client/*.py; do ln -s "$f" "$STAGE/kvpool/$(basename "$f")"; done
for d in kernels services proto; do ln -s "$ROOT/$d" "$STAGE/kvpool/$d"; done
for wheel in "$WHEELS"/*.whl; do
    [ -e "$wheel" ] || continue
    "$PY" -m pip install -q --no-index --no-deps --target "$STAGE/site" "$wheel" \
        >>"$OUT_DIR/wheels.log" 2>&1 || say "installing $(basename "$wheel") failed (see wheels.log)"
done
export PYTHONPATH="$STAGE:$STAGE/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
if "$PY" setup.py -q build_ext --inplace >"$OUT_DIR/build_ext.log" 2>&1; then
    CPU_LOOP=1
else
    CPU_LOOP=0
    say "the C extensions did not build (see build_ext.log): CPU rows and C-loop tests left out"
fi
"$PY" - >"$OUT_DIR/environment.json" <<'EOF'
import importlib.util, json, platform, torch
import kvpool.kernels.codec

def present(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False

mods = ["triton", "transformers", "grpc", "google.protobuf", "prometheus_client", "pytest",
        "grpc_health", "ray", "redis", "vllm", "zlib_ng"]
print(json.dumps({
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke run)",
    "torch": torch.__version__, "kvpool": kvpool.kernels.codec.__file__,
    "cuda": torch.version.cuda, "python": platform.python_version(),
    "present": {m: present(m) for m in mods},
}))
EOF

FAILED=0
# step NAME CAP_SECONDS COMMAND...: run with the smaller of its cap and the time left; the
# command's last stdout line is its JSON object
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 20 ]; then
        say "$name: no time left"
        printf '{"error": "not run: the 8-minute budget was spent"}\n' >"$OUT_DIR/$name.json"
        FAILED=1
        return
    fi
    say "$name (up to ${limit}s)"
    local t0
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    say "$name: exit $rc after $(($(date +%s) - t0))s"
    if tail -n 1 "$OUT_DIR/$name.log" | "$PY" -c 'import json, sys; json.loads(sys.stdin.read())' 2>/dev/null; then
        tail -n 1 "$OUT_DIR/$name.log" >"$OUT_DIR/$name.json"
    else
        printf '{"error": "exit %s (124: out of time); see %s.log"}\n' "$rc" "$name" >"$OUT_DIR/$name.json"
    fi
    [ $rc -eq 0 ] || FAILED=1
}

DEVICE=cuda
[ $SMOKE = 0 ] || DEVICE=cpu
if "$PY" -c 'import pytest' 2>/dev/null; then
    tests=(tests/kernels)
    # without the C extensions, only the Triton tests (the rest decode on the CPU by the C loop)
    [ "$CPU_LOOP" = 1 ] || tests=(tests/kernels/test_attention_triton.py tests/kernels/test_backends.py -k triton)
    [ $SMOKE = 0 ] || tests=(tests/kernels/test_backends.py -k triton_mixed_bits)
    step kernel_tests 200 "$PY" benchmarks/pytest_json.py "$OUT_DIR/kernel_tests.xml" \
        -q -p no:cacheprovider "${tests[@]}"
else
    say "kernel_tests: pytest is not installed (run --fetch-wheels where an index is, carry .whl/)"
    printf '{"error": "not run: pytest is not installed"}\n' >"$OUT_DIR/kernel_tests.json"
    FAILED=1
fi
if [ $SMOKE = 0 ]; then
    codec_args=(--device cuda --no-peer --repeat 10)
    [ "$CPU_LOOP" = 1 ] || codec_args+=(--no-cpu)
    breakeven_args=(--repeat 3)
    attention_args=(--device cuda)
else
    codec_args=(--device cpu --no-peer --repeat 2)
    breakeven_args=(--device cpu --tiny --tokens 512 --repeat 1)
    attention_args=(--device cpu --tiny --repeat 1)
fi
step codec 90 "$PY" benchmarks/codec.py "${codec_args[@]}"
step gpu_breakeven 150 "$PY" benchmarks/gpu_breakeven.py "${breakeven_args[@]}"
step attention_kernels 90 "$PY" benchmarks/attention_kernels.py "${attention_args[@]}"

say "done in $(($(date +%s) - START))s; JSON files in $OUT_DIR"
exit $FAILED
