#!/usr/bin/env bash
# The GPU checks of the Wan work in one device call: the CUDA tests, then benchmarks/wan_gpu.py's
# sections with this tree ("after"), then the share with the tree in .before/ ("before": an
# earlier commit's packforcing/, benchmarks/ and configs/, if present), on the same GPU in the
# same call, so the two are comparable.
#
#   bash benchmarks/wan_gpu_device.sh OUT [SECTIONS] [BUDGET] [MEMORY_GIB]
#
# SECTIONS: wan_gpu.py's --only for this tree (default: every section, which writes
# OUT/wan_gpu.{json,md}: the attention kernels, xformers included when it loads; the per-layer
# copy against attention over the stored parts; each policy's time and memory; the
# cache-management share copied, with the top-K once per pass, and split); BUDGET: its --budget
# in seconds (default 470, under 8 minutes: at 92e9ac0 on an H100 the benchmark took 451 s, the
# whole call 533 s with the installs and the tests, and the full cache ran out of memory in its
# 89th block, 196 s into its section; cut so the whole call ends within CALL_LIMIT, 585 s by default, when the
# installs and tests before it run long, less the before tree's 100 s run and its margin when
# .before/ is there). MEMORY_GIB: wan_gpu.py's --memory-gib (default: 79.1
# on a card of more than 80 GB, so an H200 runs out where an 80 GB H100 does, within the
# budget: uncapped, its 141 GB
# would hold ~75 more blocks at 0.86 GB each, about 1.8x the blocks and, as each block's time grows
# with the cache, some 3x the time; "none" for no cap). First, the CUDA tests go to
# OUT/tests.log: the attention backends' (tests/test_backends.py: xformers, and each SDPA
# kernel's log-sum-exp), the host syncs' (tests/test_host_syncs.py: a full PackForcing
# context's passes under CUDA's sync debug mode, copied and split) and whole runs on CUDA
# (tests/test_device_runs.py: generate as on the CPU, bit-exact resume, the pinned archive, flat
# device memory, a tiny Wan pipeline from text to MP4).
#
# Needs the wheels the GPU image lacks in .whl/ (diffusers, importlib_metadata, cattrs, and
# imageio-ffmpeg 0.6.0 for the MP4s: 0.8's wheel alone is over the 64 MiB a call carries). PyPI's
# xformers wheel is built against CUDA 12: with xformers and nvidia-cuda-runtime-cu12 in .whl/
# too, its libcudart.so.12 is put on the loader's path so xformers can load beside a torch built
# for another CUDA (whether it does is printed, and the attention section times it if so).
set -uo pipefail
out=${1:?usage: wan_gpu_device.sh OUT [SECTIONS] [BUDGET] [MEMORY_GIB]}
sections=${2:-attention,copy,packforcing,sliding_window,sink_recent,full,shares,shares_per_pass,shares_split}
budget=${3:-470}
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
memory=${4:-$( [ "${total_mib:-0}" -gt 82000 ] && echo 79.1 || echo none )}
cap=()
if [ "$memory" != none ]; then
    cap=(--memory-gib "$memory")
    echo "a ${total_mib} MiB card: what the run allocates is capped at $memory GiB"
fi
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
if [ -d /tmp/site/nvidia/cuda_runtime/lib ]; then
    export LD_LIBRARY_PATH=/tmp/site/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
quiet() { grep -v -E '^WARNING\[XFORMERS\]|XFORMERS_MORE_DETAILS|^ +(PyTorch|Python) [0-9]'; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PYTHONPATH=$PWD:/tmp/site python3 -c "import torch, diffusers, cattrs, packforcing; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" || exit 1
PYTHONPATH=$PWD:/tmp/site python3 -c "
import torch, xformers.ops as xops
q = torch.randn(1, 64, 2, 128, device='cuda', dtype=torch.bfloat16)
out = xops.memory_efficient_attention(q, q, q)
ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, q, q))).transpose(1, 2)
print('xformers', xops.__name__, 'works: max |xformers - sdpa| =', float((out - ref).abs().max()))
" 2>&1 | tail -1
PYTHONPATH=$PWD:/tmp/site timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_backends.py \
    tests/test_host_syncs.py tests/test_device_runs.py 2>&1 \
    | quiet | tee "$out/tests.log" | tail -3
# the whole call must end within the device's per-command limit (600 s; CALL_LIMIT less a
# margin): slow installs or tests take their time from the benchmark, not past the limit, and
# so does the before tree's run (its budget and the same margin) when there is one
before_budget=100
reserve=15
if [ -d .before ]; then
    reserve=$(( reserve + before_budget + 15 ))
fi
left=$(( ${CALL_LIMIT:-585} - SECONDS - reserve ))
[ "$left" -lt 0 ] && left=0
if [ "$left" -lt "${budget%.*}" ]; then
    echo "benchmark budget cut from $budget s to $left s (the installs and tests took ${SECONDS} s)"
    budget=$left
fi
PYTHONPATH=$PWD:/tmp/site python3 benchmarks/wan_gpu.py --out "$out" --only "$sections" --budget "$budget" ${cap[@]+"${cap[@]}"} 2>&1 \
    | quiet | tee "$out/after.log"
if [ -d .before ]; then
    mkdir -p "$out/before"
    (cd .before && PYTHONPATH=$PWD:/tmp/site python3 benchmarks/wan_gpu.py --out "$out/before" --only shares --budget "$before_budget" 2>&1 \
        | quiet | tee "$out/before/before.log")
fi
