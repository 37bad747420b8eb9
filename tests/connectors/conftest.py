"""Make ``connectors`` mean the project's package, not this test folder.

pytest puts ``tests/`` on ``sys.path`` (rootdir-less conftest), where ``tests/connectors`` would be taken
for a namespace package named ``connectors``; with the project root on the path too, the real (regular)
package wins. (Better: ``pythonpath = ["."]`` in pytest's settings.)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.append(ROOT)
for _name in ("connectors", "sequences"):
    _module = sys.modules.get(_name)
    if _module is not None and getattr(_module, "__file__", None) is None:
        del sys.modules[_name]  # a namespace package picked up from tests/
