"""LoRA adapters on the embedded server: listing, loading and unloading with vLLM's codes,
mixed-adapter batches, and a hot publish while requests stream on the old version."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import openai
import pytest

from bot.core.sidecar import EmbeddedServer
from formats.errors import RegistryError
from formats.registry import AdapterRegistry
from serving.publish import Publisher, ServerClient
from tests.adapters import broken_registry, fake_lora, lora_tensors, make_adapter

MESSAGES = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(tiny_model_dir, root / "a", 1),
        "b": make_adapter(tiny_model_dir, root / "b", 2, r=16),
        "c": make_adapter(tiny_model_dir, root / "c", 3),
        "dora": make_adapter(tiny_model_dir, root / "dora", 4, use_dora=True),
        "big": make_adapter(tiny_model_dir, root / "big", 5, r=128),
    }


@pytest.fixture(scope="module")
def startup_registry(
    adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[AdapterRegistry, dict[str, str]]:
    """A registry with one good current version and one persona for every way its files
    can be broken (persona -> what is broken)."""
    registry = AdapterRegistry(tmp_path_factory.mktemp("startup-registry"))
    good = registry.add_version("atri", adapters["c"])
    registry.set_current("atri", good.version)
    return registry, broken_registry(registry.root, adapters["c"])


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path,
    adapters: dict[str, Path],
    startup_registry: tuple[AdapterRegistry, dict[str, str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> EmbeddedServer:
    registry, _ = startup_registry
    srv = EmbeddedServer(
        serve_args=[
            "--model",
            str(tiny_model_dir),
            "--served-model-name",
            "tiny",
            "--max-model-len",
            "512",
            "--max-lora-rank",
            "64",  # below the default (256), so that "big" (r128) is refused
            "--lora-modules",
            f"static-a={adapters['a']}",
            "--adapters-dir",
            str(registry.root),
            "--max-lora-rank",  # below the default (256), as for an 8B base: "big" is refused
            "64",
        ],
        log_path=tmp_path_factory.mktemp("adapter-server") / "server.log",
        startup_timeout=300,
    )
    with srv:
        yield srv  # type: ignore[misc]


def greedy(client: openai.OpenAI, model: str, tokens: int = 16) -> str:
    reply = client.chat.completions.create(
        model=model,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    return reply.choices[0].message.content or ""


@pytest.fixture
def client(server: EmbeddedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)


def post(server: EmbeddedServer, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def test_startup_adapters_listed_with_parent(client: openai.OpenAI) -> None:
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    # --lora-modules and the registry's current versions; the broken ones are left out
    assert set(cards) == {"tiny", "static-a", "atri@v1"}
    assert cards["static-a"]["parent"] == "tiny" and cards["static-a"]["root"]
    assert cards["tiny"]["parent"] is None


def test_every_broken_persona_is_left_out_with_its_reason(
    server: EmbeddedServer, startup_registry: tuple[AdapterRegistry, dict[str, str]]
) -> None:
    assert server.log_path is not None
    log = server.log_path.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in log
    _, broken = startup_registry
    for persona in broken:
        # each is named where the server says what it did not load, with the reason
        said = f"not serving {persona}" in log or f"not serving adapter {persona}@v1" in log
        assert said, persona


def test_adapter_changes_output_and_base_stays(client: openai.OpenAI) -> None:
    base = greedy(client, "tiny")
    assert greedy(client, "static-a") != base
    assert greedy(client, "tiny") == base


def test_load_and_unload_with_vllm_codes(
    server: EmbeddedServer, client: openai.OpenAI, adapters: dict[str, Path]
) -> None:
    ok = post(server, "/v1/load_lora_adapter", {"lora_name": "b1", "lora_path": str(adapters["b"])})
    assert ok.status_code == 200 and ok.text == "Success: LoRA adapter 'b1' added successfully."
    assert "b1" in {m.id for m in client.models.list().data}
    greedy(client, "b1")

    again = post(
        server, "/v1/load_lora_adapter", {"lora_name": "b1", "lora_path": str(adapters["b"])}
    )
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]

    gone = post(server, "/v1/unload_lora_adapter", {"lora_name": "b1"})
    assert (
        gone.status_code == 200 and gone.text == "Success: LoRA adapter 'b1' removed successfully."
    )
    assert "b1" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        greedy(client, "b1")

    unknown = post(server, "/v1/unload_lora_adapter", {"lora_name": "b1"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "The lora adapter 'b1' cannot be found."

    missing = post(server, "/v1/load_lora_adapter", {"lora_name": "x"})
    assert missing.status_code == 400
    assert "Both 'lora_name' and 'lora_path' must be provided." in missing.text


@pytest.mark.parametrize(
    "which, fragment",
    [("dora", "DoRA"), ("big", "LoRA rank 128 is greater than max_lora_rank 64")],
)
def test_unservable_adapters_are_refused(
    server: EmbeddedServer, adapters: dict[str, Path], which: str, fragment: str
) -> None:
    response = post(
        server, "/v1/load_lora_adapter", {"lora_name": which, "lora_path": str(adapters[which])}
    )
    assert response.status_code == 400 and fragment in response.json()["error"]["message"]


def test_the_default_rank_limit_admits_what_training_gives_the_default_model() -> None:
    from finetune.config import default_rank
    from formats.basemodel import DEFAULT
    from serving.settings import ServeSettings

    settings = ServeSettings()
    assert settings.model == DEFAULT  # the default model, a base under 1 B parameters
    assert settings.max_lora_rank >= default_rank(134_515_008) == 256


def test_broken_adapter_dir_is_400_and_server_keeps_serving(
    server: EmbeddedServer, client: openai.OpenAI, adapters: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapters["c"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    for path in (broken, tmp_path / "does-not-exist"):
        response = post(
            server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(path)}
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "BadRequestError"
    assert "bad" not in {m.id for m in client.models.list().data}
    assert greedy(client, "static-a")  # still serving


def test_an_adapter_for_another_base_is_refused_with_its_shapes(
    server: EmbeddedServer, client: openai.OpenAI, tmp_path: Path
) -> None:
    wide = {"q_proj": (96, 96), "v_proj": (96, 32)}
    other = fake_lora(tmp_path / "other", tensors=lora_tensors(8, dims=wide))
    response = post(
        server, "/v1/load_lora_adapter", {"lora_name": "other", "lora_path": str(other)}
    )
    assert response.status_code == 400, response.text
    assert "takes 96 inputs; the base model's has 64" in response.json()["error"]["message"]
    assert "other" not in {m.id for m in client.models.list().data}


async def test_mixed_adapter_batch_matches_each_alone(
    server: EmbeddedServer, client: openai.OpenAI, adapters: dict[str, Path]
) -> None:
    assert (
        post(
            server, "/v1/load_lora_adapter", {"lora_name": "mix-c", "lora_path": str(adapters["c"])}
        ).status_code
        == 200
    )
    models = ["tiny", "static-a", "mix-c"]
    alone = {m: await asyncio.to_thread(greedy, client, m, 24) for m in models}
    assert len(set(alone.values())) == 3
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:

        async def one(model: str) -> str:
            reply = await c.chat.completions.create(
                model=model,
                messages=MESSAGES,  # type: ignore[arg-type]
                max_tokens=24,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            return reply.choices[0].message.content or ""

        together = await asyncio.gather(*(one(m) for m in models * 3))
    assert together == [alone[m] for m in models * 3]
    post(server, "/v1/unload_lora_adapter", {"lora_name": "mix-c"})


def test_publish_validation_names_each_problem(
    tmp_path: Path, adapters: dict[str, Path], tiny_model_dir: Path
) -> None:
    publisher = Publisher(AdapterRegistry(tmp_path / "reg"), [], max_rank=64)
    with pytest.raises(RegistryError, match="use_dora"):
        publisher.publish("haruhi", adapters["dora"])
    with pytest.raises(RegistryError, match="LoRA rank 128 is greater than max_lora_rank 64"):
        publisher.publish("haruhi", adapters["big"])
    other_base = Publisher(
        AdapterRegistry(tmp_path / "reg"), [], max_rank=64, base_model="Llama-3.1-8B-Instruct"
    )
    with pytest.raises(RegistryError, match="base model differs"):
        other_base.publish("haruhi", adapters["a"])
    assert AdapterRegistry(tmp_path / "reg").versions("haruhi") == []


async def test_hot_publish_while_streaming(
    server: EmbeddedServer, adapters: dict[str, Path], tmp_path: Path
) -> None:
    registry = AdapterRegistry(tmp_path / "registry")
    with httpx.Client(timeout=60) as http:
        publisher = Publisher(registry, [ServerClient(server.base_url, http)], max_rank=64)
        first = await asyncio.to_thread(publisher.publish, "haruhi", adapters["a"])
        assert first.new_name == "haruhi@v1" and first.old is None

        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:
            started = threading.Event()

            async def stream_on(model: str) -> tuple[str, int]:
                stream = await c.chat.completions.create(
                    model=model,
                    messages=MESSAGES,  # type: ignore[arg-type]
                    max_tokens=150,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                used = 0
                async for chunk in stream:
                    started.set()
                    if chunk.usage:
                        used = chunk.usage.completion_tokens
                return model, used

            old_streams = [asyncio.create_task(stream_on("haruhi@v1")) for _ in range(4)]
            await asyncio.to_thread(started.wait, 30)
            second = await asyncio.to_thread(publisher.publish, "haruhi", adapters["b"])
            # the publish returned only after the old version drained and was unloaded
            results = await asyncio.gather(*old_streams)
            assert all(used == 150 for _, used in results)  # none failed or was cut
            assert second.new_name == "haruhi@v2" and second.unloaded
            assert registry.current_served_name("haruhi") == "haruhi@v2"
            ids = {m.id for m in (await c.models.list()).data}
            assert "haruhi@v2" in ids and "haruhi@v1" not in ids
            _, used = await stream_on("haruhi@v2")
            assert used == 150
            with pytest.raises(openai.NotFoundError):
                await stream_on("haruhi@v1")

        back = await asyncio.to_thread(publisher.rollback, "haruhi")
        assert back.new_name == "haruhi@v1" and back.unloaded
        assert registry.current_served_name("haruhi") == "haruhi@v1"
        third = await asyncio.to_thread(publisher.publish, "haruhi", adapters["c"])
        assert third.new is not None and third.new.served_name == "haruhi@v3"  # never v2's name

        # back to v1, then from the first version back to the base model: v1 is unloaded too
        await asyncio.to_thread(publisher.rollback, "haruhi")
        base = await asyncio.to_thread(publisher.rollback, "haruhi")
        assert base.new is None and base.old_name == "haruhi@v1" and base.unloaded
        assert registry.current_served_name("haruhi") is None and registry.knows("haruhi")
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:
            ids = {m.id for m in (await c.models.list()).data}
        assert not any(i.startswith("haruhi@") for i in ids)


@pytest.mark.parametrize("name", ["__base__", "persona.v1.2", "training", "lora_A"])
def test_any_served_name_serves_its_own_weights(
    server: EmbeddedServer, client: openai.OpenAI, adapters: dict[str, Path], name: str
) -> None:
    """A served name is the client's text, not a key of the model's modules: PEFT's reserved
    name for "no adapter", a dotted version or a module attribute name serve the adapter."""
    loaded = post(
        server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapters["a"])}
    )
    assert loaded.status_code == 200, loaded.text
    try:
        assert greedy(client, name) == greedy(client, "static-a") != greedy(client, "tiny")
    finally:
        gone = post(server, "/v1/unload_lora_adapter", {"lora_name": name})
        assert gone.status_code == 200, gone.text
    assert greedy(client, "static-a") != greedy(client, "tiny")


def test_an_adapter_with_non_finite_weights_is_refused(
    server: EmbeddedServer, client: openai.OpenAI, adapters: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    before = {m.id for m in client.models.list().data}
    for value in (float("nan"), float("inf")):
        broken = tmp_path / f"broken-{value}"
        shutil.copytree(adapters["c"], broken)
        weights = load_file(broken / "adapter_model.safetensors")
        first = sorted(weights)[0]
        weights[first] = torch.full_like(weights[first], value)
        save_file(weights, broken / "adapter_model.safetensors", metadata={"format": "pt"})
        response = post(
            server, "/v1/load_lora_adapter", {"lora_name": "nan", "lora_path": str(broken)}
        )
        assert response.status_code == 400, response.text
        assert "not finite" in response.json()["error"]["message"]
    assert {m.id for m in client.models.list().data} == before
    assert greedy(client, "static-a") != greedy(client, "tiny")  # nothing loaded was lost
