#!/usr/bin/env bash
# Every check that needs a GPU, in one go, for a machine lent for a few minutes; the most
# wanted first, so a run cut short still leaves them:
#   1. the CUDA-only tests, first because they are quick and say whether the rest means anything
#      (CUDA augmentation against CPU; no host sync between checkpoints; a replayed CUDA graph
#      follows the eager steps; the frozen-BatchNorm backward on CUDA),
#   2. tools/bench_train.py --device cuda (end to end, ERM ResNet-50 224 px, 3 x 32: the target;
#      the fast side's steps replayed as CUDA graphs, its model eager),
#   3. the same with the model compiled too (trainer.compile=true, cold) by 4 inductor compile
#      workers instead of one per core: what they cost in peak host memory against what they
#      save in compilation time,
#   4. the same with 8 compile workers,
#   5. tools/bench_step.py (one step: eager NCHW / channels_last with PyTorch's or dgbench's
#      frozen-BatchNorm backward, CUDA graph, compile, both),
#   6. as 3 with one compile worker per core (inductor's default),
#   7. tools/check_cuda.py (every algorithm under bf16 + channels_last, host syncs per update;
#      ResNet-50 fp32 vs bf16),
#   8. tools/bench_data_pipeline.py --device cuda (data path, reference vs fast),
#   9. tools/bench_checkpoint.py --device cuda (the loop's wait per checkpoint, in place vs in
#      the background).
# Steps 3, 4 and 6 reuse step 2's reference run (`bench_train.py --reference`) when it exists.
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
bench_train() {  # bench_train NAME [ENV=VALUE ...] -- [bench_train.py ARGS ...]; shows its figures
    local name=$1 reference=()
    shift
    local env=()
    while [ "$1" != "--" ]; do env+=("$1"); shift; done
    shift
    if [ -f "$out/bench_train.json" ]; then
        reference=(--reference "$out/bench_train.json")
    fi
    step "$name" env "${env[@]}" python3 tools/bench_train.py --root "$root" --device cuda \
        "${reference[@]}" --json "$out/$name.json" "$@"
    tail -n 25 "$out/$name.log"
}
compiled=(--fast-override trainer.compile=true)
bench_train bench_train --
bench_train bench_train_compiled_4_workers TORCHINDUCTOR_COMPILE_THREADS=4 -- "${compiled[@]}"
bench_train bench_train_compiled_8_workers TORCHINDUCTOR_COMPILE_THREADS=8 -- "${compiled[@]}"
step bench_step python3 tools/bench_step.py --json "$out/bench_step.json"
bench_train bench_train_compiled -- "${compiled[@]}"
step check_cuda python3 tools/check_cuda.py --json "$out/check_cuda.json"
step bench_data_pipeline python3 tools/bench_data_pipeline.py --root "$root" --device cuda --steps 100 \
    --json "$out/bench_data_pipeline.json"
step bench_checkpoint python3 tools/bench_checkpoint.py --device cuda --json "$out/bench_checkpoint.json"
exit $failed
