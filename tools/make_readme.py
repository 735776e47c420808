"""Write README.md from nbs/index.ipynb.

`nbdev-readme` renders through Quarto, a binary that cannot be installed from the package registries
this project builds from; this script does the same job for our index notebook: markdown cells as they
are, code cells as python blocks with their outputs (markdown as it is, text fenced, pictures as PNG files),
`#| hide` cells left out, `#| echo: false` cells shown by their output only, nbdev directives dropped.
Each picture (an `image/png` output) is written to `nbs/images/readme_<cell id>[_<n>].png`, only when its bytes
change, and shown as a markdown image with a path relative to the repository root, so it renders on the repository's
page; its alternative text is the cell's `#| fig-alt:` (or `#| fig-cap:`), else the cell's last line of code.
`readme_*.png` files there that the notebook no longer makes are removed.
A markdown line `<!-- include: PATH -->` is replaced by that file (PATH from the repository root): the
performance section comes from the benchmarks' own output that way, not typed by hand. A markdown line
`<!-- layout -->` is replaced by a table of the package's modules, made from the package itself: each module
(`fastunet/**/*.py` but `__init__.py` and `_modidx.py`), grouped by sub-package in layer order, with the first
sentence of its docstring and the notebook it is exported from (`nbs/NN_<module path>.ipynb`).

    python tools/make_readme.py          # write README.md
    python tools/make_readme.py --check  # exit 1 if README.md or a picture is not what the notebook makes
"""
from __future__ import annotations

import ast
import base64
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = re.compile(r'<!-- include: (\S+) -->')
LAYOUT = '<!-- layout -->'
PACKAGE = 'fastunet'
LAYERS = ('encoders', 'unet', 'learner', 'pipeline')   # lowest first; modules at the package's top level come last
IMAGES = ROOT / 'nbs' / 'images'   # the README's pictures: readme_<cell id>[_<n>].png
NOTEBOOK_NAME = re.compile(r'(\d+)([a-z]*)_(.+)\.ipynb')


def _source(cell: dict) -> str:
    src = cell['source']
    return ''.join(src) if isinstance(src, list) else src


def first_sentence(docstring: str) -> str:
    "The docstring's first sentence, on one line (all of it when no sentence ends before its end)."
    text = ' '.join(docstring.split())
    match = re.match(r'(.+?[.!?])(?=\s+[A-Z`"(]|$)', text)
    return match.group(1) if match else text


def _notebook_of(module: str) -> str:
    "The notebook `nbs/NN_<module>.ipynb` that `module` (dotted, below the package) is exported from."
    found = [p.name for p in (ROOT / 'nbs').glob(f'*_{module}.ipynb') if (m := NOTEBOOK_NAME.fullmatch(p.name)) and m.group(3) == module]
    if len(found) != 1: raise SystemExit(f'{PACKAGE}.{module}: expected one notebook nbs/NN_{module}.ipynb, found {found or "none"}')
    return found[0]


def _layout_order(subpackage: str, notebook: str) -> tuple:
    "Sub-packages in layer order (others after them, by name), the package's top-level modules last; then notebook number."
    group = (0, LAYERS.index(subpackage), '') if subpackage in LAYERS else (1, 0, subpackage) if subpackage else (2, 0, '')
    number, suffix, _ = NOTEBOOK_NAME.fullmatch(notebook).groups()
    return group + (int(number), suffix)


def layout_table() -> str:
    "A markdown table of every module of the package: sub-package, module, its docstring's first sentence, its notebook."
    rows = []
    for path in sorted((ROOT / PACKAGE).rglob('*.py')):
        if path.name in ('__init__.py', '_modidx.py'): continue
        parts = path.relative_to(ROOT / PACKAGE).with_suffix('').parts
        subpackage, module = '.'.join(parts[:-1]), '.'.join(parts)
        notebook = _notebook_of(module)
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding='utf-8'), filename=str(path))) or ''
        rows.append((_layout_order(subpackage, notebook), subpackage, parts[-1], first_sentence(docstring).replace('|', '\\|'), notebook))
    lines = ['| sub-package | module | what it holds | notebook |', '|---|---|---|---|']
    previous = None
    for _, subpackage, name, summary, notebook in sorted(rows):
        package = '.'.join(filter(None, (PACKAGE, subpackage)))
        lines.append(f'| {f"`{package}`" if package != previous else ""} | `{name}` | {summary} | [`{notebook}`](nbs/{notebook}) |')
        previous = package
    return '\n'.join(lines)


def _include(markdown: str) -> str:
    "Replace `<!-- include: PATH -->` lines with the file's text, and a `<!-- layout -->` line with the modules' table."
    lines = []
    for line in markdown.splitlines():
        match = INCLUDE.fullmatch(line.strip())
        if match: line = (ROOT / match.group(1)).read_text(encoding='utf-8').strip()
        elif line.strip() == LAYOUT: line = layout_table()
        lines.append(line)
    return '\n'.join(lines)


def _text(value) -> str: return ''.join(value) if isinstance(value, list) else value


class _TableRows(HTMLParser):
    "The cells of an HTML table, row by row (fastai's training table is one)."
    def __init__(self):
        super().__init__()
        self.rows, self._cell = [], None
    def handle_starttag(self, tag, attrs):
        if tag == 'tr': self.rows.append([])
        elif tag in ('td', 'th'): self._cell = ''
    def handle_endtag(self, tag):
        if tag in ('td', 'th') and self._cell is not None:
            self.rows[-1].append(self._cell.strip())
            self._cell = None
    def handle_data(self, data):
        if self._cell is not None: self._cell += data


def _markdown_table(html: str) -> str:
    parser = _TableRows()
    parser.feed(html)
    header, *rows = [row for row in parser.rows if row]
    lines = [header, ['---'] * len(header), *rows]
    return '\n'.join('| ' + ' | '.join(row) + ' |' for row in lines)


def _render_output(output: dict) -> str | None:
    "Tables and markdown as markdown (fastai's training table, show_doc), text fenced; object reprs left out (pictures: `render`)."
    data = output.get('data', {})
    if '<table' in _text(data.get('text/html', '')): return _markdown_table(_text(data['text/html']))
    if 'text/markdown' in data:   # show_doc's link to the source needs the docs site: left out
        return '\n'.join(line for line in _text(data['text/markdown']).strip().splitlines() if not line.startswith('[source]('))
    if output.get('output_type') == 'stream' and output.get('name') == 'stdout': text = _text(output['text'])
    elif 'text/plain' in data: text = _text(data['text/plain'])
    else: return None
    text = text.rstrip()
    if not text or (text.startswith('<') and text.endswith('>')): return None
    return '```\n' + text + '\n```'


def _directive(directives: list[str], name: str) -> str | None:
    "The value of `#| name: value`, if the cell has it."
    for d in directives:
        key, _, value = d[2:].partition(':')
        if key.strip() == name and value.strip(): return value.strip()
    return None


def _pictures(cell: dict, index: int, body: str, directives: list[str]) -> dict[int, tuple[str, bytes, str]]:
    "The cell's PNG outputs by output number: file name, bytes and alternative text."
    stem = f"readme_{cell.get('id') or index}"
    alt = _directive(directives, 'fig-alt') or _directive(directives, 'fig-cap') or body.splitlines()[-1].strip()
    pngs = [(k, base64.b64decode(_text(o['data']['image/png']))) for k, o in enumerate(cell.get('outputs', []))
            if 'image/png' in o.get('data', {})]
    return {k: (f'{stem}.png' if n == 0 else f'{stem}_{n}.png', png, alt.replace('[', '(').replace(']', ')'))
            for n, (k, png) in enumerate(pngs)}


def render(notebook: Path) -> tuple[str, dict[str, bytes]]:
    "The README's text, and its pictures by file name (in `IMAGES`)."
    parts, images = [], {}
    for index, cell in enumerate(json.loads(notebook.read_text(encoding='utf-8'))['cells']):
        text = _source(cell)
        lines = text.splitlines()
        directives = [l.strip() for l in lines if l.startswith('#|')]
        if any(d.replace(' ', '') in ('#|hide', '#|exporti') for d in directives): continue
        body = '\n'.join(l for l in lines if not l.startswith('#|')).strip()
        if not body: continue
        if cell['cell_type'] == 'markdown':
            parts.append(_include(body))
            continue
        if '#|echo:false' not in [d.replace(' ', '') for d in directives]: parts.append(f'```python\n{body}\n```')
        pictures = _pictures(cell, index, body, directives)
        for k, output in enumerate(cell.get('outputs', [])):
            if k in pictures:
                name, png, alt = pictures[k]
                images[name] = png
                parts.append(f'![{alt}]({IMAGES.relative_to(ROOT).as_posix()}/{name})')
            elif (rendered := _render_output(output)) is not None: parts.append(rendered)
    readme = '<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n\n' + '\n\n'.join(parts) + '\n'
    return readme, images


def _stale_pictures(images: dict[str, bytes]) -> list[Path]:
    "README pictures on disk that the notebook no longer makes."
    return sorted(p for p in IMAGES.glob('readme_*.png') if p.name not in images)


def main() -> int:
    readme, (text, images) = ROOT / 'README.md', render(ROOT / 'nbs' / 'index.ipynb')
    if '--check' in sys.argv:
        wrong = [] if readme.exists() and readme.read_text(encoding='utf-8') == text else [readme]
        wrong += [IMAGES / name for name, png in images.items() if not (IMAGES / name).is_file() or (IMAGES / name).read_bytes() != png]
        wrong += _stale_pictures(images)
        if wrong:
            print(f"{', '.join(p.relative_to(ROOT).as_posix() for p in wrong)}: not what nbs/index.ipynb makes: run python tools/make_readme.py")
            return 1
        return 0
    for name, png in images.items():   # written only when the bytes change, so an unchanged picture keeps its file
        if not (IMAGES / name).is_file() or (IMAGES / name).read_bytes() != png:
            IMAGES.mkdir(parents=True, exist_ok=True)
            (IMAGES / name).write_bytes(png)
    for stale in _stale_pictures(images): stale.unlink()
    readme.write_text(text, encoding='utf-8')
    return 0


if __name__ == '__main__':
    sys.exit(main())
