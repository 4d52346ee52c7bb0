"""LoRA SFT on a tiny gpt-oss (CPU): attention sinks and sliding windows in packed rows, the
experts adapted through PEFT's target_parameters, vLLM's servable targets, MXFP4 loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune import models, mxfp4
from finetune.attention import REFERENCE, VARLEN, choose_attention, sink_attention
from finetune.config import TrainConfig
from finetune.data import load_dialogues
from finetune.errors import ConfigError
from finetune.loop import batch_loss
from finetune.packing import collate_packed, collate_padded
from finetune.trainer import encode_dialogues, train
from formats import lora
from tests.finetune.ft_helpers import dialogue, write_jsonl


def naive_attention(q, k, v, sinks, lengths, window):  # type: ignore[no-untyped-def]
    """Each sequence alone: softmax over [scores, sink] with a causal window, as gpt-oss's eager
    attention does it; (T, H, D) in and out."""
    outs, start = [], 0
    group = q.shape[1] // k.shape[1]
    for n in lengths:
        qs, ks, vs = (x[start : start + n].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        scores = qs @ ks.transpose(1, 2) * q.shape[-1] ** -0.5
        i = torch.arange(n)
        allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        scores = scores.masked_fill(~allowed, float("-inf"))
        sink = sinks.reshape(-1, 1, 1).expand(-1, n, 1)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
        outs.append((probs @ vs).transpose(0, 1))
        start += n
    return torch.cat(outs)


def test_sink_attention_and_its_gradients_match_a_softmax_with_a_sink_column() -> None:
    """The flash composition (sink from the log-sum-exp; backward from the adjusted output and
    log-sum-exp), run with the reference kernel: values and gradients of q, k, v and sinks."""
    torch.manual_seed(0)
    lengths, heads, kv_heads, dim, window = [7, 12, 5], 4, 2, 8, 4
    total = sum(lengths)
    q = torch.randn(total, heads, dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(total, kv_heads, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(total, kv_heads, dim, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(heads, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 7, 19, 24], dtype=torch.int32)
    grad = torch.randn(total, heads, dim, dtype=torch.float64)

    ours = sink_attention(q, k, v, sinks, cu, 12, None, (window - 1, 0), REFERENCE)
    ours_grads = torch.autograd.grad(ours, (q, k, v, sinks), grad)
    ref = naive_attention(q, k, v, sinks, lengths, window)
    ref_grads = torch.autograd.grad(ref, (q, k, v, sinks), grad)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.fixture(scope="module")
def gptoss_tokenizer(tiny_gptoss_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(tiny_gptoss_dir)


@pytest.fixture
def gptoss_dataset(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", [dialogue(i, 1 + i % 2) for i in range(8)])


def test_packed_rows_give_the_padded_loss_with_sinks_and_windows(
    tiny_gptoss_dir: Path, gptoss_dataset: Path, gptoss_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    samples = encode_dialogues(gptoss_tokenizer, load_dialogues(gptoss_dataset))[:4]
    config = json.loads((tiny_gptoss_dir / "config.json").read_text())
    assert min(len(s) for s in samples) > 4 * config["sliding_window"]  # the window bites
    model = AutoModelForCausalLM.from_pretrained(
        tiny_gptoss_dir, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        for layer in model.model.layers:  # sinks and attention that matter
            attn_layer = layer.self_attn
            attn_layer.sinks.normal_(0.0, 2.0)
            for proj, gain in (("q_proj", 6.0), ("k_proj", 6.0), ("v_proj", 8.0), ("o_proj", 8.0)):
                getattr(attn_layer, proj).weight.mul_(gain)
        padded, n_padded = batch_loss(
            model, collate_padded(samples, gptoss_tokenizer.pad_token_id), varlen=False
        )
        # transformers' own masks do not separate packed gpt-oss dialogues
        unseparated, _ = batch_loss(model, collate_packed(samples), varlen=False)
        attn = choose_attention("auto", sinks=True)
        assert attn == VARLEN
        model.set_attn_implementation(attn)
        packed, n_packed = batch_loss(model, collate_packed(samples), varlen=True)
    assert n_packed == n_padded > 0
    assert float(packed) == pytest.approx(float(padded), rel=2e-6)
    assert abs(float(unseparated) - float(padded)) > 1e-4 * float(padded)


def test_expert_lora_on_activations_matches_peft(tiny_gptoss_dir: Path) -> None:
    """The trainer's LoRA on the experts' activations gives PEFT's loss and gradients (PEFT
    rebuilds every expert weight instead), and leaves the frozen weights without gradient."""
    from peft import LoraConfig, get_peft_model

    from finetune import moe

    def build():  # type: ignore[no-untyped-def]
        model = AutoModelForCausalLM.from_pretrained(tiny_gptoss_dir, dtype=torch.float32)
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            init_lora_weights=False,  # B is not zero: the experts' LoRA matters
        )
        torch.manual_seed(1)
        return get_peft_model(model, config)

    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    peft_way, ours = build(), build()
    assert moe.use_activation_lora(ours) == 2  # both layers' experts
    losses = []
    for model in (peft_way, ours):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    theirs = dict(peft_way.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, theirs[name].grad, rtol=1e-4, atol=1e-6)
        else:
            assert param.grad is None
    with ours.disable_adapter():  # the base model again
        base = float(ours(input_ids=ids, labels=ids).loss)
    with peft_way.disable_adapter():
        assert base == pytest.approx(float(peft_way(input_ids=ids, labels=ids).loss), rel=1e-6)


def gptoss_config(data: Path, base: Path, output: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = {
        "data": str(data),
        "persona": "haruhi",
        "base": str(base),
        "output": str(output),
        "max_length": 512,
        "batch_tokens": 1024,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "lora_r": 4,
        "lora_alpha": 8,
        "progress": False,
    }
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def test_training_adapts_attention_and_experts_and_vllm_reads_the_layout(
    tiny_gptoss_dir: Path, gptoss_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapter"
    cfg = gptoss_config(gptoss_dataset, tiny_gptoss_dir, out)
    manifest = train(cfg)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert adapter["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert adapter["lora_dropout"] == 0.0 and manifest["settings"]["lora_dropout"] == 0.0
    assert manifest["settings"]["attention_implementation"] == VARLEN
    assert manifest["metrics"]["steps"] == 4
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        # vLLM's 3-D MoE layout: experts.base_layer = gate_up_proj, experts = down_proj, with
        # (r x experts, in) / (out, r x experts) factors
        prefix = "base_model.model.model.layers.0.mlp.experts"
        gate_up_b = f.get_tensor(f"{prefix}.base_layer.lora_B.weight")
        down_a = f.get_tensor(f"{prefix}.lora_A.weight")
    base = json.loads((tiny_gptoss_dir / "config.json").read_text())
    experts, hidden, inter = (
        base["num_local_experts"],
        base["hidden_size"],
        base["intermediate_size"],
    )
    assert gate_up_b.shape == (2 * inter, 4 * experts) and down_a.shape == (4 * experts, inter)
    assert float(gate_up_b.abs().sum()) > 0  # trained away from PEFT's zero init
    assert {n.split(".layers.0.", 1)[1] for n in names if ".layers.0." in n} == {
        f"{m}.lora_{ab}.weight"
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.experts",
            "mlp.experts.base_layer",
        )
        for ab in "AB"
    }
    assert hidden  # the shapes above are the base's
    # the servable rule reads the expert tensors against the base's dimensions
    assert lora.problems(out, base_config=base) == []
    tampered = dict(base, num_local_experts=2 * experts)
    assert any("stacks" in p for p in lora.problems(out, base_config=tampered))


def test_targets_vllm_cannot_serve_are_refused_unless_asked_for(
    tiny_gptoss_dir: Path, gptoss_dataset: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"lm_head.*allow_unservable"):
        train(
            gptoss_config(
                gptoss_dataset, tiny_gptoss_dir, tmp_path / "a", target_modules="q_proj,lm_head"
            )
        )
    with pytest.raises(ConfigError, match="down_proj"):
        train(
            gptoss_config(
                gptoss_dataset,
                tiny_gptoss_dir,
                tmp_path / "b",
                target_parameters="mlp.experts.gate_up_proj",
            )
        )
    manifest = train(
        gptoss_config(
            gptoss_dataset,
            tiny_gptoss_dir,
            tmp_path / "c",
            target_parameters="none",
            target_modules="q_proj,lm_head",
            allow_unservable=True,
            max_steps=1,
        )
    )
    assert manifest["metrics"]["steps"] == 1


def test_an_mxfp4_checkpoint_loads_dequantized_for_training(tiny_gptoss_mxfp4_dir: Path) -> None:
    config = json.loads((tiny_gptoss_mxfp4_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    model = models.load_model(str(tiny_gptoss_mxfp4_dir), dtype=torch.float32)
    assert getattr(model, "hf_quantizer", None) is None  # plain weights: PEFT can train them
    [shard] = sorted(tiny_gptoss_mxfp4_dir.glob("model-*.safetensors"))
    with safe_open(str(shard), framework="pt") as f:
        for i, layer in enumerate(model.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                name = f"model.layers.{i}.mlp.experts.{proj}"
                expected = mxfp4.dequantize(
                    f.get_tensor(f"{name}_blocks"), f.get_tensor(f"{name}_scales")
                )
                torch.testing.assert_close(getattr(layer.mlp.experts, proj).detach(), expected)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_mxfp4_rounds_to_the_nearest_code_and_back() -> None:
    torch.manual_seed(0)
    weight = torch.randn(3, 64, 32) * 0.05
    blocks, scales = mxfp4.quantize(weight)
    assert blocks.shape == (3, 32, 2, 16) and scales.shape == (3, 32, 2)
    again = mxfp4.dequantize(blocks, scales)
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(again)), again)  # exact values stay
    # within half the largest step of each block (6.0 -> 4.0 spacing 2 at the block's scale)
    step = torch.exp2(scales.float() - mxfp4.SCALE_BIAS)  # (experts, out, groups)
    bound = step.repeat_interleave(32, -1).transpose(1, 2)
    assert bool(((again - weight).abs() <= bound + 1e-12).all())


def test_the_vllm_checks_base_reference_is_the_plain_model(tiny_gptoss_mxfp4_dir: Path) -> None:
    """`benchmarks/gptoss_vllm.py --check` takes transformers + PEFT with the adapter disabled as
    the base model's reference: with LoRA on the attention and on the experts of an MXFP4
    checkpoint loaded for training, that is the plain model's output exactly, so a base reply
    that parts from it is the server's doing."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    from finetune.moe import quantization_kwargs

    kwargs = quantization_kwargs(AutoConfig.from_pretrained(tiny_gptoss_mxfp4_dir))
    assert kwargs  # the MXFP4 path, as on the GPU
    model = AutoModelForCausalLM.from_pretrained(
        tiny_gptoss_mxfp4_dir, dtype=torch.float32, **kwargs
    ).eval()
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False,
    )
    peft = get_peft_model(model, config).eval()
    with torch.no_grad():
        adapted = peft(input_ids=ids).logits
        with peft.disable_adapter():
            disabled = peft(input_ids=ids).logits
    assert not torch.equal(adapted, plain)  # the adapter changes the output...
    assert torch.equal(disabled, plain)  # ...and disabling it gives the plain model back
