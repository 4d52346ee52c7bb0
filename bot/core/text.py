"""Text from outside the bot (members, card authors, the model server), made safe to keep,
send to a model and show.

- `clean_text`: a lone UTF-16 surrogate (it arrives through a JSON escape such as "\\ud800" and
  no encoder accepts it) becomes U+FFFD, an escaped surrogate pair becomes its character, and
  NUL characters are dropped, so the text can be stored in SQLite, sent as JSON and printed.
- `defuse_control_tokens`: breaks up the strings that chat templates use as control tokens
  (`<|im_end|>`, `<|start_header_id|>`, `[INST]`, `</s>`, ...) with a zero-width joiner after
  their first character. vLLM renders the chat template to text and tokenizes that text with
  special tokens enabled, so such a string inside a message would otherwise become the real
  control token: a member could close their own turn and open a fake system turn. The joiner
  is invisible in Discord and keeps the text readable for the model.
- `blank`: whether text shows nothing at all (spaces, zero-width characters, direction marks).
- `for_terminal`: drops the control characters a terminal would act on (escape sequences,
  carriage returns, bells) from text about to be printed.
"""

from __future__ import annotations

import re
import unicodedata

REPLACEMENT = "\ufffd"
ZWJ = "\u200d"

_BAD = re.compile("([\ud800-\udbff][\udc00-\udfff])|[\ud800-\udfff]|\x00")


def _repair(match: re.Match[str]) -> str:
    pair = match.group(1)
    if pair is None:
        return "" if match.group(0) == "\x00" else REPLACEMENT
    high, low = ord(pair[0]), ord(pair[1])
    return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))


def clean_text(text: str) -> str:
    """`text` without lone surrogates (U+FFFD instead) or NUL characters."""
    return _BAD.sub(_repair, text) if _BAD.search(text) else text


_SURROGATE = re.compile("[\ud800-\udfff]")


def first_surrogate(text: str) -> int | None:
    """The index of the first surrogate code point in `text` (a character that cannot be
    encoded), or None."""
    match = _SURROGATE.search(text)
    return match.start() if match else None


# Control-token look-alikes of the chat-template families in use (ChatML/Qwen/SmolLM, Llama 3,
# harmony (gpt-oss), Phi, Gemma, Mistral, Llama 2, DeepSeek, StarCoder/SmolLM code tokens).
# Bare-word tags are listed by name, so that ordinary text such as "<b>" or "[OOC]" is left as
# it is.
_ANGLE_WORDS = (
    "s|bos|eos|pad|unk|mask|sep|cls|sop|eop|endoftext|start_of_turn|end_of_turn|"
    "start_of_image|end_of_image|think|tool_call|tool_response|tools|file_sep|repo_name|"
    "reponame|filename|gh_stars|issue_start|issue_comment|issue_closed|jupyter_start|"
    "jupyter_text|jupyter_code|jupyter_output|jupyter_script|empty_output|fim_prefix|"
    "fim_middle|fim_suffix|fim_pad|commit_before|commit_msg|commit_after"
)
_BRACKET_WORDS = (
    "INST|SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_CALLS|TOOL_RESULTS|TOOL_CONTENT|THINK|IMG|"
    "IMG_BREAK|IMG_END|BOS|EOS|EOT|PAD|UNK|CLS|SEP|MASK|gMASK|sMASK"
)
_CONTROL_TOKEN = re.compile(
    r"<[|｜][^<>|｜\s]{1,64}[|｜]>"  # <|im_end|>, <|eot_id|>, <|channel|>, <｜User｜>
    r"|<[|｜][A-Za-z_][\w.-]{0,63}>"  # Gemma 4's <|turn>
    r"|<[A-Za-z_][\w.-]{0,63}[|｜]>"  # and <turn|>
    rf"|</?(?:{_ANGLE_WORDS})>"
    rf"|\[/?(?:{_BRACKET_WORDS})\]"
    r"|<</?SYS>>"
)


def _defuse(match: re.Match[str]) -> str:
    token = match.group(0)
    return token[0] + ZWJ + token[1:]


def defuse_control_tokens(text: str) -> str:
    """`text` with every control-token look-alike broken up by a zero-width joiner.

    Idempotent: a defused text has no look-alike left."""
    if "<" not in text and "[" not in text:
        return text
    return _CONTROL_TOKEN.sub(_defuse, text)


def blank(text: str) -> bool:
    """Whether `text` shows nothing: only spaces and invisible characters (zero-width spaces
    and joiners, direction marks, a byte-order mark), so there is nothing to answer."""
    return all(c.isspace() or unicodedata.category(c) in ("Cf", "Cc") for c in text)


_TERMINAL_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def for_terminal(text: str) -> str:
    """`text` fit to print: control characters other than newline and tab dropped, lone
    surrogates replaced."""
    return _TERMINAL_CONTROL.sub("", clean_text(text))
