"""An adapter's weights file, checked from its safetensors header alone: that the header is
readable and describes the file exactly, that every tensor is a LoRA matrix of a floating
dtype, and that names and shapes fit the adapter's config and the base model's dimensions.

The safetensors format is simple and written down (huggingface/safetensors, "Format"): 8 bytes
little-endian, the size N of a JSON header; N bytes of UTF-8 JSON, an object of
`name -> {"dtype", "shape", "data_offsets": [begin, end]}` plus an optional `__metadata__` map
of strings; then the byte buffer, which the tensors' offsets cover exactly, in order, without
holes or overlaps. Only the header is read (the standard library suffices), so a check costs
milliseconds however large the weights are.

PEFT names LoRA tensors `<module path>.lora_A.weight` ([r, in_features]) and
`<module path>.lora_B.weight` ([out_features, r]); on an embedding, `<module
path>.lora_embedding_A` ([r, vocab]) and `.lora_embedding_B` ([hidden, r]).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formats.errors import FormatError

#: The reference implementation's limit on the header (safetensors' MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
#: Bytes per element of each safetensors dtype.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
#: The dtypes a LoRA weight is served in (vLLM and the embedded server cast from these).
LORA_DTYPES = frozenset({"F16", "BF16", "F32"})

_LORA_NAME = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$"
    r"|^(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)$"
)
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file describes, after checking that its header is sound and
    covers the file exactly. FormatError says what is wrong."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path.name} is {size} bytes: too short for a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise FormatError(
                    f"{path.name} declares a header of {length:,} bytes in a file of {size:,}"
                )
            raw = f.read(length)
    except OSError as exc:
        raise FormatError(f"{path.name} cannot be read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{path.name}'s header is not JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path.name}'s header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise FormatError(f"{path.name}'s __metadata__ is not a map of strings")
    tensors = {name: _tensor(path.name, name, entry) for name, entry in header.items()}
    position = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            gap = "overlaps another" if info.begin < position else "leaves a gap before it"
            raise FormatError(f"{path.name}: tensor {_shown(info.name)} {gap}")
        position = info.end
    if 8 + length + position != size:
        raise FormatError(
            f"{path.name}'s tensors cover {position:,} bytes, the file holds "
            f"{size - 8 - length:,} after its header"
        )
    return tensors


def _shown(name: str) -> str:
    return repr(name[:120])


def _tensor(file: str, name: str, entry: Any) -> TensorInfo:
    where = f"{file}: tensor {_shown(name)}"
    if not isinstance(entry, dict):
        raise FormatError(f"{where} is not described by an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise FormatError(f"{where} has an unknown dtype {str(dtype)[:40]!r}")
    if not (isinstance(shape, list) and all(_count(d) for d in shape)):
        raise FormatError(f"{where} has a shape that is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
        raise FormatError(f"{where} has data_offsets that are not two byte positions")
    begin, end = offsets
    if end < begin or end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise FormatError(f"{where}: its {end - begin} bytes do not hold a {dtype} {shape}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53


@dataclass(frozen=True)
class BaseDims:
    """The base model's dimensions that LoRA shapes depend on (from its `config.json`)."""

    hidden: int
    intermediate: int | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    layers: int | None
    vocab: int | None
    experts: int | None = None  # a mixture-of-experts base's experts per layer

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BaseDims | None:
        """The dimensions in a Hugging Face `config.json` (a multimodal model's `text_config`
        when it has one); None when it does not name a hidden size."""
        text = config.get("text_config")
        if isinstance(text, dict) and "hidden_size" in text:
            config = text

        def size(key: str) -> int | None:
            value = config.get(key)
            return value if isinstance(value, int) and _count(value) and value > 0 else None

        hidden = size("hidden_size")
        if hidden is None:
            return None
        heads = size("num_attention_heads")
        head_dim = size("head_dim") or (hidden // heads if heads and hidden % heads == 0 else None)
        return cls(
            hidden=hidden,
            intermediate=size("intermediate_size"),
            heads=heads,
            kv_heads=size("num_key_value_heads") or heads,
            head_dim=head_dim,
            layers=size("num_hidden_layers"),
            vocab=size("vocab_size"),
            experts=size("num_local_experts"),
        )

    def features(self, module: str) -> tuple[int | None, int | None]:
        """(in_features, out_features) of a linear module by its name, as Llama-family models
        (Llama, Mistral, Qwen, Gemma, SmolLM, ...) name them; (None, None) for other names."""
        leaf = module.rsplit(".", 1)[-1]
        q = self.heads * self.head_dim if self.heads and self.head_dim else None
        kv = self.kv_heads * self.head_dim if self.kv_heads and self.head_dim else None
        return {
            "q_proj": (self.hidden, q),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
            "lm_head": (self.hidden, self.vocab),
        }.get(leaf, (None, None))


def tensor_problems(
    tensors: dict[str, TensorInfo],
    *,
    ranks: set[int],
    targets: list[str] | None = None,
    base: BaseDims | None = None,
    parameters: list[str] | None = None,
) -> list[str]:
    """What in an adapter's tensors does not fit its config (`ranks`: the ranks it allows,
    `targets`: its `target_modules` when a list, `parameters`: its `target_parameters`) and the
    base model (`base`)."""
    problems: list[str] = []
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for name, info in sorted(tensors.items()):
        match = _LORA_NAME.match(name)
        if match is None:
            problems.append(f"tensor {_shown(name)} is not a LoRA weight (lora_A / lora_B)")
            continue
        module = match.group("module") or match.group("emodule")
        kind = match.group("kind") or match.group("ekind")
        pairs.setdefault(module, {})[kind] = info
        if info.dtype not in LORA_DTYPES:
            problems.append(
                f"tensor {_shown(name)} is {info.dtype}; LoRA weights are F16, BF16 or F32"
            )
        if len(info.shape) != 2 or 0 in info.shape:
            problems.append(f"tensor {_shown(name)} has shape {list(info.shape)}, not a matrix")
    if not tensors:
        problems.append("it holds no tensors")
    for module, found in pairs.items():
        if len(problems) > 20:
            problems.append("… (more left out)")
            break
        parameter = parameter_of(module, parameters or [])
        if parameter is not None:
            problems += _parameter_problems(module, parameter, found, ranks, base)
        else:
            problems += _module_problems(module, found, ranks, targets, base)
    return problems


# PEFT's LoRA on a parameter (`target_parameters`, gpt-oss's fused experts) wraps the module that
# holds it, once per targeted parameter, the first innermost: with k parameters of one module,
# the i-th one's tensors are `<module>` + `.base_layer` x (k-1-i) + `.lora_A.weight`, with one
# rank-r LoRA per expert stacked: lora_A [r x experts, in], lora_B [out, r x experts].
#: (in, out) of the fused expert parameters whose names are known, from the base's dimensions.
_EXPERT_FEATURES = {
    "gate_up_proj": lambda b: (b.hidden, 2 * b.intermediate if b.intermediate else None),
    "down_proj": lambda b: (b.intermediate, b.hidden),
}


def parameter_of(module: str, parameters: list[str]) -> str | None:
    """The `target_parameters` entry whose LoRA a module path holds, or None."""
    owners: dict[str, list[str]] = {}
    for parameter in parameters:
        if isinstance(parameter, str) and "." in parameter:
            owners.setdefault(parameter.rsplit(".", 1)[0], []).append(parameter)
    for owner, names in owners.items():
        for i, parameter in enumerate(names):
            path = owner + ".base_layer" * (len(names) - 1 - i)
            if module == path or module.endswith("." + path):
                return parameter
    return None


def _parameter_problems(
    module: str,
    parameter: str,
    found: dict[str, TensorInfo],
    ranks: set[int],
    base: BaseDims | None,
) -> list[str]:
    shown = _shown(module)
    a, b = found.get("lora_A"), found.get("lora_B")
    if a is None or b is None or len(found) != 2:
        return [f"module {shown} does not have one lora_A and one lora_B"]
    if len(a.shape) != 2 or len(b.shape) != 2:
        return []  # reported with the tensor
    stacked_a, stacked_b = a.shape[0], b.shape[1]
    experts = base.experts if base is not None else None
    if experts:
        fits = stacked_a in {r * experts for r in ranks}
    else:
        fits = any(stacked_a % r == 0 for r in ranks)
    problems = []
    if stacked_a != stacked_b:
        problems.append(f"module {shown}: lora_A has {stacked_a} rows, lora_B {stacked_b} columns")
    elif not fits:
        allowed = ", ".join(map(str, sorted(ranks)))
        what = f"{experts} experts x rank {allowed}" if experts else f"a multiple of rank {allowed}"
        problems.append(f"module {shown} ({parameter}) stacks {stacked_a} ranks, not {what}")
    feature = _EXPERT_FEATURES.get(parameter.rsplit(".", 1)[-1])
    if base is not None and feature is not None:
        expected_in, expected_out = feature(base)
        if expected_in is not None and a.shape[1] != expected_in:
            problems.append(
                f"module {shown} ({parameter}) takes {a.shape[1]} inputs; the base's takes {expected_in}"
            )
        if expected_out is not None and b.shape[0] != expected_out:
            problems.append(
                f"module {shown} ({parameter}) gives {b.shape[0]} outputs; the base's gives {expected_out}"
            )
    return problems


def _module_problems(
    module: str,
    found: dict[str, TensorInfo],
    ranks: set[int],
    targets: list[str] | None,
    base: BaseDims | None,
) -> list[str]:
    shown = _shown(module)
    embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
    a_kind, b_kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    a, b = found.get(a_kind), found.get(b_kind)
    if a is None or b is None or len(found) != 2:
        return [f"module {shown} does not have one {a_kind} and one {b_kind}"]
    if len(a.shape) != 2 or len(b.shape) != 2:
        return []  # reported with the tensor
    problems = []
    rank_a, rank_b = a.shape[0], b.shape[1]
    if rank_a != rank_b:
        problems.append(f"module {shown}: lora_A has rank {rank_a}, lora_B rank {rank_b}")
    elif rank_a not in ranks:
        allowed = ", ".join(map(str, sorted(ranks))) or "none"
        problems.append(f"module {shown} has rank {rank_a}; the config says {allowed}")
    if targets is not None:
        leaf = module.rsplit(".", 1)[-1]
        if not any(module == t or module.endswith("." + t) or leaf == t for t in targets):
            problems.append(f"module {shown} is not among the config's target_modules")
    if base is None:
        return problems
    layer = _LAYER.search(module + ".")
    if layer and base.layers is not None and int(layer.group(1)) >= base.layers:
        problems.append(f"module {shown} is in layer {layer.group(1)}; the base has {base.layers}")
    expected_in: int | None
    expected_out: int | None
    if embedding:
        expected_in, expected_out = base.vocab, base.hidden
    else:
        expected_in, expected_out = base.features(module)
    if expected_in is not None and a.shape[1] != expected_in:
        problems.append(
            f"module {shown} takes {a.shape[1]} inputs; the base model's has {expected_in}"
        )
    if expected_out is not None and b.shape[0] != expected_out:
        problems.append(
            f"module {shown} gives {b.shape[0]} outputs; the base model's gives {expected_out}"
        )
    return problems
