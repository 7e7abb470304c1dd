#!/usr/bin/env bash
# Everything this project checks on a CUDA GPU, in one go: build the CUDA kernels, run the GPU tests (and the
# kernels under compute-sanitizer's racecheck and memcheck where the toolkit has it), benchmark
# the kernels (against the chain and mamba_ssm's selective_scan_fn) and a Mamba-130M training step (GrootL vs
# LoRA). Logs and JSON go to $OUT (else benchmarks/gpu/).
#
# Uses the machine's own python3 and torch (no install step, so it runs on a machine without network);
# packages the machine lacks can be put on PYTHONPATH first. Where mamba_ssm is missing, MAMBA_SDIST (default:
# the first .whl/mamba_ssm-*.tar.gz) is built for this GPU by scripts/build_selective_scan.py. Each stage's
# log is kept even when it fails.
#     bash scripts/gpu_check.sh                 # all stages
#     STAGES="tests kernels" bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
py=${PYTHON:-python3}
status=0

stage() {  # stage NAME COMMAND...: run, tee its log, remember a failure
  echo "=== $1: ${*:2}"
  "${@:2}" 2>&1 | tee "$out/$1.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $1: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}

wants() { [[ " ${STAGES:-env build mamba tests sanitize kernels train} " == *" $1 "* ]]; }

wants env && stage env "$py" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name()); import importlib.util as u; print({m: bool(u.find_spec(m)) for m in ('mamba_ssm', 'causal_conv1d', 'transformers', 'peft', 'accelerate', 'datasets')})"
wants build && stage build "$py" -m grootl.tree.native --cuda-only
sdist=${MAMBA_SDIST:-$(ls .whl/mamba_ssm-*.tar.gz 2>/dev/null | head -n 1)}
if wants mamba && ! "$py" -c "import mamba_ssm" 2>/dev/null && [ -n "$sdist" ]; then
  stage mamba "$py" scripts/build_selective_scan.py "$sdist" --out /tmp/mamba_site
  export PYTHONPATH="$PYTHONPATH:/tmp/mamba_site"
fi
wants tests && stage tests "$py" -m pytest -m gpu tests/test_native.py tests/test_native_cuda.py tests/test_tree_compile.py tests/test_model.py -q -p no:cacheprovider
sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null)
if wants sanitize && [ -n "$sanitizer" ]; then  # shared-memory hazards, then out-of-bounds accesses, on hardware
  for tool in racecheck memcheck; do
    stage "$tool" "$sanitizer" --tool "$tool" --error-exitcode 1 "$py" tests/kernels/sanitizer_check.py cuda
  done
fi
wants kernels && stage kernels "$py" scripts/bench_kernels.py --device cuda --batch 1 8 --out "$out/kernels_gpu.json"
wants train && stage train "$py" scripts/bench_train.py --size 130m --device cuda --lengths 512 2048 --batch 4 \
  --precision bf16 --grad-ckpt --arms lora grootl --out "$out/train_130m_gpu.json"
exit $status
