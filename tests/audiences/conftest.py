"""With pytest's default import mode, ``tests/`` is on sys.path, so this folder would be imported as a
namespace package named ``audiences`` and hide the real one (installed through an editable finder,
which Python asks last). Putting the project root on sys.path lets the real package win; the same fix
project-wide is ``pythonpath = ["."]`` under ``[tool.pytest.ini_options]``."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
if getattr(sys.modules.get("audiences"), "__file__", None) is None:
    sys.modules.pop("audiences", None)
