"""Execute every notebook in notebooks/ at small sizes (QUICK = True); fail on any error.

Slow (tens of seconds per notebook): ``pytest -m slow tests/test_notebooks.py``. The notebooks
are stored without outputs; this also checks that they stay that way.
"""
import glob
import os
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.ipynb")))


def test_notebooks_exist_and_have_no_outputs():
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed "
                                   "(pip install -e .[notebooks])")
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert names == ["01_quickstart.ipynb", "02_deep_linear.ipynb",
                     "03_nonlinear_vs_networks.ipynb", "04_fluctuations.ipynb",
                     "05_losses_and_classification.ipynb", "06_barlow_twins.ipynb",
                     "07_sweeps.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code[0].source.startswith("QUICK = False"), path
        for c in code:
            assert not c.outputs and c.execution_count is None, f"{path} has stored outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed "
                                   "(pip install -e .[notebooks])")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed "
                                   "(pip install -e .[notebooks])")
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    first.source = "QUICK = True"
    start = time.perf_counter()
    # cwd = repo root so that `import dmft` works without an install; errors raise
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": ROOT}}).execute()
    print(f"{os.path.basename(path)}: {time.perf_counter() - start:.1f} s")
