"""README.md is nbs/index.ipynb rendered (quarto, which `nbdev_readme` needs, is not installable here, so the two are
kept in step by hand): this test fails when they drift apart. Links are written relative to the repository root in both."""
import json, re
from pathlib import Path
from robust_attr.evaluate import format_interval

ROOT = Path(__file__).resolve().parents[1]

def render(nb):
    "README text of a notebook: markdown cells as they are, visible code cells as python blocks without `#|` lines."
    parts = []
    for c in nb['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'markdown': parts.append(src.strip())
        elif c['cell_type'] == 'code' and not re.search(r'^#\|\s*hide\b', src, re.M):
            code = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip()
            parts.append(f'```python\n{code}\n```')
    return '\n\n'.join(parts) + '\n'

def test_readme_is_index_rendered():
    nb = json.loads((ROOT/'nbs'/'index.ipynb').read_text())
    assert (ROOT/'README.md').read_text() == render(nb)

def test_readme_keeps_the_ci_test_command():
    lines = (ROOT/'README.md').read_text().splitlines()
    assert 'pip install -e ".[dev]" && OMP_NUM_THREADS=1 nbdev_test && pytest tests' in lines
    assert 'pip install -e . && robust_attr demo' in lines

def test_readme_local_links_exist():
    "Every relative link of the README points at a file in the repository."
    links = re.findall(r'\]\(([^)#]+)\)', (ROOT/'README.md').read_text())
    missing = [l for l in links if '://' not in l and not (ROOT/l).exists()]
    assert links and not missing, missing

RESULTS = ROOT/'bench'/'results'/'far_table_fashion_mnist.json'

def results_rows(out:dict) -> list[str]:
    "The README's results table rows for the committed `far_table.py --budget quick` run `out`."
    def cell(r, m, pct=False): return format_interval(r[m], r[m+'_ci'], pct=pct)
    def paper(k):
        v = out['paper'].get(k, {}).get('FAR')
        return '—' if v is None else f'{v[0]:.1f} / {v[1]:.1f} / {v[2]:.2f} / {v[3]:.2f}'
    return [f"| {out['names'][k]} | {cell(r, 'NA', True)} | {cell(r, 'AA', True)} | {cell(r, 'IN')} | {cell(r, 'CO')} | {paper(k)} |"
            for k, r in out['results'].items()]

def test_readme_results_table_is_the_committed_run():
    "The numbers in the README's results table are those of the committed quick-budget JSON, not typed by hand."
    assert RESULTS.exists(), f'{RESULTS.relative_to(ROOT)} is linked from the README but not committed'
    out = json.loads(RESULTS.read_text())
    assert out['budget']['name'] == 'quick'
    lines = set((ROOT/'README.md').read_text().splitlines())
    missing = [r for r in results_rows(out) if r not in lines]
    assert not missing, missing
