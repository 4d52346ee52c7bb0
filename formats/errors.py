"""Typed errors of the shared formats. Each says which file is wrong and why; the packages turn
them into their own user-facing messages at their edges."""

from __future__ import annotations


class FormatError(Exception):
    """A file that does not hold what its format says, or an operation the format forbids."""


class ManifestError(FormatError):
    """An adapter's `rolecast.json` that cannot be read."""


class RegistryError(FormatError):
    """A publish, rollback or lookup in the adapter registry that cannot be done."""


class BaseModelError(FormatError):
    """The default base model cannot be found or converted."""
