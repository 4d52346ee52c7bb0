"""Check, on the host, that Rolecast can run beside the vLLM of a bundle: every requirement of
Rolecast (and of the extras asked for) is installed in a version it accepts, and the host's torch
is the one the bundle's vLLM was built for (vLLM pins it exactly: its compiled kernels need it).

    python3 scripts/host_check.py [--extras serve,train] [--source CHECKOUT] [--require-vllm]

Reads Rolecast's requirements from CHECKOUT/pyproject.toml when it runs from a checkout, else
from its installed metadata. Standard library only (and `packaging` when the host has it, for
version ranges). Prints one line per problem; exit status 1 when there is any.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def rolecast_requirements(source: Path | None, extras: set[str]) -> list[str]:
    """Rolecast's requirements for `extras`, self-references (`rolecast[serve]`) expanded."""
    if source is not None:
        project = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        optional: dict[str, list[str]] = project.get("optional-dependencies", {})
        found = list(project["dependencies"])
        todo, seen = list(extras), set()
        while todo:
            extra = todo.pop()
            if extra in seen:
                continue
            seen.add(extra)
            for req in optional.get(extra, []):
                match = NAME.match(req)
                if match and normalise(match.group(1)) == "rolecast":
                    todo += [e.strip() for e in (match.group(2) or "[]")[1:-1].split(",") if e]
                else:
                    found.append(req)
        return found
    out = []
    for req in md.requires("rolecast") or []:
        spec, _, marker = req.partition(";")
        wanted = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if (not wanted or set(wanted) & extras) and normalise(
            NAME.match(spec).group(1)
        ) != "rolecast":  # type: ignore[union-attr]
            out.append(spec)
    return out


def unmet(requirement: str) -> str | None:
    """Why `requirement` is not met here, or None."""
    match = NAME.match(requirement.split(";")[0])
    if match is None:
        return None
    name, spec = match.group(1), match.group(3).strip()
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        return f"missing: {name}{spec and ' ' + spec}"
    if spec:
        try:
            from packaging.specifiers import SpecifierSet
        except ImportError:  # no packaging here: presence is all that can be checked
            return None
        if have.split("+")[0] not in SpecifierSet(spec):
            return f"wrong version: {name} {have}, Rolecast needs {spec}"
    return None


def torch_pin_problem(require_vllm: bool) -> str | None:
    """Whether the host's torch is the one the bundle's vLLM pins (`torch==X`)."""
    try:
        requires = md.requires("vllm") or []
    except md.PackageNotFoundError:
        return "missing: vllm (the bundle holds no vLLM)" if require_vllm else None
    pins = [r for r in requires if re.match(r"^torch\s*==", r.split(";")[0])]
    if not pins:
        return None
    pinned = pins[0].split(";")[0].split("==")[1].strip()
    try:
        have = md.version("torch").split("+")[0]
    except md.PackageNotFoundError:
        return f"missing: torch (vLLM {md.version('vllm')} needs torch {pinned})"
    if have != pinned:
        return f"wrong version: torch {have}, vLLM {md.version('vllm')} was built for {pinned}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--extras", default="serve", help="comma-separated Rolecast extras")
    parser.add_argument("--source", type=Path, help="the checkout Rolecast runs from")
    parser.add_argument("--require-vllm", action="store_true", help="vLLM must be found")
    args = parser.parse_args(argv)
    extras = {e.strip() for e in args.extras.split(",") if e.strip()}
    problems = [p for r in rolecast_requirements(args.source, extras) if (p := unmet(r))]
    if (pin := torch_pin_problem(args.require_vllm)) is not None:
        problems.append(pin)
    for problem in problems:
        print(f"host check: {problem}", file=sys.stderr)
    if not problems:
        print(
            f"host check: Rolecast ({', '.join(sorted(extras)) or 'base'}) can run here",
            file=sys.stderr,
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
