#!/usr/bin/env bash
# GPU check, for a machine with one NVIDIA GPU and torch/triton/transformers/peft installed
# (no download). One command, under 10 minutes on an H200; every step has its own time limit and
# runs whatever the previous ones gave:
#   1. build the CUDA extension in place (nvcc);
#   2. the kernel tests on CUDA: every backend and dtype against the reference, auto-selection,
#      torch.library ops, the Triton statistics path;
#   3. each kernel against gather + PyTorch (d 4096, 16k tokens, bf16) and auto's choices;
#   4. one weight decomposition per driver and linear-algebra library, per Llama-1B weight shape;
#   5. FILet's and LoRA-DA's init under torch.profiler (32 samples: the tables take long to build);
#   6. init_lora on a Llama-1B-shaped bf16 random model (256×512 tokens, r 32), 3 repeats, against
#      one forward+backward and PEFT's LoRA-GA and PiSSA, with the stage times of ours;
#   7. measured CUDA peak of init_lora on a Llama-3-8B-shaped bf16 model (4 blocks) against
#      estimate_memory.
# Results (logs, JSON, markdown) land in ${RESULTS:-gpu_results}/.
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
# run LIMIT NAME CMD...: the command's output to the terminal and to $RESULTS/NAME.log
run() {
    local limit=$1 name=$2; shift 2
    timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "!!! $name exited with $rc"; status=1; }
}

step "environment"
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nvcc --version | tail -2

step "build the CUDA extension (nvcc)"
run 60 build python3 tools/build_cuda.py fisher_kernels
python3 -c "import fisher_kernels, json; print(json.dumps(fisher_kernels.backends(), indent=1))" | tee "$RESULTS/backends.json"

step "kernel tests on CUDA (every backend against the reference), auto-selection, torch.library ops, FILet's bf16 hooks"
workers=""
python3 -c "import xdist" 2>/dev/null && workers="-n 8"
run 70 tests python3 -m pytest -q -rfE $workers tests/ops/test_ops.py tests/ops/test_autotune.py tests/ops/test_library.py \
    tests/statistics/test_collector.py::test_triton_backend_gives_the_reference_statistics \
    tests/test_memory.py::test_filet_bf16_selection_agrees_with_a_float64_reference_except_near_ties \
    tests/methods/test_filet.py::test_a_gpu_models_exact_basis_waits_on_the_host_and_changes_nothing

step "kernels vs gather + PyTorch (d = 4096, 16k tokens; cuda's Gram kernels on tensor cores for bf16)"
run 50 kernels_bf16 python3 -m benchmarks.kernels --d 4096 --tokens 16384 --basis 1024 --dtype bfloat16 \
    --json "$RESULTS/kernels_bf16.json"

step "one weight decomposition per driver and library (Llama-1B shapes, bf16 weights)"
run 45 decomposition python3 -m benchmarks.decomposition_drivers --preset llama-1b --dtype bfloat16 --repeats 2 \
    --json "$RESULTS/decomposition.json"

step "where the time goes: FILet's and LoRA-DA's init_lora under torch.profiler (32 samples of the same model)"
run 45 profile_filet python3 -m benchmarks.profile_init --preset llama-1b --device cuda --dtype bfloat16 \
    --method filet_projected --samples 32
run 45 profile_lora_da python3 -m benchmarks.profile_init --preset llama-1b --device cuda --dtype bfloat16 \
    --method lora_da --samples 32

step "init_lora on a Llama-1B-shaped bf16 random model, 3 repeats"
run 200 init_time python3 -m benchmarks.init_time --preset llama-1b --device cuda --dtype bfloat16 --repeats 3 \
    --methods filet_projected,peft_lora_ga,lora_ga,gaussian,pissa,peft_pissa,lora_da --json "$RESULTS/init_time.json"

step "CUDA peak of init_lora on a Llama-3-8B-shaped bf16 model (4 blocks) against estimate_memory"
run 60 gpu_memory python3 -m benchmarks.gpu_memory --layers 4 --methods filet,lora_ga,lora_da \
    --json "$RESULTS/gpu_memory.json"

echo; echo "gpu_check finished with status $status ($(date +%T))"
exit $status
