"""The notebooks under notebooks/ run top to bottom (nbclient) against SYNTHETIC sweeps.

The sweeps come from tests/fixtures/sweep_builder.py (exact docs/CONTRACTS.md formats, made-up
numbers). The notebooks find them through the environment (DFT_SWEEP, DFT_SWEEP_B), as a user
would. Stored notebooks must carry no outputs, so that diffs stay reviewable.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from dft import ROOT  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "sweep_builder", Path(__file__).parent / "fixtures" / "sweep_builder.py")
sweep_builder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep_builder)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def fixture_sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return (sweep_builder.write_sweep(root, "grid", judge=True),
            sweep_builder.write_sweep(root, "grid_v2", seed=1, shift=0.05))


def test_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"explore_sweep.ipynb", "compare_sweeps.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "one papermill 'parameters' cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, fixture_sweeps, tmp_path, monkeypatch):
    monkeypatch.setenv("DFT_SWEEP", str(fixture_sweeps[0]))
    monkeypatch.setenv("DFT_SWEEP_B", str(fixture_sweeps[1]))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    if path.name == "explore_sweep.ipynb":  # intervals, Holm and the plot's error bars are shown
        assert "comparisons survive Holm at 0.05" in text and "matsci_mcq/acc_ci_low" in text
    else:
        assert "survive Holm" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4, "the figures were drawn"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "grid" in text
