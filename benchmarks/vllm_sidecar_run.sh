#!/usr/bin/env bash
# The GPU test run of vLLM as Rolecast's sidecar on one offline GPU host, in phases that each
# finish well inside ten minutes (deploy/OPERATIONS.md, "The GPU test run"):
#
#   benchmarks/vllm_sidecar_run.sh prepare    set up from the bundle and wheels, convert the
#                                             default model, train the adapters the checks use
#   benchmarks/vllm_sidecar_run.sh vllm       start vLLM (timed, compiling), run bot, the Discord
#                                             flow, publish, throughput and equivalence
#   benchmarks/vllm_sidecar_run.sh retrain    start vLLM again (timed: on the compile cache),
#                                             run the retrain loop with it as sidecar
#   benchmarks/vllm_sidecar_run.sh embedded   the embedded server on the same GPU, bounded
#
# Environment: BUNDLE_DIR (the vLLM bundle's parts), WHEELS_DIR (scripts/build-wheelhouse.sh's
# folders), DATA_DIR (haruhi.jsonl, atri.jsonl, xin.jsonl), WORK (default runs/vllm-sidecar:
# kept between phases), RESULTS (default $WORK/results: one JSON-lines file per check, and
# the servers' logs), CHECKS (the vllm phase's checks, default "bot discord publish throughput
# equivalence"; a later run can repeat only some), SERVE_OPTIONS (`rolecast serve` options for
# vLLM, default "--gpu-memory-utilization 0.5"; with other work on the same GPU add
# --kv-cache-memory-gb). Run from the repository root.
set -euo pipefail
phase=${1:?usage: $0 prepare|vllm|retrain|embedded}
: "${BUNDLE_DIR:?the vLLM bundle}" "${WHEELS_DIR:?the wheel folders}" "${DATA_DIR:?the dialogues}"
WORK=$(mkdir -p "${WORK:-runs/vllm-sidecar}" && cd "${WORK:-runs/vllm-sidecar}" && pwd)
RESULTS=${RESULTS:-$WORK/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 ROLECAST_HOME=$WORK/home ROLECAST_CACHE_DIR=$WORK/cache
export ROLECAST_ADAPTERS_DIR=$WORK/adapters ROLECAST_SERVE_MAX_LORAS=6
host=(scripts/vllm-host.sh --prefix "$WORK/host" --wheels "$WHEELS_DIR" --extras serve,train)
exports=$("${host[@]}" --env "$BUNDLE_DIR")  # stops here if the host lacks anything
eval "$exports"
A=(--adapter "rolecast-personas=formats/shipped/rolecast-personas"
   --adapter "r16=$WORK/r16" --adapter "r256=$WORK/r256")
say() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
healthy() { python3 -c "import urllib.request as u; u.urlopen('$1/health', timeout=2)" 2> /dev/null; }

start_vllm() {  # start_vllm LOG: vLLM through the launcher, in its own session; waits for /health
  local t0=$SECONDS
  setsid "${host[@]}" "$BUNDLE_DIR" -- --port 8000 $SERVE_OPTIONS > "$1" 2>&1 &
  echo $! > "$WORK/vllm.pid"
  until healthy http://127.0.0.1:8000; do
    kill -0 "$(cat "$WORK/vllm.pid")" 2> /dev/null || { tail -n 40 "$1" >&2; return 1; }
    sleep 1
  done
  echo "{\"event\": \"start\", \"log\": \"$(basename "$1")\", \"seconds\": $((SECONDS - t0))}" \
    >> "$RESULTS/starts.jsonl"
  say "vLLM answered /health after $((SECONDS - t0)) s"
}
stop_vllm() {
  local pid
  pid=$(cat "$WORK/vllm.pid")
  kill -INT -- "-$pid" 2> /dev/null || kill -INT "$pid"
  while kill -0 "$pid" 2> /dev/null; do sleep 1; done
}
SERVE_OPTIONS=${SERVE_OPTIONS:---gpu-memory-utilization 0.5}
CHECKS=" ${CHECKS:-bot discord publish throughput equivalence} "
wanted() { [[ $CHECKS == *" $1 "* ]]; }
bench() {  # bench NAME ARGS...: one check, its JSON lines in $RESULTS/NAME.jsonl
  local name=$1
  shift
  say "check $name"
  python3 benchmarks/vllm_sidecar.py "$@" --data "$DATA_DIR" | tee "$RESULTS/$name.jsonl" \
    || say "check $name did not pass"
}

case $phase in
  prepare)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$RESULTS/machine.txt"
    python3 -c 'import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)' >> "$RESULTS/machine.txt"
    python3 -m rolecast serve --prepare-only
    mkdir -p "$WORK/d"
    for p in haruhi atri xin; do python3 -m rolecast data clean "$DATA_DIR/$p.jsonl" -o "$WORK/d/$p.jsonl"; done
    python3 -m rolecast data split "$WORK/d/haruhi.jsonl" -o "$WORK/d"
    cat "$WORK/d/haruhi_train.jsonl" "$WORK/d/atri.jsonl" "$WORK/d/xin.jsonl" > "$WORK/d/mix_train.jsonl"
    train=(python3 -m rolecast train --persona haruhi)
    # the README's recipe (rsLoRA r256, the other personas' dialogues added), and two quick ones
    "${train[@]}" --data "$WORK/d/mix_train.jsonl" --output "$WORK/r256" --lora_r 256 \
      --lora_alpha 16 --use_rslora true --learning_rate 5e-4 --epochs 4 --warmup_ratio 0.05
    "${train[@]}" --data "$WORK/d/haruhi_train.jsonl" --output "$WORK/r16" --max_steps 60
    "${train[@]}" --data "$WORK/d/haruhi_train.jsonl" --output "$WORK/r16b" --max_steps 60 --seed 43
    ;;
  vllm)
    [ -f "$WORK/vllm.pid" ] && stop_vllm 2> /dev/null || true
    start_vllm "$RESULTS/vllm-first.log"  # a first start compiles (~3 min on an H200)
    B=(--server http://127.0.0.1:8000 --kind vllm)
    wanted bot && bench bot bot "${B[@]}"
    if wanted discord; then
      say "the Discord flow"
      ROLECAST_GPU_SERVER_URL=http://127.0.0.1:8000 python3 -m pytest -q -m gpu tests/gpu \
        -p no:cacheprovider > "$RESULTS/discord.txt" 2>&1 || say "the Discord flow did not pass"
    fi
    wanted publish && bench publish publish "${B[@]}" --publish-adapter "$WORK/r16"
    wanted throughput && bench throughput throughput "${B[@]}" "${A[@]}" \
      --adapter "r16b=$WORK/r16b" --max-tokens 128 \
      --rounds 8  # levels of 10-30 s: the steady state, not the first seconds
    # last, being the slow one: each reply is also generated by transformers + PEFT (~5 s)
    wanted equivalence && bench equivalence equivalence "${B[@]}" "${A[@]}" --prompts 4 \
      --max-tokens 32
    stop_vllm
    ;;
  retrain)
    start_vllm "$RESULTS/vllm-retrain.log"  # the vllm phase's compile cache: the start it saves
    # haruhi's card imported under a new key: the built-in haruhi's live version is the shipped
    # adapter, trained on most of the dialogues the gate holds out, which no retrain beats
    bench retrain retrain --server http://127.0.0.1:8000 --kind vllm --dialogues 1000 \
      --persona haruhi-imported
    stop_vllm
    ;;
  embedded)
    t0=$SECONDS
    setsid python3 -m rolecast serve --port 8001 --max-num-seqs 32 --max-waiting 256 \
      > "$RESULTS/embedded.log" 2>&1 &
    pid=$!
    until healthy http://127.0.0.1:8001; do
      kill -0 "$pid" 2> /dev/null || { tail -n 40 "$RESULTS/embedded.log" >&2; exit 1; }
      sleep 1
    done
    say "the embedded server answered /health after $((SECONDS - t0)) s"
    B=(--server http://127.0.0.1:8001 --kind embedded)
    bench equivalence-embedded equivalence "${B[@]}" "${A[@]}" --prompts 4 --max-tokens 32
    bench throughput-embedded throughput "${B[@]}" "${A[@]}" --adapter "r16b=$WORK/r16b" \
      --max-tokens 128 --levels 8,32 --rounds 1 --level-timeout 200
    kill -INT "$pid"
    wait "$pid" || true
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
say "phase $phase done"
