#!/usr/bin/env bash
# Every check that needs a GPU, in one go, for a machine lent for a few minutes; the most
# wanted first, so a run cut short still leaves them:
#   1. the CUDA-only tests, first because they are quick and say whether the rest means anything
#      (CUDA augmentation against CPU; no host sync between checkpoints; a replayed CUDA graph
#      follows the eager steps; the frozen-BatchNorm backward on CUDA),
#   2. tools/bench_train.py --device cuda (end to end, ERM ResNet-50 224 px, 3 x 32: the target;
#      the fast side compiled and CUDA-graphed, its cold compilation counted in protocol_wall_s),
#   3. the same with the fast side's model eager (trainer.compile=false; still CUDA-graphed):
#      no compilation, no compile workers,
#   4. the same as 2 with 4 inductor compile workers instead of one per core (what they cost in
#      peak host memory, against what they save in compilation time),
#   5. tools/bench_step.py (one step: eager NCHW / channels_last with PyTorch's or dgbench's
#      frozen-BatchNorm backward, CUDA graph, compile, both),
#   6. tools/check_cuda.py (every algorithm under bf16 + channels_last, host syncs per update;
#      ResNet-50 fp32 vs bf16),
#   7. tools/bench_data_pipeline.py --device cuda (data path, reference vs fast).
# Each step's output goes to OUT_DIR/<step>.log and its figures to OUT_DIR/<step>.json; a failing
# step is reported and the next one still runs. The exit status is the number of failed steps.
#
#   bash tools/gpu_checks.sh DATA_ROOT OUT_DIR     (DATA_ROOT holds PACS/)
set -u
if [ $# -ne 2 ]; then
    echo "usage: bash tools/gpu_checks.sh DATA_ROOT OUT_DIR  (DATA_ROOT holds PACS/)" >&2
    exit 2
fi
root=$1
out=$2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0

step() {  # step NAME COMMAND...: run it, keep its log, say how it went
    local name=$1
    shift
    local start=$SECONDS
    echo "== $name: $*"
    if "$@" >"$out/$name.log" 2>&1; then
        echo "== $name: ok ($((SECONDS - start)) s)"
    else
        echo "== $name: FAILED with status $? ($((SECONDS - start)) s); the end of $out/$name.log:"
        tail -n 30 "$out/$name.log"
        failed=$((failed + 1))
    fi
}

python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
step tests python3 -m pytest -q -rs -p no:cacheprovider \
    "tests/test_train.py::test_fast_path_steps_between_checkpoints_never_wait_for_the_gpu" \
    "tests/data/test_batch_augment.py::test_cuda_matches_cpu" tests/test_graphs.py \
    tests/backbones/test_fixed_stats_bn.py
step bench_train python3 tools/bench_train.py --root "$root" --device cuda --json "$out/bench_train.json"
tail -n 25 "$out/bench_train.log"
step bench_train_eager_model python3 tools/bench_train.py --root "$root" --device cuda \
    --fast-override trainer.compile=false --json "$out/bench_train_eager_model.json"
tail -n 12 "$out/bench_train_eager_model.log"
step bench_train_4_compile_workers env TORCHINDUCTOR_COMPILE_THREADS=4 python3 tools/bench_train.py \
    --root "$root" --device cuda --json "$out/bench_train_4_compile_workers.json"
tail -n 12 "$out/bench_train_4_compile_workers.log"
step bench_step python3 tools/bench_step.py --json "$out/bench_step.json"
step check_cuda python3 tools/check_cuda.py --json "$out/check_cuda.json"
step bench_data_pipeline python3 tools/bench_data_pipeline.py --root "$root" --device cuda --steps 100 \
    --json "$out/bench_data_pipeline.json"
exit $failed
