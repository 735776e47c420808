"""Write README.md from nbs/index.ipynb.

`nbdev-readme` renders through Quarto, a binary that cannot be installed from the package registries
this project builds from; this script does the same job for our index notebook: markdown cells as they
are, code cells as python blocks with their outputs (markdown as it is, text fenced, pictures left out),
`#| hide` cells left out, `#| echo: false` cells shown by their output only, nbdev directives dropped.
A markdown line `<!-- include: PATH -->` is replaced by that file (PATH from the repository root): the
performance section comes from the benchmarks' own output that way, not typed by hand.

    python tools/make_readme.py          # write README.md
    python tools/make_readme.py --check  # exit 1 if README.md is not what the notebook makes
"""
from __future__ import annotations

import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = re.compile(r'<!-- include: (\S+) -->')


def _source(cell: dict) -> str:
    src = cell['source']
    return ''.join(src) if isinstance(src, list) else src


def _include(markdown: str) -> str:
    "Replace `<!-- include: PATH -->` lines with the file's text."
    lines = []
    for line in markdown.splitlines():
        match = INCLUDE.fullmatch(line.strip())
        lines.append((ROOT / match.group(1)).read_text(encoding='utf-8').strip() if match else line)
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
    "Tables and markdown as markdown (fastai's training table, show_doc), text fenced; pictures and object reprs left out."
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


def render(notebook: Path) -> str:
    parts = []
    for cell in json.loads(notebook.read_text(encoding='utf-8'))['cells']:
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
        parts.extend(filter(None, map(_render_output, cell.get('outputs', []))))
    return '<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n\n' + '\n\n'.join(parts) + '\n'


def main() -> int:
    readme, text = ROOT / 'README.md', render(ROOT / 'nbs' / 'index.ipynb')
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text(encoding='utf-8') != text:
            print('README.md is not what nbs/index.ipynb makes: run python tools/make_readme.py')
            return 1
        return 0
    readme.write_text(text, encoding='utf-8')
    return 0


if __name__ == '__main__':
    sys.exit(main())
