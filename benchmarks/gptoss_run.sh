#!/usr/bin/env bash
# The gpt-oss-20b GPU run on an offline GPU host (a stand-in model in gpt-oss-20b's exact
# configuration, random weights; benchmarks/RESULTS.md, "gpt-oss-20b"), in phases that each
# finish well inside ten minutes on an H200:
#
#   benchmarks/gptoss_run.sh prepare   write the stand-in, clean haruhi's dialogues with its
#                                      tokenizer, train a 20-step adapter (attention + experts)
#   benchmarks/gptoss_run.sh train     the training benchmark: Rolecast against transformers + PEFT
#   benchmarks/gptoss_run.sh vllm      vLLM serving the adapter: against PEFT on the stand-in's
#                                      weights, the base without LoRA against the plain model,
#                                      then throughput at 32 and 128 streams (dummy weights)
#   benchmarks/gptoss_run.sh scaling   one GPU against two (DDP through accelerate launch)
#
# Environment: BUNDLE_DIR (a vLLM bundle built with KEEP_MOE=1: gpt-oss needs vLLM's MoE
# kernels), WHEELS_DIR (scripts/build-wheelhouse.sh's folders), DATA_DIR (haruhi.jsonl),
# WORK (default runs/gptoss, kept between phases), RESULTS (default $WORK/results: one
# JSON-lines file per benchmark), VOCAB (optional: o200k_base.tiktoken, plain or gzipped, for
# gpt-oss's own tokenizer; without it the stand-in gets a stand-in tokenizer; vLLM's harmony
# parsers load the same file, which an offline host must give them: TIKTOKEN_ENCODINGS_BASE).
# VLLM_OPTIONS (more gptoss_vllm.py options, e.g. --gpu-memory-utilization 0.3
# --kv-cache-memory-gb 16 beside other work on the GPU). CUDA_VISIBLE_DEVICES picks the GPU(s).
# Run from the repository root.
set -euo pipefail
phase=${1:?usage: $0 prepare|train|vllm|scaling}
: "${BUNDLE_DIR:?the vLLM bundle}" "${WHEELS_DIR:?the wheel folders}" "${DATA_DIR:?the dialogues}"
WORK=$(mkdir -p "${WORK:-runs/gptoss}" && cd "${WORK:-runs/gptoss}" && pwd)
RESULTS=${RESULTS:-$WORK/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 ROLECAST_HOME=$WORK/home ROLECAST_CACHE_DIR=$WORK/cache
exports=$(scripts/vllm-host.sh --prefix "$WORK/host" --wheels "$WHEELS_DIR" \
  --extras serve,train --env "$BUNDLE_DIR")  # stops here if the host lacks anything
eval "$exports"
MODEL=$WORK/gpt-oss-20b DATA=$WORK/haruhi.jsonl ADAPTER=$WORK/adapter
say() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
bench() {  # bench NAME COMMAND...: its JSON lines in $RESULTS/NAME.jsonl
  local name=$1
  shift
  say "$name"
  "$@" | tee "$RESULTS/$name.jsonl" || say "$name did not finish"
}

case $phase in
  prepare)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$RESULTS/machine.txt"
    bench standin python3 -m finetune.standin gpt-oss-20b "$MODEL" --corpus "$DATA_DIR"/*.jsonl \
      --device cuda ${VOCAB:+--vocab "$VOCAB"}
    python3 -m rolecast data clean "$DATA_DIR/haruhi.jsonl" -o "$DATA" --base "$MODEL"
    python3 -m rolecast train --data "$DATA" --persona haruhi --base "$MODEL" --output "$ADAPTER" \
      --max_steps 20 --json > "$RESULTS/train.jsonl"
    ;;
  train)
    bench gptoss_train python3 benchmarks/gptoss_train.py --base "$MODEL" --data "$DATA" \
      --steps 6 --warmup 2
    ;;
  vllm)
    site=$(python3 -c 'import vllm, os; print(os.path.dirname(vllm.__file__))')
    [ -f "$site/_moe_C_stable_libtorch.abi3.so" ] || {
      say "this vLLM bundle has no MoE kernels: build it with KEEP_MOE=1"
      exit 1
    }
    if [ -n "${VOCAB:-}" ]; then  # openai-harmony reads $TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken
      mkdir -p "$WORK/encodings"
      case $VOCAB in
        *.gz) gzip -dc "$VOCAB" > "$WORK/encodings/o200k_base.tiktoken" ;;
        *) cp "$VOCAB" "$WORK/encodings/o200k_base.tiktoken" ;;
      esac
      export TIKTOKEN_ENCODINGS_BASE=$WORK/encodings TIKTOKEN_RS_CACHE_DIR=$WORK/encodings
    fi
    VLLM_LOG=$RESULTS/vllm-check.log bench gptoss_vllm_check python3 benchmarks/gptoss_vllm.py \
      --model "$MODEL" --adapter "$ADAPTER" --data "$DATA" --check ${VLLM_OPTIONS:-}
    # the base on a server without LoRA: whether enabling LoRA is what changes the base's replies
    VLLM_LOG=$RESULTS/vllm-base.log bench gptoss_vllm_base python3 benchmarks/gptoss_vllm.py \
      --model "$MODEL" --adapter "$ADAPTER" --data "$DATA" --check --no-lora ${VLLM_OPTIONS:-}
    VLLM_LOG=$RESULTS/vllm-dummy.log bench gptoss_vllm_throughput python3 benchmarks/gptoss_vllm.py \
      --model "$MODEL" --adapter "$ADAPTER" --data "$DATA" --load-format dummy ${VLLM_OPTIONS:-}
    ;;
  scaling)
    bench gptoss_scaling python3 benchmarks/gptoss_scaling.py --base "$MODEL" --data "$DATA"
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
say "phase $phase done"
