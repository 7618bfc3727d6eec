#!/usr/bin/env bash
# The GPU checks of one short session on a single GPU, in order of importance, each under its own time limit so that
# one slow or failing part leaves time for the rest. Logs go to $1 (default: gpu-logs/).
#
#   bash benchmarks/gpu_checks.sh [LOG_DIR] [PARTS...]     PARTS: sd15 deepspeed sdxl sd35 flux (the default, in
#                                                          this order) and objectives (only when named)
#
# objectives: every objective at SD1.5 size for its peak memory (torch.cuda.max_memory_allocated) and time per call,
# one process each under OBJECTIVE_SECONDS (default 150) seconds: 16 trajectories of 10 steps, train batch 8, one
# window, bf16, the product loop only, then DAG-DB and RTB again with gradient checkpointing. Each writes
# LOG_DIR/objective-<name>.json and .log; about a minute each on an H200 (an estimate: the build and save of the
# random-weight pipeline, ~30 s of it, is repeated per objective).
#
# Needs dag_trl's dependencies (diffusers, peft, accelerate, transformers, deepspeed) importable; the numbers go into
# docs/benchmarks.md with the versions the first lines of env.txt print.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-gpu-logs}
shift || true
parts=${*:-sd15 deepspeed sdxl sd35 flux}
mkdir -p "$logs"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, diffusers, transformers, peft, accelerate; print(sys.version.split()[0], 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
    python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)"
} 2>&1 | tee "$logs/env.txt"

run() {  # run NAME SECONDS COMMAND...
    local name=$1 seconds=$2
    shift 2
    echo "== $name (limit ${seconds}s): $*" | tee "$logs/$name.log"
    local start=$SECONDS
    timeout "$seconds" "$@" >>"$logs/$name.log" 2>&1
    echo "== $name exit $? after $((SECONDS - start))s" | tee -a "$logs/$name.log"
}

for part in $parts; do
    case $part in
        # One sampling batch of 16 (not the setting's 2) and accumulation 2 (one window): the straightforward loop
        # alone takes minutes at 32 trajectories.
        sd15) run sd15 240 python3 benchmarks/benchmark_training.py --setting sd15-gpu --sample-batches 1 --accumulation 2 ;;
        # Two launches: train two epochs with a checkpoint each, then resume from the latest for a third.
        deepspeed) ds="accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml --num_processes 1"
            ds="$ds --mixed_precision bf16 benchmarks/deepspeed_smoke.py --output $(mktemp -d)"
            run deepspeed 180 bash -c "$ds && $ds --resume" ;;
        sdxl) run sdxl 150 python3 benchmarks/benchmark_training.py --setting sdxl-gpu ;;
        sd35) run sd35 150 python3 benchmarks/benchmark_training.py --setting sd35-gpu ;;
        # torch 2.11's cuDNN attention fails in FLUX's backward on an H200 (docs/benchmarks.md): use the other kernels.
        flux) run flux 200 python3 benchmarks/benchmark_training.py --setting flux-gpu --disable-cudnn-attention ;;
        objectives)
            for objective in dag_db dag_kl rtb ddpo kl_pg rdb dag_db:gc rtb:gc; do
                name=${objective%:gc} extra=() label=objective-${objective/:/-}
                [[ $objective == *:gc ]] && extra=(--gradient-checkpointing)
                run "$label" "${OBJECTIVE_SECONDS:-150}" python3 benchmarks/benchmark_training.py --setting sd15-gpu \
                    --objective "$name" --loops optimised --no-warmup --steps 10 --sample-batches 1 --accumulation 2 \
                    "${extra[@]}" --json "$logs/$label.json"
            done ;;
        *) echo "unknown part $part" ;;
    esac
done
