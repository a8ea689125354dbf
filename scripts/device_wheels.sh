#!/usr/bin/env bash
# Download, into the git-ignored .whl/ folder, exactly the wheels the lent GPU machine lacks, so that
# scripts/device_check.sh can install them there (that machine has no network).
#
# The device image (see /work/.library/device/KINDS.md) has Python 3.12, torch 2.11 + CUDA 13, transformers,
# accelerate, huggingface_hub, safetensors, tokenizers, sentencepiece, peft, numpy, pillow, opencv,
# onnxruntime, typer, tqdm, pytest — but no diffusers, pydantic, ftfy, imageio-ffmpeg or torchao.
# Versions are the project's (the shared dev venv); torchao is the release built against torch 2.11.
# One version of each package, --no-deps: the list below is the whole closure over what the image lacks.
# The set must fit the device tool's 64 MiB transfer limit together with the working tree; this script
# checks that and exits 1 when it does not.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${WHEEL_DIR:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
LIMIT_MIB=64

WHEELS=(
  diffusers==0.42.1          # the pipeline itself (pure Python)
  importlib-metadata==10.2.0 # diffusers' one requirement the image lacks (zipp is there)
  pydantic==2.14.4           # vace_local.core.spec
  pydantic-core==2.50.5      # pydantic's compiled half: cp312 manylinux
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0  # pydantic 2.14 needs a recent one; the image's version is not known
  ftfy==6.3.1                # WanVACEPipeline cleans prompts with ftfy (NameError without it)
  wcwidth==0.9.4
  imageio-ffmpeg==0.6.0      # run_job writes the mp4 (the soak); bundles ffmpeg: 29 MiB (0.8.1 is 65 MiB, over the limit)
  torchao==0.17.0            # fp8_linear mode (Float8DynamicActivationFloat8WeightConfig); built for torch 2.11
)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"

ls -l "$DEST"/*.whl
wheels_b=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
# What else travels with a device call: tracked files plus untracked files git does not ignore.
tree_b=$(cd "$ROOT" && { git ls-files -z; git ls-files -z --others --exclude-standard; } | du -cb --files0-from=- 2>/dev/null \
  | tail -1 | cut -f1)
total_mib=$(( (wheels_b + tree_b) / 1048576 ))
echo "wheels: $(( wheels_b / 1024 )) KiB in $(ls "$DEST"/*.whl | wc -l) files; working tree: $(( tree_b / 1024 )) KiB;" \
  "total ${total_mib} MiB of the ${LIMIT_MIB} MiB a device call may carry"
if (( wheels_b + tree_b > LIMIT_MIB * 1048576 )); then
  echo "device_wheels.sh: over the device tool's transfer limit; drop a wheel" >&2
  exit 1
fi
