"""Runs the notebooks and saves them with their outputs (`make notebooks`); the docs site shows them as saved.

    python notebooks/execute.py                          # every notebooks/*.ipynb, one after the other
    python notebooks/execute.py 02_gradient_coherence    # only these (names with or without .ipynb)

Each notebook runs top to bottom from the repository root, offline, on CPU, with one torch thread, figures at
72 dpi (PNG); the saved outputs drop stderr (Lightning's log lines, warnings naming local paths), the traces of
rich's progress displays, and timings.
Then:

- the notebook's metadata `frozenlm.sources_sha256` records a hash of its code cells (their sources and
  figure names): `tests/test_notebooks.py` fails, with "run make notebooks", when a cell changed since;
- a code cell whose metadata names a figure (`"frozenlm": {"figure": "<name>"}`) has its PNG written to
  `docs/figures/notebooks/<name>.png`, which the guides embed; files there that no cell names are removed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
FIGURES = REPO / "docs" / "figures" / "notebooks"
DPI = 72
# The kernel's configuration: small PNGs, the same at every run.
KERNEL_CONFIG = f"""
c.InlineBackend.figure_formats = {{"png"}}
c.InlineBackend.rc = {{"figure.dpi": {DPI}, "savefig.dpi": {DPI}}}
c.InlineBackend.print_figure_kwargs = {{"bbox_inches": "tight", "dpi": {DPI}}}
"""


def sources_hash(notebook) -> str:
    """sha256 of the code cells' sources and figure names, in order: what the saved outputs were made from."""
    cells = [[c.source, figure_name(c)] for c in notebook.cells if c.cell_type == "code"]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def figure_name(cell) -> str | None:
    return cell.get("metadata", {}).get("frozenlm", {}).get("figure")


def cell_png(cell) -> bytes | None:
    """The PNG of a cell's last image output, or None."""
    pngs = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    return base64.b64decode(pngs[-1]) if pngs else None


def figures(notebook) -> dict[str, bytes | None]:
    """`{figure name: PNG bytes or None}` of the named cells of a notebook."""
    return {figure_name(c): cell_png(c) for c in notebook.cells if c.cell_type == "code" and figure_name(c)}


WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")


def is_noise(output) -> bool:
    """Outputs not kept: stderr (log lines, warnings naming local paths), and what rich's progress displays leave in
    a notebook (an empty display, or a warning that ipywidgets is missing)."""
    if output.output_type == "stream":
        return output.name == "stderr"
    if output.output_type != "display_data" or "image/png" in output.get("data", {}):
        return False
    text = output.get("data", {}).get("text/plain", "").strip()
    return not text or bool(WARNING.match(text))


def execute(path: Path, timeout: int) -> None:
    import tempfile

    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
    with tempfile.TemporaryDirectory() as ipython_dir:
        profile = Path(ipython_dir) / "profile_default"
        profile.mkdir()
        (profile / "ipython_kernel_config.py").write_text(KERNEL_CONFIG)
        env = {"IPYTHONDIR": ipython_dir, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the kernel inherits them
        try:
            NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                           resources={"metadata": {"path": str(REPO)}}).execute()  # fmt: skip
        finally:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not is_noise(o)]
    notebook.metadata.pop("widgets", None)
    notebook.metadata["frozenlm"] = {"sources_sha256": sources_hash(notebook)}
    nbformat.write(notebook, path)
    FIGURES.mkdir(parents=True, exist_ok=True)
    for name, png in figures(notebook).items():
        if png is None:
            raise SystemExit(f"{path.name}: the cell of figure {name!r} drew nothing")
        (FIGURES / f"{name}.png").write_bytes(png)
        print(f"  wrote {(FIGURES / f'{name}.png').relative_to(REPO)} ({len(png):,} bytes)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds a cell may take")
    args = parser.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.names:
        wanted = {n.removesuffix(".ipynb") for n in args.names}
        unknown = wanted - {p.stem for p in paths}
        if unknown:
            parser.error(f"no notebook {sorted(unknown)} in notebooks/")
        paths = [p for p in paths if p.stem in wanted]
    for path in paths:
        print(f"running {path.relative_to(REPO)}", flush=True)
        execute(path, args.timeout)
    if not args.names:  # a full run: drop the figures no cell names any more
        import nbformat

        named = {n for p in paths for n in figures(nbformat.read(p, as_version=4))}
        for stale in sorted(set(p.stem for p in FIGURES.glob("*.png")) - named):
            (FIGURES / f"{stale}.png").unlink()
            print(f"  removed docs/figures/notebooks/{stale}.png (no cell names it)")


if __name__ == "__main__":
    sys.exit(main())
