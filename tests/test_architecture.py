"""The layers hold (README "Architecture"): the import contracts, settings handed down from the top,
and each channel fact in ``omni.core.channels`` only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from omni.core.channels import SEND_CHANNELS, TOUCHPOINTS

ROOT = Path(__file__).resolve().parent.parent
# Below the CLI and the flows: these never read the environment's settings themselves.
LOWER_LAYERS = ("omni/core", "profiles", "audiences", "templates", "connectors", "sequences", "reports")
SOURCE_LAYERS = (*LOWER_LAYERS, "flows", "omni/cli")
CHANNEL_NAMES = frozenset(SEND_CHANNELS) | frozenset(TOUCHPOINTS)


def _modules(*folders: str) -> list[Path]:
    return sorted(
        p for folder in folders for p in (ROOT / folder).rglob("*.py") if "migrations" not in p.parts
    )


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_import_contracts_hold() -> None:
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


@pytest.mark.parametrize("path", _modules(*LOWER_LAYERS), ids=_relative)
def test_lower_layers_are_handed_their_settings(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == (
            "get_settings"
        ):
            found.append(f"line {node.lineno}: get_settings()")
        if (
            isinstance(node, ast.arg)
            and node.arg == "settings"
            and ast.unparse(node.annotation or ast.Name(""))
            in (
                "Any",
                "",
            )
        ):
            found.append(f"line {node.lineno}: an untyped settings parameter")
    assert not found, f"{_relative(path)} reads settings itself instead of being handed them: {found}"


@pytest.mark.parametrize("path", _modules(*SOURCE_LAYERS), ids=_relative)
def test_channel_lists_live_in_the_core(path: Path) -> None:
    """A tuple, list or set of two or more channel names written out anywhere but omni.core.channels is a
    second copy of a channel fact."""
    if _relative(path) == "omni/core/channels.py":
        return
    tree = ast.parse(path.read_text(encoding="utf-8"))
    copies = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set) and len(node.elts) >= 2:
            values = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            if len(values) == len(node.elts) and all(
                isinstance(v, str) and v in CHANNEL_NAMES for v in values
            ):
                copies.append(f"line {node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Dict) and len(node.keys) >= 2:
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
            if len(keys) == len(node.keys) and all(isinstance(k, str) and k in SEND_CHANNELS for k in keys):
                copies.append(f"line {node.lineno}: a mapping keyed by channel")
    assert not copies, f"{_relative(path)} writes channel facts out again (use omni.core.channels): {copies}"
