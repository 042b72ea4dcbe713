#!/usr/bin/env bash
# The GPU checks of the Wan work in one device call: benchmarks/wan_gpu.py's PackForcing run (to
# 120 s of video) and cache-management share with this tree ("after"), then the share with the
# tree in .before/ ("before": an earlier commit's packforcing/, benchmarks/ and configs/, if
# present), on the same GPU in the same call, so the two are comparable.
#
#   bash benchmarks/wan_gpu_device.sh OUT [SECTIONS] [BUDGET]
#
# SECTIONS: wan_gpu.py's --only for this tree (default packforcing,shares,shares_per_pass);
# BUDGET: its --budget in seconds (default 300).
#
# Needs the wheels the GPU image lacks in .whl/ (diffusers, importlib_metadata, cattrs).
set -uo pipefail
out=${1:?usage: wan_gpu_device.sh OUT [SECTIONS] [BUDGET]}
sections=${2:-packforcing,shares,shares_per_pass}
budget=${3:-300}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PYTHONPATH=$PWD:/tmp/site python3 -c "import torch, diffusers, cattrs, packforcing; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" || exit 1
PYTHONPATH=$PWD:/tmp/site python3 benchmarks/wan_gpu.py --out "$out" --only "$sections" --budget "$budget" 2>&1 \
    | grep -v -i xformers | tee "$out/after.log"
if [ -d .before ]; then
    mkdir -p "$out/before"
    (cd .before && PYTHONPATH=$PWD:/tmp/site python3 benchmarks/wan_gpu.py --out "$out/before" --only shares --budget 100 2>&1 \
        | grep -v -i xformers | tee "$out/before/before.log")
fi
