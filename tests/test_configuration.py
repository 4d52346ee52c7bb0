"""Misconfiguration, as a user makes it: a bad variable, flag or file is one short message that
names it, exit code 2, no traceback, and every command says it the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from bot.settings import BotSettings
from formats.paths import RolecastPaths, SettingsProblem, default_home, load

runner = CliRunner()


@pytest.fixture(autouse=True)
def own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ROLECAST_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ROLECAST_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("ROLECAST_DISCORD_TOKEN", raising=False)
    return tmp_path / "home"


def rolecast(*args: str, **env: str) -> Result:
    from rolecast.cli import app

    return runner.invoke(app, list(args), env=env)


def assert_one_clear_error(result: Result, *named: str) -> list[str]:
    """Exit code 2, no traceback, no pydantic boilerplate: a line or a short list."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == 2, result.output
    out = result.output
    assert "Traceback" not in out and "errors.pydantic.dev" not in out and "╭" not in out
    assert "validation error for" not in out
    lines = out.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 4, out
    for name in named:
        assert name in out, out
    return lines


@pytest.mark.parametrize(
    ("variable", "value", "command"),
    [
        ("ROLECAST_SERVE_PORT", "abc", ["serve", "--engine", "vllm", "--print-command"]),
        ("ROLECAST_SERVE_PORT", "99999", ["serve", "--prepare-only"]),
        ("ROLECAST_SERVE_MAX_LORA_RANK", "abc", ["adapters", "rollback", "haruhi"]),
        ("ROLECAST_SAMPLING__TEMPERATURE", "hot", ["persona", "list"]),
        ("ROLECAST_DISCORD__NO_SUCH_KEY", "1", ["bot", "--check"]),
        ("ROLECAST_RETRAIN__MIN_APPROVED", "-3", ["retrain", "--status"]),
    ],
)
def test_a_bad_variable_is_one_line_that_names_it(
    variable: str, value: str, command: list[str]
) -> None:
    lines = assert_one_clear_error(rolecast(*command, **{variable: value}), variable)
    assert len(lines) == 1 and repr(value) in lines[0]


@pytest.mark.parametrize(
    ("variable", "value", "command"),
    [
        ("ROLECAST_SERVE_ARGS", "--model x", ["persona", "list"]),
        ("ROLECAST_SERVE_LORA_MODULES", "a=b", ["serve", "--engine", "vllm", "--print-command"]),
        ("ROLECAST_RETRAIN__TRAIN_ARGS", "--epochs 2", ["bot", "--check"]),
    ],
)
def test_a_list_or_table_variable_that_is_not_json_says_so(
    variable: str, value: str, command: list[str]
) -> None:
    (line,) = assert_one_clear_error(rolecast(*command, **{variable: value}), "JSON")
    assert variable.split("__")[0] in line


def test_a_broken_toml_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "rolecast.toml"
    config.write_text("home = [\n")
    for command in (["adapters", "list"], ["persona", "list"], ["serve", "--prepare-only"]):
        (line,) = assert_one_clear_error(rolecast(*command, ROLECAST_CONFIG=str(config)))
        assert str(config) in line and "TOML" in line


def test_an_empty_variable_is_as_if_unset(tmp_path: Path) -> None:
    # env files (compose, systemd) leave `ROLECAST_HOME=` behind: not "the working directory"
    result = rolecast("persona", "list", ROLECAST_HOME="", ROLECAST_SERVE_PORT="")
    assert result.exit_code == 0, result.output
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ROLECAST_HOME", "")
        env.setenv("ROLECAST_DB_PATH", "")
        assert RolecastPaths().home == default_home() == BotSettings().home
        assert BotSettings().database == default_home() / "rolecast.db"


@pytest.mark.parametrize("token", ["", "   "])
def test_an_empty_discord_token_is_no_token(token: str) -> None:
    result = rolecast("bot", "--check", ROLECAST_DISCORD_TOKEN=token)
    assert result.exit_code == 2, result.output
    assert "no Discord token" in result.output and "token set" not in result.output
    assert BotSettings(discord_token=token).discord_token is None


def test_the_problem_names_where_the_value_came_from(tmp_path: Path) -> None:
    # a variable is not blamed on a flag that was not given, nor a whole JSON value on a field
    (line,) = assert_one_clear_error(rolecast("chat", ROLECAST_DB_PATH=str(tmp_path)))
    assert line.startswith(f"error: ROLECAST_DB_PATH='{tmp_path}': ") and "is a folder" in line
    (line,) = assert_one_clear_error(rolecast("chat", "--db", str(tmp_path)))
    assert line.startswith(f"error: --db='{tmp_path}': ")
    (line,) = assert_one_clear_error(rolecast("bot", ROLECAST_SAMPLING='{"temperature": 9}'))
    assert line.startswith("error: ROLECAST_SAMPLING, temperature=9: ")
    lines = assert_one_clear_error(
        rolecast("serve", "--port", "70000", ROLECAST_SERVE_DTYPE="fp8", ROLECAST_SERVE_PORT="1")
    )
    assert lines[0] == "error: invalid settings:" and len(lines) == 3
    assert lines[1].startswith("  - --port=70000: ") and "ROLECAST_SERVE_DTYPE='fp8'" in lines[2]


def test_a_secret_is_never_shown() -> None:
    with pytest.raises(SettingsProblem) as problem:
        load(BotSettings, discord_token=31415926535)
    assert str(problem.value).startswith("--discord-token: ") and "31415926535" not in str(
        problem.value
    )


@pytest.mark.parametrize(
    "variable", ["ROLECAST_HOME", "ROLECAST_ADAPTERS_DIR", "ROLECAST_CACHE_DIR"]
)
def test_a_file_where_a_folder_belongs_is_refused_before_anything_is_written(
    variable: str, tmp_path: Path
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("kept\n")
    card = tmp_path / "nia.json"
    card.write_text('{"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Nia"}}')
    for place in (a_file, a_file / "below"):
        for command in (["persona", "import", str(card)], ["adapters", "list"]):
            (line,) = assert_one_clear_error(rolecast(*command, **{variable: str(place)}))
            assert line.startswith(f"error: {variable}=") and f"{a_file} is a file" in line
    assert a_file.read_text() == "kept\n"


def test_paths_are_absolute_with_the_home_folder_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `--db=~/x.db`, an env file or rolecast.toml: no shell expands `~` there
    monkeypatch.chdir(tmp_path)
    settings = BotSettings(
        home="relative-home", db_path="~/chat.db", personas_dir="cards", retrain={"workdir": "~/rt"}
    )
    assert settings.home == tmp_path / "relative-home"
    assert settings.database == Path.home() / "chat.db"
    assert settings.user_personas == tmp_path / "cards"
    assert settings.retrain_dir == Path.home() / "rt"


@pytest.mark.parametrize("level", ["loud", "warnings"])
def test_an_unknown_log_level_is_one_line(level: str) -> None:
    lines = assert_one_clear_error(rolecast("persona", "list", ROLECAST_LOG_LEVEL=level))
    assert "ROLECAST_LOG_LEVEL" in lines[0] and "DEBUG" in lines[0]
    assert rolecast("persona", "list", ROLECAST_LOG_LEVEL="").exit_code == 0
    assert rolecast("persona", "list", ROLECAST_LOG_LEVEL="info").exit_code == 0


def test_the_runner_refuses_a_port_out_of_range() -> None:
    result = rolecast("runner", "--port", "99999")
    assert result.exit_code == 2 and "--port" in result.output
    assert not isinstance(result.exception, OverflowError)


def test_a_folder_the_system_refuses_is_one_line(tmp_path: Path) -> None:
    # a path too long for the file system: the write that needs it says so, no traceback
    deep = tmp_path / ("x" * 300)
    card = tmp_path / "nia.json"
    card.write_text('{"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Nia"}}')
    result = rolecast("persona", "import", str(card), ROLECAST_HOME=str(deep))
    assert result.exit_code == 1 and not isinstance(result.exception, OSError), result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and "File name too long" in line


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-tokens", "0"], "--max-tokens=0"),
        (["--max-tokens", "100000"], "--max-tokens=100000"),
        (["--temperature", "-1"], "--temperature=-1.0"),
        (["--seed", str(2**64)], f"--seed={2**64}"),
        (["--seed", str(-(2**63) - 1)], "--seed="),
    ],
)
def test_a_bad_sampling_flag_is_one_line_before_the_chat_starts(
    flags: list[str], named: str, own_home: Path
) -> None:
    # a seed the model server refuses (vLLM's range, int64) would fail every reply instead
    dead = "http://127.0.0.1:9/v1"
    (line,) = assert_one_clear_error(rolecast("chat", "-p", "haruhi", "--server", dead, *flags))
    assert line.startswith(f"error: {named}")
    assert not (own_home / "rolecast.db").exists()


def test_a_seed_in_range_is_kept() -> None:
    assert BotSettings(sampling={"seed": -(2**63)}).sampling.seed == -(2**63)
    assert BotSettings(sampling={"seed": 2**63 - 1}).sampling.seed == 2**63 - 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora_r", "-1"], "--lora_r must be positive"),
        (["--packing", "true", "--max_length", "4096", "--batch_tokens", "1024"], "--batch_tokens"),
        (["--persona", "a/b"], "--persona must be a plain name"),
    ],
)
def test_contradictory_train_flags_are_one_line(flags: list[str], message: str) -> None:
    result = rolecast("train", "--data", "absent.jsonl", "--persona", "nia", *flags)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and message in line
    # a program that follows the run reads it as its error line
    followed = rolecast("train", "--json", "--data", "absent.jsonl", "--persona", "nia", *flags)
    event = json.loads(followed.stdout.splitlines()[0])
    assert event["type"] == "error" and message in event["message"]


@pytest.mark.parametrize(
    ("command", "flags", "named"),
    [
        ("eval", ["--data", "absent.jsonl", "--max-new-tokens", "0"], "max_new_tokens"),
        ("eval", ["--data", "absent.jsonl", "--batch-size", "0"], "batch_size"),
        ("eval", ["--data", "absent.jsonl", "--repetition-penalty", "0"], "repetition_penalty"),
        ("compare", ["hi", "--adapter", "absent", "--max-new-tokens", "-5"], "max_new_tokens"),
    ],
)
def test_a_generation_setting_out_of_range_is_refused_before_a_model_loads(
    command: str, flags: list[str], named: str
) -> None:
    result = rolecast(command, *flags)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and named in line
