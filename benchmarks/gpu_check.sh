#!/usr/bin/env bash
# GPU check, for a machine with one NVIDIA GPU and torch/triton/transformers/peft installed
# (no download). Builds the CUDA extension in place, runs the kernel tests on CUDA, benchmarks
# each kernel against the plain PyTorch equivalent and init_lora on a Llama-1B-shaped random
# model. Budget: under 8 minutes on an H200. Results land in ${RESULTS:-gpu_results}/.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-gpu_results}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FISHER_KERNELS_CUDA_ARCHS=${FISHER_KERNELS_CUDA_ARCHS:-90}
status=0
step() { echo; echo "=== $1 ($(date +%T))"; }

step "environment"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

step "build the CUDA extension (nvcc)"
timeout 300 python3 -m fisher_kernels._build_cuda fisher_kernels 2>&1 | tail -3 || status=1
python3 -c "import fisher_kernels, json; print(json.dumps(fisher_kernels.backends(), indent=1))" | tee "$RESULTS/backends.json"

step "kernel tests on CUDA (every backend against the reference), auto-selection, torch.library ops"
timeout 300 python3 -m pytest -q -x tests/test_ops.py tests/test_autotune.py tests/test_library.py 2>&1 | tail -5 || status=1
timeout 120 python3 -m pytest -q tests/test_statistics.py -k triton 2>&1 | tail -2 || status=1

step "kernels vs gather + PyTorch (d = 4096, 16k tokens, bf16; cuda's Gram kernels on tensor cores)"
timeout 240 python3 -m benchmarks.kernels --d 4096 --tokens 16384 --basis 1024 --dtype bfloat16 \
    --json "$RESULTS/kernels.json" | tee "$RESULTS/kernels.md" || status=1

step "init_lora on a Llama-1B-shaped random model"
timeout 420 python3 -m benchmarks.init_time --preset llama-1b --device cuda \
    --methods filet_projected,lora_da,peft_lora_ga,peft_pissa,gaussian \
    --json "$RESULTS/init_time.json" | tee "$RESULTS/init_time.md" || status=1

echo; echo "gpu_check finished with status $status"
exit $status
