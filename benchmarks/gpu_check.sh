#!/usr/bin/env bash
# One call on a one-GPU machine with no network (at most 8 minutes): the GPU-marked tests, then
# benchmarks/bench.py on real-size random-weight SD 1.5 (batch 4, 512 px: optimized, naive, bf16) and
# SDXL (batch 4, 1024 px: optimized, bf16), printed as one table with the targets
# (SD 1.5 b4 512 px: step <= 0.3 s, extraction >= 10 images/s).
#
#   benchmarks/gpu_check.sh            # on the GPU machine: installs .whl/ first (benchmarks/gpu_wheels.sh builds it)
#   benchmarks/gpu_check.sh --dry-run  # anywhere: no install, CPU, tiny models (tests/test_gpu_check.py runs it)
#
# PYTHON (default python3) is the interpreter; results and logs go to GPU_CHECK_OUT, else $OUT, else a
# temporary folder.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}
out=${GPU_CHECK_OUT:-${OUT:-$(mktemp -d)}}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

if [[ $dry_run == 0 ]]; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "No wheels in .whl/: build them with benchmarks/gpu_wheels.sh on a machine with a package index," >&2
    echo "and carry .whl with the call (the GPU machine has no network)." >&2
    exit 2
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    .whl/*.whl >"$out/install.log" 2>&1 || { echo "pip install of .whl/ failed:" >&2; tail -20 "$out/install.log" >&2; exit 2; }
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
  if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "No CUDA GPU is visible to $python: run with --dry-run on a machine without one." >&2
    exit 2
  fi
  # Real sizes and the default settings (500 tokens, R = 128, 10 augmentations per extracted image).
  sd15=(--model sd15 --image-size 512 --batch-size 4 --extract-batch 4 --steps 5 --warmup 2 --extract-reps 2)
  sdxl=(--model sdxl --image-size 1024 --batch-size 4 --extract-batch 4 --steps 3 --warmup 1 --extract-reps 1)
  limits=(150 150 180)
else
  export GPU_TESTS_ON_CPU=1
  tiny=(--model tiny --device cpu --image-size 64 --batch-size 1 --tokens 32 --res 8 --iterations 2 --steps 1
        --warmup 0 --extract-batch 1 --extract-reps 1)
  sd15=("${tiny[@]}")
  sdxl=("${tiny[@]}")
  limits=(300 150 150)
fi

"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
timeout "${limits[0]}" "$python" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
  --junitxml "$out/gpu_tests.xml" >"$out/gpu_tests.log" 2>&1
echo "gpu tests: exit $?"
timeout "${limits[1]}" "$python" -m benchmarks.bench "${sd15[@]}" --modes optimized naive bf16 --json "$out/bench_sd15.json" \
  >"$out/bench_sd15.log" 2>&1
echo "bench SD 1.5: exit $?"
timeout "${limits[2]}" "$python" -m benchmarks.bench "${sdxl[@]}" --modes optimized bf16 --json "$out/bench_sdxl.json" \
  >"$out/bench_sdxl.log" 2>&1
echo "bench SDXL: exit $?"

report=("$python" -m benchmarks.gpu_report "$out")
[[ $dry_run == 1 ]] && report+=(--dry-run)
"${report[@]}"
