#!/usr/bin/env bash
# Everything that needs a GPU, in one short run: a lent H100/H200 session has about 15 minutes
# in all, so this is prepared and checked on CPU first (--dry-run), then run once on the GPU.
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_session.sh --dry-run  # here, on CPU: tiny shapes, checks the plumbing
#   bash benchmarks/gpu_session.sh train [--dry-run]   # the bundled model's training (issue 13), alone
#
# `train` continues the run ${RUN:-training/runs/v3} on the GPU from the shard that travels with
# the working tree (carry training/shards/v3, made here by `python training/shard.py --run
# training/runs/v3 --out training/shards/v3`; SHARD=DIR names another; the corpus cannot be built
# there, nothing outside is reachable) and leaves in $OUT what comes back: the fp32 weights in
# pieces of 15 MiB (cat model.safetensors.part-* > training/runs/v3/state/model.safetensors),
# progress.json, training.json and the log. The AdamW
# moments stay behind ($OUT takes 8 files, 64 MiB): a later CPU segment starts them afresh.
#
# Logs go to ${OUT:-gpu-results}/ (one file per step; the benchmarks' last lines are JSON).
# Needs torch, safetensors, tokenizers, msgpack and pytest (the GPU image has them);
# bitsandbytes for the nf4/int8 rows (carry it as a wheel where it is missing). Each step has its
# own time limit, and a failing step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
: > "$out/summary.txt"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
dry=0
mode=checks
for arg in "$@"; do
    case $arg in --dry-run) dry=1 ;; train) mode=train ;; esac
done

step() {  # step NAME SECONDS COMMAND...: run it, log to $out/NAME.log, note the outcome
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name: $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
    tail -n 15 "$out/$name.log"
}

if ! "$py" -c "import diffucode.daemon" 2>/dev/null; then  # offline, no dependencies fetched
    step install 120 "$py" -m pip install --no-deps --no-build-isolation --no-index -e .
fi
"$py" - <<'EOF' | tee "$out/hardware.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF

if [ $mode = train ]; then
    run="${RUN:-training/runs/v3}"
    shard="${SHARD:-training/shards/$(basename "$run")}"
    if [ $dry = 1 ]; then
        step train 600 "$py" training/train.py --run "$run" --corpus "$shard" --device cuda --dry-run
    else  # 8000 steps of a 6.5 M-parameter model: minutes on one GPU; saved every 2 minutes and at the end
        step train 560 "$py" training/train.py --run "$run" --corpus "$shard" --device cuda \
            --minutes 8.5 --save-minutes 2 --eval-every 1000
        if [ -f "$run/state/model.safetensors" ]; then
            split -b 15M "$run/state/model.safetensors" "$out/model.safetensors.part-"
            cp "$run/state/progress.json" "$run/training.json" "$out/"
        fi
    fi
    cat "$out/summary.txt"
    exit 0
fi

if [ $dry = 1 ]; then
    step pytest-cuda 300 "$py" -m pytest -q -m cuda tests
    step bench-7b 300 "$py" -m diffucode bench --shape tiny --device cpu --requests 2 --context 96 --generate 32 \
        --quality-samples 0
    step bench-bundled 300 "$py" -m diffucode bench --device cpu --requests 2 --quality-samples 4 --thresholds 0.9
    step quantization-7b 300 "$py" benchmarks/quantization.py --shape small --device cpu --repeat 1 --only bf16
else  # at most 590 s in all: the device tool runs one command for 600 s at most
    step pytest-cuda 90 "$py" -m pytest -q -m cuda tests
    step bench-7b 240 "$py" -m diffucode bench --shape 7b --device cuda --requests 5 --quality-samples 0
    step bench-bundled 90 "$py" -m diffucode bench --device cuda --requests 5 --quality-samples 200
    step quantization-7b 170 "$py" benchmarks/quantization.py --shape 7b --device cuda --repeat 3
fi
cat "$out/summary.txt"
