"""Character cards: the shipped ones load; a bad one is reported field by field."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from bot.core.cards import card_to_png, load_card, parse_card
from bot.core.personas import PersonaRegistry
from bot.errors import CardError, PersonaNotFoundError

V2 = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {"name": "Knight", "first_mes": "Halt!"},
}


def test_shipped_personas_are_valid_cards_built_from_the_data() -> None:
    registry = PersonaRegistry(None).load()
    assert registry.problems == []
    assert registry.keys() == ["atri", "haruhi", "xin"]
    haruhi = registry.get("haruhi")
    assert haruhi.name == "凉宫春日"
    assert haruhi.card.data.system_prompt.startswith("你是来自《凉宫春日的忧郁》的凉宫春日")
    assert "ChatHaruhi" in haruhi.card.data.creator_notes
    assert "CC BY 4.0" in haruhi.card.data.creator_notes
    for persona in registry.all():
        assert "BITnene465/finetuningMySLM" in persona.card.data.creator_notes


def test_system_prompt_matches_the_dataset(data_dir: Path) -> None:
    registry = PersonaRegistry(None).load()
    for key in ("haruhi", "atri", "xin"):
        first = json.loads((data_dir / f"{key}.jsonl").open(encoding="utf-8").readline())
        system = first["conversations"][0]
        assert system["from"] == "system"
        assert registry.get(key).card.data.system_prompt == system["value"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (
            json.dumps({**V2, "data": {"description": "x"}}).encode(),
            "data.name: required field is missing",
        ),
        (
            json.dumps({**V2, "data": {"name": "  "}}).encode(),
            "data.name: Value error, must not be empty",
        ),
        (
            json.dumps({**V2, "spec": "chara_card_v9"}).encode(),
            "spec: expected one of chara_card_v2",
        ),
        (json.dumps({"name": "Old", "description": "v1"}).encode(), "looks like a V1 card"),
        (
            json.dumps({**V2, "data": {"name": "K", "tags": "x"}}).encode(),
            "data.tags: Input should be a valid list",
        ),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
    ],
)
def test_bad_cards_say_what_is_wrong(raw: bytes, expected: str) -> None:
    with pytest.raises(CardError) as info:
        parse_card(raw, "upload.json")
    assert any(expected in problem for problem in info.value.problems), info.value.problems
    assert "upload.json" in str(info.value)


def test_every_problem_is_listed_at_once() -> None:
    raw = json.dumps({"spec": "nope", "data": {"tags": 3}}).encode()
    with pytest.raises(CardError) as info:
        parse_card(raw)
    fields = sorted(p.split(":")[0] for p in info.value.problems)
    assert fields == ["data.name", "data.tags", "spec", "spec_version"]


@pytest.mark.parametrize("spec", ["chara_card_v2", "chara_card_v3"])
def test_png_card_round_trip(tmp_path: Path, spec: str) -> None:
    card = parse_card(json.dumps({**V2, "spec": spec, "spec_version": spec[-1] + ".0"}).encode())
    path = tmp_path / "knight.png"
    path.write_bytes(card_to_png(card))
    loaded = load_card(path)
    assert loaded.spec == spec
    assert loaded.name == "Knight"
    assert loaded.data.first_mes == "Halt!"


def test_png_without_card_chunk(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(CardError, match="no 'chara' or 'ccv3' text chunk"):
        load_card(path)


def test_png_with_broken_payload(tmp_path: Path) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("chara", base64.b64encode(b'{"spec": "chara_card_v2"').decode())
    path = tmp_path / "broken.png"
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    with pytest.raises(CardError, match="not JSON"):
        load_card(path)


def test_registry_skips_broken_cards_and_keeps_the_rest(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"spec": "chara_card_v2", "data": {}}')
    (tmp_path / "knight.json").write_text(json.dumps(V2))
    (tmp_path / "notes.txt").write_text("not a card")
    registry = PersonaRegistry(tmp_path).load()
    assert "knight" in registry.keys() and "haruhi" in registry.keys()
    assert "broken" not in registry
    [problem] = registry.problems
    assert "broken.json" in str(problem) and "data.name" in str(problem)


def test_unknown_persona_lists_the_known_ones() -> None:
    with pytest.raises(PersonaNotFoundError, match="Known personas: atri, haruhi, xin"):
        PersonaRegistry(None).load().get("nagato")


def test_imported_card_overrides_and_is_written_atomically(tmp_path: Path) -> None:
    registry = PersonaRegistry(tmp_path / "cards").load()
    persona = registry.add("Sir Knight!", parse_card(json.dumps(V2).encode()))
    assert persona.key == "sir-knight"
    assert PersonaRegistry(tmp_path / "cards").load().get("sir-knight").name == "Knight"
    assert [p.name for p in (tmp_path / "cards").iterdir()] == ["sir-knight.json"]
