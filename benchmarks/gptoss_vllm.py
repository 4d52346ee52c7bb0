"""vLLM serving a Rolecast gpt-oss adapter (LoRA on attention and on the fused experts): does it
load, does it give what PEFT gives, and how fast is it at 32 and 128 streams. Prints one JSON
object per line.

The server is started with the command `rolecast serve --engine vllm` builds for a gpt-oss
base (`serving.vllm_launcher`: `--enable-lora`, `--reasoning-parser openai_gptoss`, the adapter
as a `--lora-modules` entry), plus `--max-model-len`, `--gpu-memory-utilization` and, for the
throughput run, `--load-format dummy` (random weights in place of reading the checkpoint).

Prompts are rendered with the model's chat template (harmony) and sent as token ids to
`/v1/completions`: vLLM's chat endpoint renders gpt-oss prompts with openai-harmony, whose
o200k vocabulary a stand-in model does not have (and an offline host cannot download); token
ids are also what makes the comparison with PEFT exact.

- `--check`: real weights; for each prompt, greedy tokens from vLLM (base and adapter) against
  transformers + PEFT in bf16 on the same GPU (identical tokens; the first divergence and the
  top-2 gap there), and the teacher-forced |delta logprob| of vLLM's tokens under PEFT;
- `--precision`: no vLLM; the reference's own bf16 greedy replies judged by the same weights in
  fp32, with the same measures: how far bf16 alone moves replies on these weights;
- throughput: `--streams` concurrent requests of `--max-tokens` tokens each (`ignore_eos`),
  half on the adapter and half on the base, and all on the adapter.

    python benchmarks/gptoss_vllm.py --model /tmp/gpt-oss-20b --adapter runs/bench \\
        --data /tmp/haruhi.jsonl --check                   # equivalence, real weights
    python benchmarks/gptoss_vllm.py --model /tmp/gpt-oss-20b --adapter runs/bench \\
        --data /tmp/haruhi.jsonl --load-format dummy       # throughput at 32 and 128 streams
    python benchmarks/gptoss_vllm.py ... --print-command   # the vLLM command only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from formats import lora  # noqa: E402
from serving.settings import ServeSettings  # noqa: E402
from serving.vllm_launcher import build_vllm_command, format_command  # noqa: E402

ADAPTER = "persona@v1"
BASE = "gpt-oss"


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def vllm_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    settings = ServeSettings(
        model=args.model,
        served_model_name=BASE,
        port=args.port,
        host="127.0.0.1",
        max_model_len=args.max_model_len,
        lora_modules={ADAPTER: str(args.adapter)},
        max_lora_rank=lora.allowed_rank(lora.rank(lora.read_config(Path(args.adapter)))),
        kv_cache_memory_gb=args.kv_cache_memory_gb,
    )
    argv, env = build_vllm_command(settings, None, args.model)
    if args.no_lora:
        argv = without_lora(argv)
    argv += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.load_format != "auto":
        argv += ["--load-format", args.load_format]
    if args.enforce_eager:
        argv.append("--enforce-eager")
    return argv, {**env, "VLLM_USE_FLASHINFER_SAMPLER": "0"}


LORA_FLAGS = ("--max-loras", "--max-lora-rank", "--max-cpu-loras")  # each takes one value


def without_lora(argv: list[str]) -> list[str]:
    """The launcher's command with LoRA off: no `--enable-lora`, its sizes or its adapters."""
    out: list[str] = []
    skip = 0
    for i, arg in enumerate(argv):
        if skip:
            skip -= 1
        elif arg == "--enable-lora":
            pass
        elif arg in LORA_FLAGS:
            skip = 1
        elif arg == "--lora-modules":  # its values run to the next flag
            skip = next((j for j, a in enumerate(argv[i + 1 :]) if a.startswith("--")), len(argv))
        else:
            out.append(arg)
    return out


def prompts(model: str, data: str, count: int, max_len: int) -> list[list[int]]:
    """Token ids of dialogue contexts (up to a user turn), rendered by the model's template."""
    from transformers import AutoTokenizer

    from finetune.data import ASSISTANT, load_dialogues

    tokenizer = AutoTokenizer.from_pretrained(model)
    out: list[list[int]] = []
    for dialogue in load_dialogues(data, None, 10**9):
        messages = dialogue.messages
        last = max(i for i, m in enumerate(messages) if m["role"] == ASSISTANT)
        ids = tokenizer.apply_chat_template(
            messages[:last], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        if len(ids) <= max_len:
            out.append(list(ids))
        if len(out) == count:
            break
    return out


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError("vLLM did not become ready")


async def complete(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    prompt: list[int],
    max_tokens: int,
    **extra: Any,
) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    response = await client.post(f"{url}/v1/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


async def served_greedy(
    args: argparse.Namespace, url: str, ids: list[list[int]]
) -> list[tuple[str, list[int], list[float]]]:
    """vLLM's greedy tokens and their log-probabilities for each prompt, base then adapter."""
    async with httpx.AsyncClient() as client:
        names = [BASE] if args.no_lora else [BASE, ADAPTER]
        asked = [(name, p) for name in names for p in ids]
        answers = await asyncio.gather(
            *(
                complete(client, url, name, p, args.check_tokens, logprobs=1, return_token_ids=True)
                for name, p in asked
            )
        )
    out = []
    for (name, _), answer in zip(asked, answers, strict=True):
        choice = answer["choices"][0]
        tokens = choice.get("token_ids") or []
        logprobs = choice["logprobs"]["token_logprobs"]
        out.append((name, list(tokens), list(logprobs)))
    return out


def load_reference(args: argparse.Namespace, dtype: Any) -> Any:
    """transformers + PEFT: the stand-in's weights (MXFP4 experts dequantized) and the adapter,
    computing in `dtype`."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.moe import quantization_kwargs

    base = AutoModelForCausalLM.from_pretrained(
        args.model,
        dtype=dtype,
        attn_implementation="eager",
        device_map="cuda" if torch.cuda.is_available() else "cpu",
        **quantization_kwargs(AutoConfig.from_pretrained(args.model)),
    )
    return PeftModel.from_pretrained(base, str(args.adapter), adapter_name="persona").eval()


def adapter_context(model: Any, name: str) -> Any:
    """The base's rows run with the adapter disabled, the adapter's with it on."""
    import contextlib

    return model.disable_adapter() if name == BASE else contextlib.nullcontext()


def reference_greedy(
    model: Any, args: argparse.Namespace, ids: list[list[int]]
) -> list[tuple[str, list[int], list[float]]]:
    """The reference's own greedy tokens and log-probabilities, as `served_greedy` gets vLLM's."""
    import torch

    out = []
    for name in (BASE, ADAPTER):
        for prompt in ids:
            with torch.no_grad(), adapter_context(model, name):
                result = model.generate(
                    input_ids=torch.tensor([prompt], device=model.device),
                    attention_mask=torch.ones(
                        1, len(prompt), dtype=torch.long, device=model.device
                    ),
                    max_new_tokens=args.check_tokens,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            tokens = result.sequences[0, len(prompt) :].tolist()
            logprobs = [
                float(torch.log_softmax(step[0].float(), -1)[token])
                for step, token in zip(result.logits, tokens, strict=False)
            ]
            out.append((name, tokens, logprobs))
    return out


def check_equivalence(
    model: Any,
    ids: list[list[int]],
    served: list[tuple[str, list[int], list[float]]],
    check: str = "vllm_vs_peft",
) -> None:
    """Served greedy tokens against `model` (transformers + PEFT): where its own argmax on the
    same tokens first differs, the top-2 gap there, and the teacher-forced |delta logprob|."""
    import torch

    for k, (name, tokens, logprobs) in enumerate(served):
        prompt = ids[k % len(ids)]
        with torch.no_grad(), adapter_context(model, name):
            full = torch.tensor([prompt + tokens], device=model.device)
            logits = model(input_ids=full).logits[0, len(prompt) - 1 : -1].float()
            lp = torch.log_softmax(logits, -1)
            forced = lp.gather(1, full[0, len(prompt) :, None])[:, 0].tolist()
            greedy = logits.argmax(-1).tolist()
            first = next(
                (i for i, (a, b) in enumerate(zip(greedy, tokens, strict=False)) if a != b), None
            )
            gap = None
            if first is not None:
                top2 = lp[first].topk(2).values
                gap = round(float(top2[0] - top2[1]), 4)
        deltas = [abs(a - b) for a, b in zip(forced, logprobs, strict=False) if b is not None]
        emit(
            check=check,
            model=name,
            prompt_tokens=len(prompt),
            tokens=len(tokens),
            identical=first is None,
            first_divergence=first,
            top2_gap_there=gap,
            max_abs_dlogprob=round(max(deltas), 4) if deltas else None,
            mean_abs_dlogprob=round(sum(deltas) / len(deltas), 5) if deltas else None,
        )


def precision_check(args: argparse.Namespace, ids: list[list[int]]) -> None:
    """No vLLM: the reference's own bf16 greedy replies judged by the same weights computing in
    fp32, with the same measures as the vLLM check. How far bf16 alone moves these replies is
    the scale against which vLLM's differences are read."""
    import gc

    import torch

    model = load_reference(args, torch.bfloat16)
    served = reference_greedy(model, args, ids)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    check_equivalence(load_reference(args, torch.float32), ids, served, "bf16_vs_fp32")


def throughput(args: argparse.Namespace, url: str, ids: list[list[int]]) -> None:
    async def run(streams: int, models: list[str]) -> dict[str, Any]:
        limits = httpx.Limits(max_connections=streams + 8)
        async with httpx.AsyncClient(limits=limits) as client:
            started = time.monotonic()
            jobs = [
                complete(
                    client,
                    url,
                    models[i % len(models)],
                    ids[i % len(ids)],
                    args.max_tokens,
                    ignore_eos=True,
                )
                for i in range(streams)
            ]
            answers = await asyncio.gather(*jobs)
            seconds = time.monotonic() - started
        generated = sum(a["usage"]["completion_tokens"] for a in answers)
        return {
            "streams": streams,
            "models": models,
            "output_tokens": generated,
            "seconds": round(seconds, 2),
            "output_tokens_per_s": round(generated / seconds, 1),
        }

    # warm-up: every level's batch shapes, both kinds of row, the adapter loaded; the last
    # run's first level once included these first-use costs
    for streams in args.streams:
        asyncio.run(run(streams, [ADAPTER, BASE]))
    for streams in args.streams:
        for round_ in range(args.rounds):
            for models in ([ADAPTER, BASE], [ADAPTER]):
                emit(measure="throughput", round=round_, **asyncio.run(run(streams, models)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a gpt-oss model directory")
    parser.add_argument("--adapter", required=True, type=Path, help="a Rolecast adapter dir")
    parser.add_argument(
        "--data", required=True, help="ShareGPT JSONL for the prompts (`rolecast data clean`)"
    )
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    parser.add_argument(
        "--kv-cache-memory-gb", type=float, help="fixed KV cache: other work shares the GPU"
    )
    parser.add_argument("--load-format", default="auto", help="auto, or dummy (random weights)")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--check", action="store_true", help="compare with PEFT (real weights)")
    parser.add_argument(
        "--no-lora",
        action="store_true",
        help="with --check: serve the base alone, without --enable-lora, and compare its replies "
        "with the plain model's (does enabling LoRA change the base's replies?)",
    )
    parser.add_argument(
        "--precision",
        action="store_true",
        help="no vLLM: the reference's bf16 greedy replies against the same weights in fp32 "
        "(how much bf16 alone moves them: the scale for --check's figures)",
    )
    parser.add_argument("--check-prompts", type=int, default=8)
    parser.add_argument("--check-tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="measured runs of each level")
    parser.add_argument("--print-command", action="store_true")
    args = parser.parse_args()

    problems = lora.problems(args.adapter)
    argv, env = vllm_command(args)
    emit(command=format_command(argv, env), adapter_problems=problems)
    if args.print_command:
        return
    ids = prompts(args.model, args.data, max(args.check_prompts, 64), args.max_model_len // 2)
    if not ids:
        raise SystemExit(f"no dialogue context in {args.data} fits half of --max-model-len")
    if args.precision:
        precision_check(args, ids[: args.check_prompts])
        return
    if args.no_lora and not args.check:
        raise SystemExit("--no-lora goes with --check")
    if args.check and args.load_format == "dummy":
        raise SystemExit("--check needs the real weights: drop --load-format dummy")
    url = f"http://127.0.0.1:{args.port}"
    log = open(Path(os.environ.get("VLLM_LOG", "vllm.log")), "wb")
    process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=log)
    try:
        emit(ready_s=round(wait_ready(url, process, timeout=1200), 1))
        models = httpx.get(f"{url}/v1/models").json()["data"]
        emit(served=[m["id"] for m in models])
        if args.check:
            served = asyncio.run(served_greedy(args, url, ids[: args.check_prompts]))
        else:
            throughput(args, url, ids)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    if args.check:
        import torch

        check_equivalence(load_reference(args, torch.bfloat16), ids[: args.check_prompts], served)


if __name__ == "__main__":
    main()
