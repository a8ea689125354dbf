#!/usr/bin/env bash
# The one prepared GPU check, for a lent device machine (H100 80 GB or H200; no network; 15 min of device
# time per session, every start included). Each call fits a 300 s device command with room for a second.
#
#   bash scripts/device_check.sh 1 [BUDGET_S]   # call 1: the target figures - 14B 832x480x81 CFG stock and
#                                               #   bf16, then distilled, then offload_group_fp8; extras if time
#   bash scripts/device_check.sh 2 [BUDGET_S]   # call 2: gpu tests, 14B compile + fp8_linear, leftovers, soak, 1.3B
#   bash scripts/device_check.sh rehearse       # CPU dry run of the same environment: tiny bench + soak
#
# Needs the wheels of scripts/device_wheels.sh in .whl/ (carry it). No weights are needed: bench.py builds
# the published architectures with random weights on the GPU. Everything goes to $OUT as it runs
# (device_check.log, <gpu>-14b.json with <gpu> = h100 / h200 / gpu, soak-cuda.json, env.txt): a call stopped
# at its limit still returns the figures of every finished mode (the JSON is rewritten after each). BUDGET_S
# (default 270, for timeout_s=300) is this script's wall-clock allowance; each step gets what is left,
# bench.py skips modes whose estimate (FLOP-model prior, then measured) would not fit and cuts a slow mode's
# timed job short once one step interval is measured (s/step extrapolated to the full schedule).
# VACE_REQUIRE_CUDA=1 makes the gpu tests, bench.py and soak.py exit 2 at once where CUDA is missing.
# Before call 2, copy call 1's <gpu>-14b.json to docs/bench/ (untracked files travel): call 2 appends to it,
# reusing its stock / bf16 baselines when it runs on the same GPU model and skipping the modes it already has.
set -uo pipefail

PHASE="${1:-1}"
BUDGET_S="${2:-270}"
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
# The census also imports every project module the checks use: an ImportError or version clash shows here,
# once, without a separate step paying another torch import.
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
for name in ("vace_local.engine.engine", "vace_local.run.job", "vace_bench.synthetic", "vace_local.engine.fastpath", "vace_local.engine.memory",
             "vace_local.engine.step_cache", "vace_bench.flops", "preprocessors", "diffusers.pipelines.wan.pipeline_wan_vace"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - reported; the steps then show what still runs
        print(f"project import FAILED: {name}: {type(exc).__name__}: {exc}")
print("project imports done")
EOF
} 2>&1 | tee "$OUT/env.txt"

# The results file is named after the card, so an H100's and an H200's figures are never mixed.
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
case "$GPU_NAME" in *H100*) SLUG=h100 ;; *H200*) SLUG=h200 ;; *) SLUG=gpu ;; esac
JSON="$OUT/$SLUG-14b.json"
BENCH=("$PY" scripts/bench.py --require-cuda --sizes 832x480x81 --steps 2 --append --mode-limit-s 100 --out "$JSON")
[ -f "docs/bench/$SLUG-14b.json" ] && cp "docs/bench/$SLUG-14b.json" "$JSON"
bench_budget() { echo $(( $(left) - $1 )); }  # what bench.py may plan with, keeping $1 s for later steps

if [ "$PHASE" = 1 ]; then
  # The four target figures first, in this order; extras while the budget lasts; the gpu tests only if time is
  # left (call 2 starts with them).
  step bench-14b 280 "${BENCH[@]}" --model 14b \
    --modes stock,bf16,fast_mode_distilled,offload_group_fp8,cfg_batch,fp8_storage \
    --budget-s "$(bench_budget 5)"
  step pytest-gpu 120 "$PY" -m pytest -m gpu $(grep -l "pytest.mark.gpu" tests/test_*.py) -q -p no:cacheprovider \
    -o addopts="" -ra --timeout 60
elif [ "$PHASE" = rehearse ]; then  # no GPU here: run the CPU half of every step in this environment
  step pytest-collect 120 "$PY" -m pytest -m gpu $(grep -l "pytest.mark.gpu" tests/test_*.py) -q -p no:cacheprovider \
    -o addopts="" --collect-only
  step bench-tiny 300 "$PY" scripts/bench.py --tiny --sizes 32x32x17 --steps 2 --modes bf16,cfg_batch,fp8_storage \
    --out "$OUT/bench-tiny.json"
  step soak-cpu 300 "$PY" scripts/soak.py --jobs 4 --size 32x32x17 --steps 1 --out "$OUT/soak-cpu.json"
else
  # Call 1's targets are kept (--append, same card); a card other than call 1's re-measures them first.
  step pytest-gpu 90 "$PY" -m pytest -m gpu $(grep -l "pytest.mark.gpu" tests/test_*.py) -q -p no:cacheprovider \
    -o addopts="" -ra --timeout 60
  step bench-14b-more 200 "${BENCH[@]}" --model 14b \
    --modes stock,bf16,fast_mode_distilled,offload_group_fp8,compile,fp8_linear,offload_group,fp8_storage,cfg_batch \
    --budget-s "$(bench_budget 45)"
  step soak-cuda 40 "$PY" scripts/soak.py --device cuda --jobs 6 --size 416x240x17 --steps 2 --out "$OUT/soak-cuda.json"
  step bench-1.3b 40 "${BENCH[@]}" --model 1.3b --modes stock,bf16 --budget-s "$(bench_budget 2)"
fi

echo "=== summary (phase $PHASE, $(( $(date +%s) - START )) s of ${BUDGET_S} s)"
printf '  %s\n' "${SUMMARY[@]}"
for f in "$JSON" "$OUT/bench-tiny.json"; do
  [ -f "$f" ] && "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['table'])" "$f"
done
ls -l "$OUT"
exit "$FAILED"  # 1 when any step failed or timed out: the summary above says which
