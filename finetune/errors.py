"""Typed errors of the training side; the CLI turns them into one clear error line."""

from __future__ import annotations


class FinetuneError(Exception):
    """Base class: something the user can fix (a path, a setting, the data)."""


class ConfigError(FinetuneError):
    """A training or evaluation setting is out of range or contradicts another one."""


class DataError(FinetuneError):
    """The dataset cannot be used as it is; `problems` lists what is wrong, row by row."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        detail = "".join(f"\n  {p}" for p in self.problems[:50])
        more = len(self.problems) - 50
        if more > 0:
            detail += f"\n  ... and {more} more"
        super().__init__(message + detail)


class TemplateError(FinetuneError):
    """The tokenizer's chat template cannot give assistant spans (no template, or not prefix-stable)."""


class RefusedDialogue(TemplateError):
    """The chat template refuses one dialogue (its `raise_exception`, e.g. roles out of turn or
    a system turn the model has no role for): a problem of that row, not of the model."""


class ModelNotFoundError(FinetuneError):
    """The base model or adapter cannot be found or loaded."""
