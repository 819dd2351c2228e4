"""The architecture the README draws: serving and the tune/generate verbs reach tuning methods only
through the registry, and every method package registers itself (a new method is one folder)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import moe_runtime
from moe_runtime.cli import build_parser
from moe_runtime.tuning.registry import config_options, methods
from moe_runtime.tuning.routed_lora import VARIANTS

PACKAGE = Path(moe_runtime.__file__).parent
METHOD_PACKAGES = sorted(p.name for p in (PACKAGE / "tuning").iterdir() if (p / "__init__.py").exists())


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(source if source is not None else path.read_text())
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def concrete_method_imports(path: Path, source: str | None = None) -> list[str]:
    prefixes = tuple(f"moe_runtime.tuning.{name}" for name in METHOD_PACKAGES)
    return sorted(
        m
        for m in imported_modules(path, source)
        if m in prefixes or m.startswith(tuple(p + "." for p in prefixes))
    )


def test_the_check_finds_a_concrete_import():
    path = PACKAGE / "runtime" / "engine.py"
    assert concrete_method_imports(path, "from ..tuning.esft import read_adapter\n") == [
        "moe_runtime.tuning.esft",
        "moe_runtime.tuning.esft.read_adapter",
    ]
    assert concrete_method_imports(path, "from ..tuning import routed_lora\n") == [
        "moe_runtime.tuning.routed_lora"
    ]
    assert concrete_method_imports(path, "from ..tuning.registry import get\n") == []


@pytest.mark.parametrize(
    "path",
    [
        *sorted((PACKAGE / "runtime").rglob("*.py")),
        *sorted((PACKAGE / "serving").rglob("*.py")),
        PACKAGE / "cli" / "tune.py",
        PACKAGE / "cli" / "generate.py",
        PACKAGE / "cli" / "serve.py",
    ],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_no_concrete_method_package_imported(path):
    assert concrete_method_imports(path) == []


def test_every_method_package_registers_itself():
    registered = methods()
    assert set(registered) == {"esft", "esft-lora-merge", "full", "lora", "peft-lora", "routed-lora"}
    assert {"mola", "dynmole"} <= set(VARIANTS)  # variant folders register routed-LoRA variants
    assert set(METHOD_PACKAGES) == {
        "esft",
        "esft_lora_merge",
        "full",
        "lora",
        "peft_lora",
        "routed_lora",
        "mola",
        "dynmole",
    }


def test_tune_flags_come_from_the_method_configs():
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    tune = sub.choices["tune"]
    tune.format_help()  # the method flags are added when the verb is first used
    flags = {s for action in tune._actions for s in action.option_strings}
    for method in methods().values():
        for config in method.all_configs():
            for _, meta in config_options(config):
                assert f"--{meta['flag']}" in flags, (method.name, meta["flag"])
    assert {"--experts-per-layer", "--tsallis-q", "--lora-top-p"} <= flags


def test_the_command_line_starts_without_torch():
    """Building the parser (every verb, ``--help``) imports no tuning method, hence no torch."""
    import subprocess
    import sys

    code = (
        "import sys; from moe_runtime.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
