"""Run notebooks in a Jupyter kernel and keep their outputs, as a reader of the manual sees them.

`nbdev-test` (which CI runs) executes every notebook too, but keeps no output, and outside Jupyter fastai draws
text progress bars. This runs each notebook in a real kernel (tables and pictures render as in Jupyter), from
`nbs/`, stops at the first error, and writes it back cleaned the way `nbdev-clean` cleans (no execution counts,
no kernel metadata), so that a rerun with the same results changes nothing but timings.

    python tools/run_notebooks.py                        # every notebook in nbs/
    python tools/run_notebooks.py nbs/25_*.ipynb         # some of them

Needs the dev requirements (nbclient, ipykernel): pip install -c .ci/constraints.txt -e ".[dev]"
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbdev.clean import clean_nb

ROOT = Path(__file__).resolve().parent.parent


def _third_party_warnings_only(output: dict) -> bool:
    "A stderr chunk holding nothing but warnings raised inside installed packages (torch's deprecations, …)."
    if output.get('output_type') != 'stream' or output.get('name') != 'stderr': return False
    lines = [line for line in output['text'].splitlines() if line.strip()]
    return bool(lines) and all('site-packages' in line and 'Warning' in line or line.startswith(' ') for line in lines)


def run(path: Path) -> float:
    "Execute `path` in place; returns the seconds it took. Raises on the first cell that fails."
    notebook = nbformat.read(path, as_version=4)
    start = time.time()
    env = {k: v for k, v in os.environ.items() if k != 'MPLBACKEND'}   # let the kernel draw inline
    os.environ.clear(); os.environ.update(env)
    NotebookClient(notebook, timeout=900, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}}).execute()
    for cell in notebook.cells:
        if cell.cell_type == 'code': cell.outputs = [o for o in cell.outputs if not _third_party_warnings_only(o)]
    as_dict = nbformat.from_dict(notebook)
    clean_nb(as_dict)
    nbformat.write(nbformat.from_dict(as_dict), path)
    return time.time() - start


def main(paths: list[str]) -> int:
    notebooks = [Path(p).resolve() for p in paths] or sorted((ROOT / 'nbs').glob('*.ipynb'))
    for notebook in notebooks:
        print(f'{notebook.name} ... ', end='', flush=True)
        print(f'{run(notebook):.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
