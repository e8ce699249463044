#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for whoever has one:
#   bash tools/gpu_check.sh [OUT_DIR]        (default: $OUT if set, else ./gpu_check_out)
# Steps (each logged to OUT_DIR/<step>.log, one line per step in OUT_DIR/summary.txt; a failing
# step does not stop the later ones, the script exits non-zero if any failed):
#   env        nvidia-smi, nvcc, torch, compute-sanitizer versions
#   build      the CPU and CUDA extensions, built in parallel for this GPU's architecture only
#              (TORCH_CUDA_ARCH_LIST), then `python -m gradwire.ops`
#   tests      every test marked gpu (CUDA kernels bit-exact against the reference; codec packets
#              on the GPU equal to the CPU's), junit XML in OUT_DIR/gpu_tests.xml
#   memcheck / racecheck / synccheck   compute-sanitizer on tools/gpu_sanitize_workload.py
#   bench      bench/kernels.py --device cuda -> OUT_DIR/kernels_cuda_<gpu>.json
#   mainjob    launch/train.py single-process on the GPU, 100 steps, baseline and fp6/prune/nm
# Everything is also packed into OUT_DIR/gpu_check.tgz (a device that returns few files).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUTDIR="${1:-${OUT:-$ROOT/gpu_check_out}}"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
mkdir -p "$OUTDIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GRADWIRE_BUILD_DIR="${GRADWIRE_BUILD_DIR:-$WORK/build}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
PY="${PYTHON:-python3}"
SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
FAILED=0

step() {  # step NAME SECONDS CMD...: run under a time limit, log, time, record (rc 124: timed out)
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  timeout -k 10 "$limit" bash -c "$*" >"$WORK/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s (limit ${limit}s)" | tee -a "$WORK/summary.txt"
  [ $rc -eq 0 ] || FAILED=1
  tail -n 5 "$WORK/$name.log" | sed "s/^/  [$name] /"
  cp "$WORK/summary.txt" "$OUTDIR/"  # what ran so far survives an outer time limit
}

env_info() {
  nvidia-smi || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
  nvcc --version || true
  "$SAN" --version || true
  "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
}

build() {
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || return 1
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  # Two processes, one per extension (separate cache folders): the builds overlap.
  for b in cpu cuda; do
    "$PY" -c "from gradwire import _build; print('$b', _build._load_one('$b'))" &
  done
  wait -n && wait -n || return 1
  "$PY" -m gradwire.ops
  "$PY" -m gradwire.ops | grep -q "\[cuda\] native kernels loaded"
}

gpu_tests() {
  local xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
  "$PY" -m pytest -q -p no:cacheprovider -m gpu "${xdist[@]}" --continue-on-collection-errors \
    --junitxml="$WORK/gpu_tests.xml" tests
}

sanitize() {  # sanitize TOOL [workload args]
  local tool=$1
  shift
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 1 --print-limit 50 \
    "$PY" tools/gpu_sanitize_workload.py "$@"
}

bench() {
  local name
  name=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_').lower())")
  "$PY" bench/kernels.py --device cuda --out "$WORK/kernels_cuda_$name.json" &&
    cp "$WORK/kernels_cuda_$name.json" "$OUTDIR/"
}

mainjob() {
  local rc=0 c
  for c in baseline fp6 prune80 nm24-fp8; do
    "$PY" launch/train.py --config "configs/$c.json" --steps 100 --device cuda --no-progress \
      --report-dir "$WORK/mainjob/$c" || rc=1
  done
  # The same fp6 run on this machine's CPU, for the loss beside the GPU's.
  "$PY" launch/train.py --config configs/fp6.json --steps 100 --device cpu --no-progress \
    --report-dir "$WORK/mainjob/fp6-cpu" || rc=1
  return $rc
}

# Build for this GPU's architecture only (fewer nvcc passes); every step loads the same build.
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)}"
export TORCH_CUDA_ARCH_LIST ROOT WORK OUTDIR PY SAN
export -f env_info build gpu_tests sanitize bench mainjob
# Limits (seconds) keep the whole check inside one 10-minute device call.
step env 30 env_info
step build 200 build
step tests 150 gpu_tests
step bench 120 bench
step memcheck 90 sanitize memcheck
step racecheck 60 sanitize racecheck --shared
step mainjob 90 mainjob
step synccheck 45 sanitize synccheck --shared
grep -h "ERROR SUMMARY" "$WORK"/{memcheck,racecheck,synccheck}.log 2>/dev/null | sed 's/^/sanitizer: /' | tee -a "$WORK/summary.txt"
cp "$WORK/summary.txt" "$WORK"/kernels_cuda_*.json "$OUTDIR"/ 2>/dev/null
tar czf "$OUTDIR/gpu_check.tgz" -C "$WORK" --exclude=build .
echo "results: $OUTDIR (all logs in gpu_check.tgz)"
exit $FAILED
