"""notebooks/explore.ipynb executes top to bottom (in a kernel of this interpreter) and plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "explore.ipynb"


# Deprecations inside the jupyter packages (none today) must not fail this test; our own code runs
# in the kernel, where warnings become stderr output, checked below.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_client.*")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_core.*")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:nbclient.*")
def test_notebook_executes_and_shows_the_plot(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    # A kernelspec of our own, in tmp_path: the kernel is this interpreter (the venv's python),
    # whatever "python3" kernelspecs the machine or the user has installed.
    spec_dir = tmp_path / "kernels" / "ahi-test"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "ahi test", "language": "python"})
    )
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    manager = KernelManager(kernel_name="ahi-test", kernel_spec_manager=specs)
    assert manager.kernel_spec is not None
    assert manager.kernel_spec.argv[0] == sys.executable

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, km=manager, timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute()
    finally:  # the client does not clean up a kernel manager it was handed
        if client.kc is not None:
            client.kc.stop_channels()
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)
        manager.cleanup_resources()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the summary plot is shown"
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "CohortSummary(" in text
    assert "GetImageSetMetadata call(s)" in text  # the dry run
    # the enrichment example touches no archived image set: none in its cohort, no opt-in
    assert "0 archived image set(s) would move" in text
    assert "ArchiveAccessWarning" not in text
    sources = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    assert "allow_archive_access=True" not in sources
    assert "1 updated" in text  # the refresh saw the amended image set
    # this wave's features, each shown working
    assert "image sets, each once: True" in text  # a union
    assert "MERGE" in text  # Delta history
    assert "rows at version 0" in text  # time travel
    assert "AMENDED AGAIN" in text
    assert "QIDO-RS" in text  # the planner weighs QIDO-RS
    assert "NM image sets" in text
    assert "SearchImageSets       ok" in text  # doctor's table
    stderr = "\n".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stderr")
    assert "Traceback" not in stderr


def test_committed_notebook_keeps_its_outputs() -> None:
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] for c in code), "the committed copy is executed"
    assert any("image/png" in o.get("data", {}) for c in code for o in c["outputs"])
