#!/usr/bin/env bash
# The GPU check, offline, in the repository root with .gpu/ from gpu_pack.sh (under 10 minutes on one GPU):
# the multi-scale preset at GPU size (configs/unet_gpu.yaml) trained through THE loop without DP and under DP
# (Opacus hooks; ghost clipping fuses the per-sample norms), then sampled. Prints samples/s, the DP/non-DP
# ratio, peak GPU memory and records/s; the figures also go to .gpu/gpu_check.jsonl.
set -euo pipefail
cd "$(dirname "$0")/../.."
PACK=${GPU_PACK:-.gpu}
SITE=${GPU_SITE_PACKAGES:-/tmp/fedecg-site-packages}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$PACK"/wheels/*.whl
export PYTHONPATH="$SITE:$PWD"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name())"
python3 -m simulations.benchmarks.bench_train --config configs/unet_gpu.yaml --cache "$PACK/site.npz" \
  --steps 30 --warmup 5 --variants nondp,hooks,ghost --json "$PACK/gpu_check.jsonl"
python3 -m simulations.benchmarks.bench_sample --config configs/unet_gpu.yaml --records 1024 --batch 256,1024
