"""Stand-in gpt-oss model directories: gpt-oss-20b's public configuration with random weights,
for machines that cannot download the real model, with gpt-oss's own tokenizer where its
vocabulary is at hand and a STAND-IN tokenizer where it is not.

The real gpt-oss tokenizer is o200k_harmony: o200k_base's byte-level BPE (199,998 tokens, its
pre-tokenizer pattern) and harmony's special tokens from id 199,998 up to 201,087. tiktoken and
openai-harmony fetch `o200k_base.tiktoken` from the network at run time; offline, the file can
come from a package that carries it (bpe-openai does, gzipped) or be given as a path
(`--vocab FILE`, its sha256 checked against tiktoken's). With it, the tokenizer written here is
gpt-oss's own (`harmony_tokenizer`). Without it (`--vocab` not given), the tokenizer is a
stand-in: a small byte-level BPE (trained on the text it is given, else the 256 bytes alone)
with harmony's special tokens (`<|start|>`, `<|end|>`, `<|message|>`, `<|channel|>`,
`<|return|>`, `<|call|>`, `<|constrain|>`, `<|endoftext|>`, `<|startoftext|>`,
`<|endofprompt|>` and the reserved ones) at their real ids, so that the public config's token ids
(eos 200002, pad 199999) and every id-level rule (stop tokens, channel parsing) hold as on the
real model. Either way the chat template (`templates/harmony.jinja`) renders what gpt-oss's
published template renders for conversations without tools. A stand-in's text ids differ from
the real model's; speed and memory do not depend on them. A model directory written here says
which tokenizer it has in its `rolecast_standin.json`.

    python -m finetune.standin gpt-oss-20b OUT [--vocab auto|FILE] [--corpus data/*.jsonl]
                                               [--bf16] [--device cuda]
    python -m finetune.standin tiny OUT            # the small variant the CPU tests use

`gpt-oss-20b` writes the expert weights as MXFP4 blocks and scales, as the real checkpoint
does (about 13 GB), unless `--bf16`; the tiny variant is plain unless `--mxfp4`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import logging
import math
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parent / "templates" / "harmony.jinja"
MARKER = "rolecast_standin.json"

#: Harmony's named special tokens at their o200k_harmony ids; the ids between them up to the
#: vocabulary's end are `<|reserved_N|>`.
SPECIAL_TOKENS = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
    200018: "<|endofprompt|>",
}
FIRST_SPECIAL = 199998
VOCAB_SIZE = 201088
#: every special id of o200k_harmony: the named ones, and `<|reserved_N|>` between them
REAL_SPECIALS = {
    i: SPECIAL_TOKENS.get(i, f"<|reserved_{i}|>") for i in range(FIRST_SPECIAL, VOCAB_SIZE)
}

#: o200k_base's pre-tokenizer pattern (tiktoken's `openai_public.o200k_base`).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)  # fmt: skip
#: sha256 of `o200k_base.tiktoken` as tiktoken expects it
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

#: gpt-oss-20b's public config.json (the MXFP4 checkpoint's), key for key.
GPT_OSS_20B: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}
#: gpt-oss-20b's public generation_config.json.
GENERATION_CONFIG = {
    "bos_token_id": 199998,
    "do_sample": True,
    "eos_token_id": [200002, 199999, 200012],
    "pad_token_id": 199999,
}


def tiny_config(vocab_size: int, special_ids: dict[str, int]) -> dict[str, Any]:
    """gpt-oss's architecture at a size a CPU trains in milliseconds: 2 layers (one sliding
    window, one full), 4 experts with 2 active, attention sinks, a sliding window of 8."""
    config = {
        k: v for k, v in GPT_OSS_20B.items() if k not in ("quantization_config", "layer_types")
    }
    config.update(
        hidden_size=64,
        intermediate_size=64,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        num_local_experts=4,
        num_experts_per_tok=2,
        experts_per_token=2,
        sliding_window=8,
        max_position_embeddings=4096,
        vocab_size=vocab_size,
        eos_token_id=special_ids["<|return|>"],
        pad_token_id=special_ids["<|endoftext|>"],
    )
    return config


# --- the tokenizer ---------------------------------------------------------------------------


def corpus_texts(paths: Iterable[Path]) -> Iterator[str]:
    """Every string value of the JSON lines in `paths` (ShareGPT or OpenAI rows), or the lines
    of plain text files: what the stand-in BPE learns its merges from."""

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                yield from strings(json.loads(line))
            except ValueError:
                yield line


def build_tokenizer(texts: Iterable[str] = (), *, merges: int = 0, real_ids: bool = True) -> Any:
    """The stand-in tokenizer: byte-level BPE with up to `merges` merges learned from `texts`,
    harmony's special tokens, the harmony chat template.

    `real_ids`: the special tokens at their o200k_harmony ids and a vocabulary of 201,088, the
    ids between the BPE's last token and 199,998 unused (as the real model's embedding rows
    are all there); else the special tokens right after the BPE's tokens (a small vocabulary
    for a tiny model).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + merges,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(texts if merges else [""], trainer)
    spec = json.loads(bpe.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    base = len(vocab)
    if real_ids:
        if base > FIRST_SPECIAL:
            raise ValueError("too many merges for the real special-token ids")
        for i in range(base, FIRST_SPECIAL):
            vocab[f"<|standin_unused_{i}|>"] = i
        special = REAL_SPECIALS
    else:
        special = {base + k: token for k, token in enumerate(SPECIAL_TOKENS.values())}
    return _with_specials(spec, special)


def _with_specials(spec: dict[str, Any], special: dict[int, str]) -> Any:
    """A transformers tokenizer from a `tokenizers` spec whose BPE vocabulary ends below the
    special tokens' ids, with the special tokens at those ids and the harmony chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = spec["model"]["vocab"]
    for i, token in special.items():
        vocab[token] = i
    spec["added_tokens"] = [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, token in sorted(special.items())
    ]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<|startoftext|>",
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )
    tokenizer.chat_template = TEMPLATE.read_text(encoding="utf-8")
    return tokenizer


def o200k_vocab() -> Path | None:
    """`o200k_base.tiktoken` as an installed package carries it (bpe-openai, gzipped), or None."""
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / "o200k_base.tiktoken.gz"
    return path if path.is_file() else None


def harmony_tokenizer(vocab: Path) -> Any:
    """gpt-oss's own tokenizer, o200k_harmony: o200k_base's BPE read from `vocab` (an
    `o200k_base.tiktoken` file, plain or gzipped, checked against tiktoken's sha256), o200k's
    pre-tokenizer pattern, harmony's special tokens at their ids, the harmony chat template.
    Reading the file needs tiktoken (transformers converts it with tiktoken's loader)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    raw = Path(vocab).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != O200K_SHA256:
        raise ValueError(
            f"{vocab} is not o200k_base.tiktoken: its sha256 is {digest}, tiktoken's is "
            f"{O200K_SHA256}"
        )
    with tempfile.TemporaryDirectory(prefix="o200k-") as tmp:
        plain = Path(tmp) / "o200k_base.tiktoken"
        plain.write_bytes(raw)
        bpe = TikTokenConverter(vocab_file=str(plain), pattern=O200K_PATTERN).converted()
    spec = json.loads(bpe.to_str())
    spec["added_tokens"] = []
    if len(spec["model"]["vocab"]) != FIRST_SPECIAL:
        raise ValueError(f"{vocab}: {len(spec['model']['vocab'])} tokens, o200k_base has 199,998")
    special = REAL_SPECIALS
    return _with_specials(spec, special)


def special_ids(tokenizer: Any) -> dict[str, int]:
    return {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS.values()}


# --- the weights -------------------------------------------------------------------------------


def _shapes(config: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor of a gpt-oss checkpoint, in transformers' names."""
    h, v = config["hidden_size"], config["vocab_size"]
    heads, kv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    e, inter = config["num_local_experts"], config["intermediate_size"]
    yield "model.embed_tokens.weight", (v, h), "normal"
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (h,), "ones"
        yield f"{p}.post_attention_layernorm.weight", (h,), "ones"
        yield f"{p}.self_attn.sinks", (heads,), "normal"
        for proj, out in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)):
            yield f"{p}.self_attn.{proj}.weight", (out, h), "normal"
            yield f"{p}.self_attn.{proj}.bias", (out,), "zeros"
        yield f"{p}.self_attn.o_proj.weight", (h, heads * d), "normal"
        yield f"{p}.self_attn.o_proj.bias", (h,), "zeros"
        yield f"{p}.mlp.router.weight", (e, h), "normal"
        yield f"{p}.mlp.router.bias", (e,), "zeros"
        yield f"{p}.mlp.experts.gate_up_proj", (e, h, 2 * inter), "experts"
        yield f"{p}.mlp.experts.gate_up_proj_bias", (e, 2 * inter), "zeros"
        yield f"{p}.mlp.experts.down_proj", (e, inter, h), "experts"
        yield f"{p}.mlp.experts.down_proj_bias", (e, h), "zeros"
    yield "model.norm.weight", (h,), "ones"
    yield "lm_head.weight", (v, h), "normal"


def random_tensors(
    config: dict[str, Any], *, mxfp4: bool, seed: int, device: str = "cpu"
) -> Iterator[tuple[str, Any]]:
    """Random weights in bf16 (std `initializer_range`, biases 0, norms 1), one tensor at a
    time; the experts as MXFP4 blocks and scales when `mxfp4`."""
    import torch

    from finetune import mxfp4 as fp4

    std = float(config.get("initializer_range", 0.02))
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, shape, kind in _shapes(config):
        if kind == "experts" and mxfp4:
            blocks, scales = fp4.random_codes(shape, std, generator, device)  # type: ignore[arg-type]
            yield f"{name}_blocks", blocks.cpu()
            yield f"{name}_scales", scales.cpu()
            continue
        if kind == "ones":
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        elif kind == "zeros":
            tensor = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(shape, dtype=torch.bfloat16, device=device)
            tensor.normal_(0.0, std, generator=generator)
        yield name, tensor.cpu()


def write_checkpoint(
    folder: Path, tensors: Iterable[tuple[str, Any]], shard_bytes: int = 4 * 2**30
) -> None:
    """Safetensors shards of at most about `shard_bytes` and their index, tensor by tensor."""
    from safetensors.torch import save_file

    shards: list[dict[str, Any]] = [{}]
    size = total = 0
    names: list[list[str]] = [[]]
    written: list[str] = []

    def flush(last: bool) -> None:
        if not shards[-1]:
            return
        name = f"model-{len(written):05d}.safetensors"
        save_file(shards[-1], str(folder / name), metadata={"format": "pt"})
        written.append(name)
        if not last:
            shards.append({})
            names.append([])

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush(last=False)
            size = 0
        shards[-1][name] = tensor.contiguous()
        names[-1].append(name)
        size += nbytes
        total += nbytes
    flush(last=True)
    count = len(written)
    final = []
    weight_map = {}
    for index, (old, keys) in enumerate(zip(written, names, strict=True)):
        new = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        (folder / old).rename(folder / new)
        final.append(new)
        weight_map.update(dict.fromkeys(keys, new))
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


def write_model_dir(
    folder: Path,
    *,
    shape: str = "gpt-oss-20b",
    texts: Iterable[str] = (),
    merges: int = 0,
    mxfp4: bool | None = None,
    seed: int = 0,
    device: str = "cpu",
    vocab: Path | None = None,
) -> Path:
    """A loadable gpt-oss model directory: config, generation config, random weights, a
    tokenizer (gpt-oss's own from `vocab`, an o200k_base.tiktoken file, else the stand-in) and a
    marker that says it is a stand-in and which tokenizer it has."""
    if shape not in ("gpt-oss-20b", "tiny"):
        raise ValueError(f"unknown shape {shape!r}: gpt-oss-20b or tiny")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    real = shape == "gpt-oss-20b"
    if vocab is not None and not real:
        raise ValueError("the o200k_harmony vocabulary (201,088 ids) is for gpt-oss-20b's shape")
    if vocab is not None:
        tokenizer = harmony_tokenizer(vocab)
    else:
        tokenizer = build_tokenizer(texts, merges=merges, real_ids=real)
    if real:
        config = dict(GPT_OSS_20B)
        generation = dict(GENERATION_CONFIG)
    else:
        ids = special_ids(tokenizer)
        config = tiny_config(len(tokenizer), ids)
        generation = {
            "bos_token_id": ids["<|startoftext|>"],
            "do_sample": True,
            "eos_token_id": [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]],
            "pad_token_id": ids["<|endoftext|>"],
        }
    use_mxfp4 = real if mxfp4 is None else mxfp4
    if use_mxfp4:
        config["quantization_config"] = dict(GPT_OSS_20B["quantization_config"])
    else:
        config.pop("quantization_config", None)
    config["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if real:
        tensors = random_tensors(config, mxfp4=use_mxfp4, seed=seed, device=device)
    else:
        tensors = _tiny_tensors(config, mxfp4=use_mxfp4, seed=seed)
    write_checkpoint(folder, tensors)
    tokenizer.save_pretrained(folder)
    (folder / MARKER).write_text(
        json.dumps(
            {
                "standin": True,
                "shape": shape,
                "tokenizer": "o200k_harmony" if vocab is not None else "stand-in",
                "note": "random weights in gpt-oss's architecture, not trained weights; "
                + (
                    "gpt-oss's own tokenizer (o200k_harmony)"
                    if vocab is not None
                    else "a stand-in tokenizer (byte-level BPE with harmony's special tokens "
                    "at their real ids), not the o200k_harmony vocabulary"
                ),
                "bpe_tokens": _bpe_size(tokenizer),
                "mxfp4": use_mxfp4,
                "seed": seed,
            },
            indent=2,
        )
    )
    return folder


def _bpe_size(tokenizer: Any) -> int:
    vocab = tokenizer.get_vocab()
    return sum(1 for t in vocab if not (t.startswith("<|") and t.endswith("|>")))


def _tiny_tensors(config: dict[str, Any], *, mxfp4: bool, seed: int) -> Iterator[tuple[str, Any]]:
    """The tiny model's weights as transformers initialises them (float32), with the experts
    rounded to MXFP4 and written as blocks and scales when `mxfp4`."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    from finetune import mxfp4 as fp4

    torch.manual_seed(seed)
    model = GptOssForCausalLM(GptOssConfig(**config))
    for name, tensor in model.state_dict().items():
        if mxfp4 and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = fp4.quantize(tensor)
            yield f"{name}_blocks", blocks
            yield f"{name}_scales", scales
        else:
            yield name, tensor.detach().clone()


def is_standin(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.standin",
        description="Write a stand-in gpt-oss model directory (random weights; gpt-oss's own "
        "tokenizer with --vocab, else a stand-in one); needs no model hub.",
    )
    parser.add_argument("shape", choices=["gpt-oss-20b", "tiny"])
    parser.add_argument("output", type=Path)
    parser.add_argument(
        "--corpus", type=Path, nargs="*", default=[], help="JSONL or text the BPE learns from"
    )
    parser.add_argument("--merges", type=int, default=8000, help="BPE merges (with --corpus)")
    parser.add_argument(
        "--vocab",
        help="o200k_base.tiktoken (plain or gzipped) for gpt-oss's own tokenizer, or 'auto': the "
        "copy an installed package carries (bpe-openai); without it, a stand-in tokenizer",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where random weights are drawn")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--mxfp4", action="store_true", default=None, help="experts as MXFP4")
    quant.add_argument("--bf16", action="store_true", help="experts in bf16 (42 GB for 20b)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mxfp4 = False if args.bf16 else args.mxfp4
    merges = args.merges if args.corpus else 0
    vocab = None
    if args.vocab == "auto":
        vocab = o200k_vocab()
        if vocab is None:
            parser.error("no installed package carries o200k_base.tiktoken: install bpe-openai, "
                         "or give the file (--vocab FILE)")  # fmt: skip
    elif args.vocab:
        vocab = Path(args.vocab)
    folder = write_model_dir(
        args.output,
        shape=args.shape,
        texts=corpus_texts(args.corpus),
        merges=merges,
        mxfp4=mxfp4,
        seed=args.seed,
        device=args.device,
        vocab=vocab,
    )
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(json.dumps({"output": str(folder), "bytes": size, "gib": round(size / 2**30, 2)}))


def parameter_counts(config: dict[str, Any]) -> dict[str, int]:
    """Parameters of a gpt-oss config: total, and active per token (the input embedding, a
    lookup, left out; `num_experts_per_tok` of the experts counted)."""
    total = active = 0
    for name, shape, kind in _shapes(config):
        n = math.prod(shape)
        total += n
        if name == "model.embed_tokens.weight":
            continue
        if kind == "experts" or "experts." in name:
            active += n * config["num_experts_per_tok"] // config["num_local_experts"]
        else:
            active += n
    return {"total": total, "active": active}


if __name__ == "__main__":
    main()
