#!/usr/bin/env bash
# The GPU checks in one run on a CUDA machine that has a copy of the repository but not
# ../shared/data: CUDA-vs-CPU tests on real faces, then the prepare, training-step, upscale and
# verify-sweep speed benchmarks (benchmarks/RESULTS.md records their numbers).
#
# On a machine with ../shared/data, pack the data the checks read (~25 MiB, ignored by git):
#   python benchmarks/device_kit.py --prepared scratch/lfw      # -> device_kit/
# copy the repository and device_kit/ to the GPU machine and run, from the repository root:
#   OUT=device_out bash benchmarks/device_checks.sh
# It writes at most eight files under $OUT: device.txt (nvidia-smi, torch), checks.log (all
# output), cuda_tests.xml (tests/test_cuda.py), prepare.json, train_step.json, upscale.json and
# verify_sweep.json. Each step has its own time limit (550 s in all), so one slow step cannot
# take the others' results with it. DEVICE=cpu runs the same steps on the CPU (slowly).
set -u
OUT=${OUT:-device_out}
KIT=${KIT:-device_kit}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu: a (slow) dry run of the plumbing here
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/checks.log"
export FSR_SHARED_DATA="$KIT/data"   # tests/test_cuda.py reads its LFW photos and the MTCNN reference there

if ls "$KIT"/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$KIT"/wheels/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== $name exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

{ nvidia-smi; python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } > "$OUT/device.txt" 2>&1

step unpack 60 python3 benchmarks/device_kit.py --unpack "$KIT"
step cuda_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py --junitxml="$OUT/cuda_tests.xml"
step upscale 90 python3 benchmarks/upscale.py --device "$DEVICE" --batch-size 512 --models default,rrdb23 --json "$OUT/upscale.json"
step train_step 90 python3 benchmarks/train_step.py --device "$DEVICE" --steps 30 --warmup 5 --json "$OUT/train_step.json"
step prepare 60 python3 benchmarks/prepare.py --device "$DEVICE" --lfw "$KIT/data/lfw/lfw-deepfunneled" --images 512 --repeats 3 --json "$OUT/prepare.json"
step verify_sweep 130 python3 benchmarks/verify_sweep.py --device "$DEVICE" --data "$KIT/lfw_pairs" --pairs "$KIT/lfw_pairs/pairs.txt" \
  --json "$OUT/verify_sweep.json"
echo "done $(date -u +%H:%M:%S)" | tee -a "$LOG"
