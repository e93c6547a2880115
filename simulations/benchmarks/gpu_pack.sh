#!/usr/bin/env bash
# Pack what the GPU check needs into .gpu/ (git-ignored, about 20 MiB): wheels of the packages a
# torch-only Python 3.12 lacks, and one federated site's records as a compact float16 array file.
#   PTBXL_DIR=../shared/ptb-xl bash simulations/benchmarks/gpu_pack.sh      # here: online, with PTB-XL
#   bash simulations/benchmarks/gpu_check.sh                                # there: offline, with .gpu/
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PACK=${GPU_PACK:-.gpu}
version() { "$PY" -m pip show "$1" | awk '/^Version:/{print $2}'; }
mkdir -p "$PACK/wheels"
rm -f "$PACK"/wheels/*.whl
# The same versions as this environment's; --no-deps: the GPU image already holds their other needs.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$PACK/wheels" "opacus==$(version opacus)" "dp-accounting==$(version dp-accounting)" "dm-tree==$(version dm-tree)"
"$PY" -m simulations.benchmarks.bench_train --config configs/unet_gpu.yaml --export-cache "$PACK/site.npz" --records 1400
du -sh "$PACK"
