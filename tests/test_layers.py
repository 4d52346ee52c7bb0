"""The layering written in pyproject.toml (`[tool.importlinter]`) holds: `formats` below the
three packages, the three independent, the chat core free of front ends and of the retrain loop,
no model library in the bot or the formats, and the parts of the core's memory layered (the
`Memory` class, its method groups, the records)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    tool = Path(sys.executable).parent / "lint-imports"
    # this checkout's packages, whatever else is installed
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run(
        [str(tool), "--no-cache"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


# What `formats` may import: the standard library and these, so that every package (the bot's
# light image included) can read and write the shared files.
FORMATS_MAY_IMPORT = {"pydantic", "pydantic_settings", "platformdirs", "filelock"}
# ... and one documented exception: the default model's conversion, shared by the two packages
# that load models (formats.basemodel.convert imports transformers in its body).
FORMATS_EXCEPTION = ("formats.basemodel", "transformers")


def test_formats_imports_only_the_standard_library_and_its_few_dependencies() -> None:
    import grimp

    graph = grimp.build_graph("formats", include_external_packages=True, cache_dir=None)
    found = set()
    for module in graph.modules:
        if not module.startswith("formats"):
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            top = imported.split(".")[0]
            if top != "formats" and top not in sys.stdlib_module_names:
                found.add((module, top))
    assert {top for _, top in found} - FORMATS_MAY_IMPORT == {FORMATS_EXCEPTION[1]}
    assert {(m, t) for m, t in found if t not in FORMATS_MAY_IMPORT} == {FORMATS_EXCEPTION}
