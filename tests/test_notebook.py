"""The analysis notebook runs top to bottom through the public API (slow: real weights, real data)."""
from __future__ import annotations

import pytest

from conftest import needs_harmeme


@pytest.mark.manual
@needs_harmeme()
def test_notebook_executes(tmp_path):
    import importlib.util
    from pathlib import Path

    import nbformat

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("make_notebook", root / "notebooks" / "make_notebook.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.build(tmp_path / "nb.ipynb")
    nb = nbformat.read(out, 4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "harmful" in text and "macroF1" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # confusion matrices, errors, histogram
