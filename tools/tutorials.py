"""Tutorials with their outputs: execute a notebook the way `nbdev_test` does, write its outputs into it, or check
that the committed outputs are what the committed code produces.

    python tools/tutorials.py write [NB ...]          execute and save the outputs (then `nbdev_clean`s the notebook)
    python tools/tutorials.py check [NB ...]          execute and compare with the committed outputs; exit 1 on a difference
    python tools/tutorials.py test  [NB ...] [--flags slow]   execute only, like `nbdev_test --path NB`

Without NB: every notebook in nbs/tutorials/. Cells are skipped exactly as `nbdev_test` skips them (`#| slow` and the
other `tst_flags` unless `--flags` names them, `#| eval: false`, `nbdev_export()` calls, `skip_exec` notebooks), in
execnb's `CaptureShell`, the shell `nbdev_test` uses, run from the notebook's folder. `nbs/tutorials/.notest` keeps
`nbdev_test` from running them a second time: `pytest tests/test_tutorials.py` runs `check` on each.

The comparison forgives what changes from run to run without the code changing: timings (`00:03`, `2.5 s`), progress
bars, object addresses and widget ids, and numbers within `RTOL`/`ATOL`; figures must have the same size and differ by at
most `IMG_TOL` in mean absolute pixel value. Figures are PNG at 72 dpi to keep the notebooks small."""
import argparse, base64, io, json, os, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL, IMG_TOL = 0.02, 0.006, 0.02  # numbers: |a-b| <= ATOL + RTOL·|b|; images: mean |Δpixel| / 255
DPI = 72


def tutorials(): return sorted((ROOT/'nbs'/'tutorials').glob('*.ipynb'))


def _skips(flags=()):
    "nbdev_test's rule for the cells it does not run, with `flags` forced on."
    from nbdev.config import get_config
    from nbdev.process import extract_directives
    skip = set(get_config(path=ROOT).tst_flags.split()) - set(flags)
    def no_eval(cell):
        if cell.cell_type != 'code': return True
        if 'nbdev_export' + '(' in cell.source: return True
        d = extract_directives(cell, remove=False)
        if d.get('eval:', [''])[0].lower() == 'false': return True
        return bool(skip & d.keys())
    return no_eval


def _skip_exec(path):
    "Whether the notebook's frontmatter says `skip_exec` (nbdev_test skips it)."
    from nbdev.process import NBProcessor
    from nbdev.frontmatter import FrontmatterProc
    from fastcore.basics import str2bool
    nb = NBProcessor(path, procs=FrontmatterProc, process=True).nb
    return str2bool(getattr(nb, 'frontmatter_', {}).get('skip_exec', False))


def execute(path, flags=()):
    "The notebook at `path` executed as nbdev_test executes it, outputs in its cells (an execnb notebook)."
    from execnb.nbio import read_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    path = Path(path).resolve()
    nb = read_nb(path)
    if _skip_exec(path): return nb
    os.environ['IN_TEST'] = '1'
    sh = CaptureShell(path, mpl_format='png')
    sh._run(f"import matplotlib; matplotlib.rcParams['figure.dpi'] = {DPI}\n" + _QUIET)
    with working_directory(path.parent):
        sh.run_all(nb, exc_stop=True, preproc=_skips(flags))
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs = [o for o in map(_tidy, c.get('outputs', [])) if o.get('output_type') != 'stream' or o['text']]
    return nb

# other packages' deprecation notices speak to their developers, and name paths of this machine
_QUIET = ("import warnings\nfor c in (DeprecationWarning, PendingDeprecationWarning, FutureWarning): "
          "warnings.filterwarnings('ignore', category=c, module='(?!robust_attr)')\n"
          # a warning as a reader needs it: no file path of this machine, no line number that moves with every edit
          "warnings.formatwarning = lambda message, category, *a, **k: f'{category.__name__}: {message}\\n'")

def _last_of_lines(text):
    "What a terminal shows of text with carriage returns: each line's part after its last `\\r` (progress bars)."
    return '\n'.join(l.rsplit('\r', 1)[-1] for l in text.split('\n'))

def _small_png(b64):
    "The PNG re-encoded with at most 256 colours: a third of the size, the same picture to the eye."
    from PIL import Image
    im = Image.open(io.BytesIO(base64.b64decode(b64))).convert('RGB').quantize(256, method=Image.Quantize.MEDIANCUT)
    buf = io.BytesIO(); im.save(buf, 'png', optimize=True)
    return base64.b64encode(buf.getvalue()).decode()

def _tidy(o):
    "An output as it is committed: progress bars collapsed to their last state, figures in 256 colours."
    if o.get('output_type') == 'stream': o['text'] = _last_of_lines(''.join(o['text']))
    if 'image/png' in o.get('data', {}): o['data']['image/png'] = _small_png(''.join(o['data']['image/png']))
    return o


def _clean(path):
    "nbdev_clean the notebook, as CI does."
    from nbdev.clean import nbdev_clean
    with __import__('fastcore.xtras', fromlist=['working_directory']).working_directory(ROOT): nbdev_clean(str(path))


def write(path):
    "Execute the notebook and save it with its outputs, cleaned as nbdev_clean cleans it."
    from execnb.nbio import write_nb
    nb = execute(path)
    for c in nb.cells:
        if c.cell_type == 'code' and 'outputs' not in c: c.outputs = []
    write_nb(nb, path)
    _clean(path)


# --- comparing outputs --------------------------------------------------------------------------------------------------
_NUM = re.compile(r'[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?')
_VOLATILE = [(re.compile(r'\b\d+:\d\d(?::\d\d)?\b'), '<time>'),              # fastai's time column, 00:03
             (re.compile(r'\b\d+(?:\.\d+)?\s?(?:s|ms|sec|secs|seconds|min)\b'), '<time>'),  # 2.5 s, 12 secs
             (re.compile(r'\S+\.py:\d+: '), '<where>: '),                        # a warning's file and line
             (re.compile(r'0x[0-9a-fA-F]+'), '<addr>'),
             (re.compile(r'"model_id": "[0-9a-f]+"|model_id=\S+'), '<model_id>'),
             (re.compile(r'\bid="[^"]*"|\bT_[0-9a-f_]+'), '<id>'),              # pandas Styler ids
             (re.compile(r'/tmp/[^\s\'")]+'), '<tmp>')]


def _is_progress(o):
    "A progress bar: fastprogress's HTML."
    return '<progress' in ''.join(o.get('data', {}).get('text/html', ''))


def _text(s):
    s = ''.join(s) if isinstance(s, list) else s
    for r, sub in _VOLATILE: s = r.sub(sub, s)
    return s


def _same_text(a, b):
    "Equal up to volatile parts and numbers within tolerance; None if so, else a short description."
    a, b = _text(a), _text(b)
    if _NUM.sub('#', a) != _NUM.sub('#', b):
        import difflib
        d = difflib.unified_diff(b.splitlines(), a.splitlines(), 'committed', 'executed', lineterm='', n=1)
        return '\n'.join(list(d)[:20])
    for x, y in zip(_NUM.findall(a), _NUM.findall(b)):
        if abs(float(x) - float(y)) > ATOL + RTOL*abs(float(y)): return f"number {x} (executed) vs {y} (committed)"


def _same_png(a, b):
    import numpy as np
    from PIL import Image
    ia, ib = (np.asarray(Image.open(io.BytesIO(base64.b64decode(''.join(v)))).convert('RGB'), dtype=float) for v in (a, b))
    if ia.shape != ib.shape: return f"figure size {ia.shape[1]}×{ia.shape[0]} (executed) vs {ib.shape[1]}×{ib.shape[0]} (committed)"
    d = np.abs(ia - ib).mean() / 255
    if d > IMG_TOL: return f"figure differs by {d:.3f} mean |Δpixel| (tolerance {IMG_TOL})"


def _outputs(cell):
    return [o for o in cell.get('outputs', []) if not _is_progress(o)]


def compare_cell(new, old):
    "Differences between the executed cell `new` and the committed cell `old`, as a list of strings."
    a, b = _outputs(new), _outputs(old)
    if [o['output_type'] for o in a] != [o['output_type'] for o in b]:
        return [f"outputs {[o['output_type'] for o in a]} (executed) vs {[o['output_type'] for o in b]} (committed)"]
    errs = []
    for x, y in zip(a, b):
        if x['output_type'] == 'stream':
            if x.get('name') != y.get('name'): errs.append(f"stream {x.get('name')} vs {y.get('name')}")
            elif (e := _same_text(x.get('text', ''), y.get('text', ''))): errs.append(e)
            continue
        if x['output_type'] == 'error': errs.append(f"an error: {x.get('ename')}: {x.get('evalue')}"); continue
        dx, dy = x.get('data', {}), y.get('data', {})
        if set(dx) != set(dy): errs.append(f"formats {sorted(dx)} (executed) vs {sorted(dy)} (committed)"); continue
        for mime in dx:
            if mime == 'image/png': e = _same_png(dx[mime], dy[mime])
            elif mime.startswith('image/'): e = None
            elif isinstance(dx[mime], (dict, list)) and mime.endswith('json'): e = _same_text(json.dumps(dx[mime], sort_keys=True), json.dumps(dy[mime], sort_keys=True))
            else: e = _same_text(dx[mime], dy[mime])
            if e: errs.append(f"{mime}: {e}")
    return errs


def check(path):
    "Differences between the committed outputs of the notebook and a fresh execution, as printable lines."
    path = Path(path)
    old = json.loads(path.read_text())
    new = execute(path)
    code_old = [c for c in old['cells'] if c['cell_type'] == 'code']
    code_new = [c for c in new.cells if c.cell_type == 'code']
    problems = []
    if not any(c.get('outputs') for c in code_old):
        problems.append(f"{path}: no outputs committed: run `python tools/tutorials.py write {path}`")
    for i, (n, o) in enumerate(zip(code_new, code_old)):
        for e in compare_cell(n, o):
            src = ''.join(o['source']).strip().splitlines()
            problems.append(f"{path}, code cell {i} ({src[0][:60] if src else ''}): {e}")
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('command', choices=['write', 'check', 'test'])
    p.add_argument('notebooks', nargs='*', help='notebooks (default: nbs/tutorials/*.ipynb)')
    p.add_argument('--flags', default='', help="test flags to run as well (test only), e.g. 'slow'")
    p.add_argument('--jobs', type=int, default=1, help='notebooks at a time, each in its own process')
    a = p.parse_args(argv)
    nbs = [Path(n) for n in a.notebooks] or tutorials()
    if a.flags and a.command != 'test': p.error('--flags is for `test`: the committed outputs are those of the default cells')
    if a.jobs > 1 and len(nbs) > 1: return _parallel(a, nbs)
    bad = 0
    for nb in nbs:
        if a.command == 'write': write(nb); print(f"wrote {nb} ({nb.stat().st_size/1024:.0f} KiB)")
        elif a.command == 'test': execute(nb, a.flags.split()); print(f"ran {nb}")
        else:
            probs = check(nb)
            print('\n'.join(probs) if probs else f"{nb}: outputs are up to date")
            bad += bool(probs)
    return 1 if bad else 0


def _parallel(a, nbs):
    "Each notebook in its own process, `a.jobs` at a time; the output of each printed whole."
    from concurrent.futures import ThreadPoolExecutor
    extra = ['--flags', a.flags] if a.flags else []
    def one(nb): return subprocess.run([sys.executable, __file__, a.command, str(nb), *extra], capture_output=True, text=True)
    with ThreadPoolExecutor(a.jobs) as ex: done = list(ex.map(one, nbs))
    for r in done: print(r.stdout + r.stderr, end='')
    return max(r.returncode for r in done)


if __name__ == '__main__': sys.exit(main())
