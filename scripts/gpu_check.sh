#!/usr/bin/env bash
# Build fastmem with its CUDA kernels on a GPU machine, run the GPU tests, then the GPU benchmark.
#   bash scripts/gpu_check.sh [OUTDIR] [BENCH_SECTIONS]
# Logs and the benchmark's JSON go to OUTDIR (default ./gpu_check). Needs torch with CUDA, nvcc, cmake,
# pybind11 and pytest already installed (it installs nothing from the network).
set -uo pipefail
out=${1:-gpu_check}
sections=${2:-attention,decode}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
echo "== build (sm_$arch)"
FASTMEM_CUDA=1 FASTMEM_REQUIRE_NATIVE=1 FASTMEM_CUDA_ARCHS=$arch MAX_JOBS=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
python3 -m fastmem info 2>&1 | tee "$out/info.txt"
echo "== GPU tests"
python3 -m pytest -q -x -p no:cacheprovider tests/test_prefix_attention.py -k cuda 2>&1 | tee "$out/tests.log" | tail -15
echo "== bench ($sections)"
python3 bench/throughput.py --device cuda --only "$sections" --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
