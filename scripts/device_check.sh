#!/usr/bin/env bash
# The one prepared GPU check, for a lent device machine (no network, 15 min of device time per issue).
#
#   bash scripts/device_check.sh 1 [BUDGET_S]   # call 1: gpu tests, 14B 480p modes, 1.3B
#   bash scripts/device_check.sh 2 [BUDGET_S]   # call 2: 14B compile + fp8_linear, leftovers, GPU soak
#   bash scripts/device_check.sh rehearse       # CPU dry run of the same environment: tiny bench + soak
#
# Needs the wheels of scripts/device_wheels.sh in .whl/ (carry it). Everything goes to $OUT as it runs
# (device_check.log, h200-14b.json, soak-cuda.json, env.txt): a call stopped at its limit still returns
# the figures of every finished mode. BUDGET_S (default 330) is this script's wall-clock allowance; each
# step gets what is left, and bench.py skips modes whose estimate would not fit. VACE_REQUIRE_CUDA=1 makes
# the gpu tests, bench.py and soak.py exit 2 at once where CUDA is missing instead of skipping.
# Before call 2, copy call 1's h200-14b.json to docs/bench/ (untracked files travel): call 2 appends to it,
# reusing its stock / bf16 baselines and skipping the modes it already has.
set -uo pipefail

PHASE="${1:-1}"
BUDGET_S="${2:-330}"
case "$PHASE" in 1|2|rehearse) ;; *) echo "usage: $0 1|2|rehearse [BUDGET_S]" >&2; exit 64 ;; esac
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/device-out}"
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
START=$(date +%s)
PY="${PYTHON:-python3}"
declare -a SUMMARY=()
FAILED=0

exec > >(tee -a "$LOG") 2>&1
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# step NAME SECONDS CMD...: run CMD bounded by min(SECONDS, time left - 5 s), record its exit status.
step() {
  local name="$1" want="$2"; shift 2
  local l; l=$(( $(left) - 5 ))
  local t=$(( want < l ? want : l ))
  if (( t < 20 )); then
    echo "=== $name: skipped, ${l} s left"; SUMMARY+=("$name: skipped (time)"); return 0
  fi
  echo "=== $name (limit ${t} s, $(left) s left) :: $*"
  local s; s=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$t" "$@"
  local rc=$?
  SUMMARY+=("$name: rc=$rc in $(( $(date +%s) - s )) s")
  (( rc == 0 )) || FAILED=1
  echo "=== $name: rc=$rc"
  return 0
}

echo "=== device_check phase $PHASE, budget ${BUDGET_S} s, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null)"
# -- wheels the image lacks (no network there): into a private site dir that shadows nothing else ----------
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vace-site .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
  export PYTHONPATH="/tmp/vace-site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/ (run scripts/device_wheels.sh here and carry .whl): using what the image has"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ "$PHASE" = rehearse ] || export VACE_REQUIRE_CUDA=1
export VACE_CACHE_DIR="${VACE_CACHE_DIR:-/tmp/vace-cache}" HF_HOME="${HF_HOME:-/tmp/vace-hf}"

{ nvidia-smi || echo "nvidia-smi: not available"
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "diffusers", "transformers", "accelerate", "huggingface_hub", "pydantic", "numpy", "torchao",
             "ftfy", "imageio_ffmpeg", "triton", "cv2", "onnxruntime", "PIL"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')} {getattr(mod, '__file__', '')}")
    except Exception as exc:  # noqa: BLE001 - this is the import census
        print(f"{name} IMPORT FAILED: {type(exc).__name__}: {exc}")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF
} 2>&1 | tee "$OUT/env.txt"
# Every project module the checks import, imported now: an ImportError or version clash shows here, not mid-run.
step imports 120 "$PY" -c "import vace_local.engine, vace_local.run, vace_local.synthetic, vace_local.fastpath, \
vace_local.memory, vace_local.step_cache, vace_local.flops, preprocessors, diffusers.pipelines.wan.pipeline_wan_vace; \
print('imports ok')"

BENCH=("$PY" scripts/bench.py --require-cuda --sizes 832x480x81 --steps 3 --append --out "$OUT/h200-14b.json")
[ -f docs/bench/h200-14b.json ] && cp docs/bench/h200-14b.json "$OUT/h200-14b.json"
bench_budget() { echo $(( $(left) - $1 )); }  # what bench.py may plan with, keeping $1 s for later steps

if [ "$PHASE" = 1 ]; then
  step pytest-gpu 120 "$PY" -m pytest -m gpu $(grep -l "pytest.mark.gpu" tests/test_*.py) -q -p no:cacheprovider \
    -o addopts="" -ra --timeout 120
  step bench-14b 400 "${BENCH[@]}" --model 14b \
    --modes stock,bf16,fast_mode_distilled,offload_group_fp8,cfg_batch,fp8_storage,offload_group \
    --budget-s "$(bench_budget 45)"
  step bench-1.3b 60 "${BENCH[@]}" --model 1.3b --modes stock,bf16 --budget-s "$(bench_budget 5)"
elif [ "$PHASE" = rehearse ]; then  # no GPU here: run the CPU half of every step in this environment
  step pytest-collect 120 "$PY" -m pytest -m gpu $(grep -l "pytest.mark.gpu" tests/test_*.py) -q -p no:cacheprovider \
    -o addopts="" --collect-only
  step bench-tiny 300 "$PY" scripts/bench.py --tiny --sizes 32x32x17 --steps 2 --modes bf16,cfg_batch,fp8_storage \
    --out "$OUT/bench-tiny.json"
  step soak-cpu 300 "$PY" scripts/soak.py --jobs 4 --size 32x32x17 --steps 1 --out "$OUT/soak-cpu.json"
else
  step bench-14b-compile 500 "${BENCH[@]}" --model 14b \
    --modes compile,fp8_linear,offload_group_fp8,offload_group,fp8_storage,cfg_batch,fast_mode_distilled,fast \
    --budget-s "$(bench_budget 65)"
  step soak-cuda 60 "$PY" scripts/soak.py --device cuda --jobs 10 --size 416x240x17 --steps 2 --out "$OUT/soak-cuda.json"
  step bench-1.3b 60 "${BENCH[@]}" --model 1.3b --modes stock,bf16 --budget-s "$(bench_budget 5)"
fi

echo "=== summary (phase $PHASE, $(( $(date +%s) - START )) s of ${BUDGET_S} s)"
printf '  %s\n' "${SUMMARY[@]}"
for f in "$OUT/h200-14b.json" "$OUT/bench-tiny.json"; do
  [ -f "$f" ] && "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['table'])" "$f"
done
ls -l "$OUT"
exit "$FAILED"  # 1 when any step failed or timed out: the summary above says which
