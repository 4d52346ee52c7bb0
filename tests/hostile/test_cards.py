"""Hostile character cards, JSON and PNG, through the code paths that read them: the Discord
import (`parse_card`), the registry and the CLI (`load_card` from a file), and what the bot
then does with an accepted card (hash it, save it, render its prompt, show it on Discord)."""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.core.cards import (
    MAX_CARD_BYTES,
    MAX_JSON_DEPTH,
    Card,
    card_to_png,
    parse_card,
)
from bot.core.lorebook import matching_entries
from bot.core.personas import Persona, PersonaRegistry
from bot.core.prompt import render_system
from bot.discord.bot import avatar_url
from bot.discord.cogs.personas.commands import info_embed
from bot.discord.limits import plain_name, webhook_username
from bot.errors import CardError, RolecastError
from rolecast.cli import app
from tests.hostile.properties import PROFILES, run_property, tally
from tests.hostile.strategies import BOMB, PNG_SIGNATURE, card_bytes, ihdr, png_chunk
from tests.hostile.strict_discord import embed_problems, username_problems

GOOD = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Knight"}}


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def use_card(card: Card, folder: Path) -> None:
    """Everything the bot does with an accepted card; none of it may fail."""
    assert len(card.digest()) == 16
    for text in (card.to_json(), card.name, render_system(card, user="\ud800 U")):
        assert encodable(text)
    assert "<|im_end|>" not in render_system(card, user="U")  # defused for the model
    matching_entries(card.data.character_book, ["Knight walks in", "\ud800"])
    registry = PersonaRegistry(folder, include_builtin=False).load()
    persona = registry.add("hostile", card)
    assert not [p for p in folder.iterdir() if p.suffix == ".tmp"]
    assert "hostile" in PersonaRegistry(folder, include_builtin=False).load()
    assert avatar_url(persona) is None or avatar_url(persona).startswith("http")  # type: ignore[union-attr]
    assert username_problems(webhook_username(card.name)) == []
    assert len(plain_name(card.name)) <= 200
    assert embed_problems(info_embed(persona, "served-model").to_dict()) == []  # type: ignore[arg-type]


def check_card(raw: bytes, folder: Path) -> None:
    for stale in folder.iterdir():
        stale.unlink()
    # The Discord import reads the upload's bytes.
    try:
        card = parse_card(raw, "upload.png")
    except CardError as exc:
        assert exc.problems and all(p.strip() and encodable(p) for p in exc.problems)
        tally("refused")
        card = None
    else:
        tally("accepted")
        use_card(card, folder)
    # The registry and the CLI read files: one bad file never stops the good one.
    for stale in folder.iterdir():
        stale.unlink()
    suffix = ".png" if raw.startswith(PNG_SIGNATURE) else ".json"
    (folder / f"hostile{suffix}").write_bytes(raw)
    (folder / "good.json").write_text(json.dumps(GOOD))
    registry = PersonaRegistry(folder, include_builtin=False).load()
    assert "good" in registry
    if card is None:
        assert "hostile" not in registry
        [problem] = registry.problems
        assert problem.source.endswith(f"hostile{suffix}") and problem.problems
    else:
        assert registry.get("hostile").card == card


@PROFILES
def test_no_card_crashes_anything(profile: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("cards")
    run_property(profile, card_bytes, lambda raw: check_card(raw, folder))


# -- the named cases of the adversarial run ---------------------------------------------------


def png_with(*chunks: bytes) -> bytes:
    return PNG_SIGNATURE + ihdr(64, 64) + b"".join(chunks) + png_chunk(b"IEND", b"")


def card_chunk(card: dict[str, object], kind: bytes = b"tEXt") -> bytes:
    payload = base64.b64encode(json.dumps(card).encode())
    if kind == b"zTXt":
        return png_chunk(kind, b"chara\x00\x00" + zlib.compress(payload))
    return png_chunk(kind, b"chara\x00" + payload)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(
            json.dumps({**GOOD, "data": {"name": "K", "assets": "icon.png"}}).encode(),
            "data.assets: Input should be a valid list",
            id="v3-assets-not-a-list",
        ),
        pytest.param(
            json.dumps({**GOOD, "data": {"name": "K", "assets": [5, "x"]}}).encode(),
            "data.assets.0",
            id="v3-assets-not-objects",
        ),
        pytest.param(
            png_with(png_chunk(b"zTXt", b"chara\x00\x00" + BOMB)),
            "inflates to more than 8 MiB",
            id="compressed-text-chunk-over-the-limit",
        ),
        pytest.param(
            PNG_SIGNATURE + ihdr(100_000, 100_000) + card_chunk(GOOD),
            "decompression bomb",
            id="decompression-bomb-image",
        ),
        pytest.param(
            ('{"spec": "chara_card_v2", "data": ' + "[" * 10_000 + "]" * 10_000 + "}").encode(),
            f"nested more than {MAX_JSON_DEPTH} levels",
            id="json-nested-10000-deep",
        ),
        pytest.param(
            ('{"spec": "chara_card_v2", "spec_version": ' + "7" * 5000 + "}").encode(),
            "numbers must fit in 64 bits",
            id="5000-digit-number",
        ),
        pytest.param(
            b"{" + b" " * (MAX_CARD_BYTES + 1) + b"}", "cards must be at most 8 MiB", id="too-big"
        ),
        pytest.param(
            PNG_SIGNATURE + ihdr(8, 8) + png_chunk(b"tIME", b"1234567") * 5000,
            "more than 4096 chunks",
            id="too-many-chunks",
        ),
        pytest.param(
            png_with(png_chunk(b"tEXt", b"chara\x00!!!not base64")),
            "not valid base64",
            id="chunk-not-base64",
        ),
        pytest.param(
            PNG_SIGNATURE + ihdr(8, 8) + struct.pack(">I", 2**31 + 9) + b"tEXtchara\x00",
            "runs past the file",
            id="chunk-lies-about-its-size",
        ),
        pytest.param(
            json.dumps({**GOOD, "data": {"name": "K" * 300}}).encode(),
            "data.name: Value error, 300 characters",
            id="name-over-256-characters",
        ),
    ],
)
def test_named_bad_cards_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(CardError) as info:
        parse_card(raw, "upload")
    assert any(reason in p for p in info.value.problems), info.value.problems


def test_a_compressed_chunk_under_the_limit_is_read() -> None:
    card = parse_card(png_with(card_chunk({**GOOD, "spec": "chara_card_v3"}, b"zTXt")))
    assert card.name == "Knight"


def test_lone_surrogates_are_repaired_in_every_field(tmp_path: Path) -> None:
    raw = json.dumps(
        {
            **GOOD,
            "data": {
                "name": "Kn\ud800ight",
                "description": "half \udfff an emoji, whole \ud83d\ude00",
                "tags": ["\ud800"],
                "extensions": {"\ud800key": ["\udc00"]},
            },
        }
    ).encode()
    card = parse_card(raw)
    assert card.name == "Kn\ufffdight"
    assert card.data.description == "half \ufffd an emoji, whole 😀"
    assert card.digest() == parse_card(raw).digest()
    registry = PersonaRegistry(tmp_path, include_builtin=False).load()
    registry.add("knight", card)
    assert [p.name for p in tmp_path.iterdir()] == ["knight.json"]
    # However a card is built in code, its text is repaired and its digest computed.
    built = Card.model_validate({**GOOD, "data": {"name": "X\ud800"}})
    assert built.name == "X\ufffd" and len(built.digest()) == 16


def test_a_failed_import_leaves_no_temporary_file(tmp_path: Path) -> None:
    registry = PersonaRegistry(tmp_path, include_builtin=False).load()
    card = Card.model_construct(  # bypasses validation, as a bug elsewhere might
        spec="chara_card_v2", spec_version="2.0", data=parse_card(json.dumps(GOOD).encode()).data
    )
    card.data.__dict__["description"] = "\ud800"
    with pytest.raises(RolecastError, match="Could not save the card"):
        registry.add("broken", card)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_files_in_the_personas_directory_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "good.json").write_text(json.dumps(GOOD))
    (tmp_path / "folder.json").mkdir()
    os.mkfifo(tmp_path / "pipe.json")  # reading it would block for ever
    (tmp_path / "bomb.png").write_bytes(PNG_SIGNATURE + ihdr(10**5, 10**5))
    (tmp_path / "deep.json").write_text("[" * 50_000 + "]" * 50_000)
    registry = PersonaRegistry(tmp_path, include_builtin=False).load()
    assert registry.keys() == ["good"]
    reasons = {Path(p.source).name: p.problems[0] for p in registry.problems}
    assert set(reasons) == {"folder.json", "pipe.json", "bomb.png", "deep.json"}
    assert reasons["pipe.json"] == "not a regular file"


def test_persona_list_shows_the_good_cards_and_warns_about_the_bad(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    personas = tmp_path / "personas"
    personas.mkdir()
    hostile = {**GOOD, "data": {"name": "[bold red]Evil[/] \x1b[2J\ud800", "first_mes": "[/]"}}
    (personas / "evil.json").write_text(json.dumps(hostile))
    (personas / "bomb.png").write_bytes(png_with(png_chunk(b"zTXt", b"chara\x00\x00" + BOMB)))
    (personas / "v3.png").write_bytes(card_to_png(parse_card(json.dumps(GOOD).encode())))
    monkeypatch.setenv("ROLECAST_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["persona", "list"])
    assert result.exit_code == 0, result.output
    assert "[bold red]Evil[/]" in result.stdout  # shown as text, not read as markup
    assert "\x1b" not in result.output
    assert "bomb.png" in result.stderr and "inflates to more than 8 MiB" in result.stderr
    assert "v3" in result.stdout

    check = CliRunner().invoke(app, ["persona", "check", str(personas / "bomb.png")])
    assert check.exit_code == 1 and "inflates to more than 8 MiB" in check.stderr


def test_info_embed_fits_whatever_the_server_calls_the_model() -> None:
    persona = Persona("k", parse_card(json.dumps(GOOD).encode()), Path("k.json"), builtin=False)
    assert embed_problems(info_embed(persona, "x" * 5000).to_dict()) == []  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    ["Knight``````", "````", "a```b`````c", "``", "Clyde Discord", "DISCORDclydeDiscord"],
)
def test_webhook_names_never_hold_a_word_discord_refuses(name: str) -> None:
    """Splitting each refused word once is not enough where they touch: a run of six backticks
    split as two runs of three would join into three again."""
    assert username_problems(webhook_username(name)) == []
