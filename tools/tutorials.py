"""Tutorials with their outputs: execute a notebook the way `nbdev_test` does, write its outputs into it, or check
that the committed outputs are what the committed code produces.

    python tools/tutorials.py write [NB ...]          execute and save the outputs (then `nbdev_clean`s the notebook)
    python tools/tutorials.py check [NB ...]          execute and compare with the committed outputs; exit 1 on a difference
    python tools/tutorials.py test  [NB ...] [--flags slow]   execute only, like `nbdev_test --path NB`

Without NB: every notebook in nbs/tutorials/. Cells are skipped exactly as `nbdev_test` skips them (`#| slow` and the
other `tst_flags` unless `--flags` names them, `#| eval: false`, `nbdev_export()` calls, `skip_exec` notebooks), in
execnb's `CaptureShell`, the shell `nbdev_test` uses, run from the notebook's folder with one torch thread.
`nbs/tutorials/.notest` keeps `nbdev_test` from running them a second time: `pytest tests/test_tutorials.py` runs
`check` on each.

What tells a stale tutorial from another machine's rounding. `write` records in the notebook's metadata (`RECORD_KEY`,
kept by nbdev_clean through settings.ini) a digest of each code cell and the platform that produced the outputs: Python,
the builds of torch, numpy and the other numeric packages (`platform_record`), the CPU kernels torch picked. `check` then
1. compares the code (no execution needed, the same on every machine): a code cell changed since its outputs were
   written, or cells added or removed, is stale whatever the numbers say;
2. executes the notebook and compares every output's structure on any machine: the same outputs in the same cells, of the
   same kinds, with the same text once timings, progress bars, addresses and ids are masked and numbers set aside, and
   figures of the same size;
3. compares the numbers and the figures' pixels, as tightly as the platform allows. On the platform that wrote them a
   rerun reproduces the outputs up to float summation order (`SAME`: numbers within 0.006 + 2 %, figures within 0.02 mean
   |Δpixel|). Elsewhere, training amplifies rounding differences (in one fresh environment a fine-tuning loss moved from
   1.631 to 1.584 and an IN from 0.624 to 0.657, issue 26), so numbers and pixels only have to stay within `OTHER`. A change in
   the library that moves results by less than that is caught by CI, whose platform is the one the tutorials are written
   on, not on another machine.
Figures are PNG at 72 dpi to keep the notebooks small."""
import argparse, ast, base64, hashlib, io, json, os, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD_KEY = 'robust_attr_outputs'  # the notebook metadata `write` fills: code digests and platform of the outputs
# numbers: |a-b| <= atol + rtol·|b|; figures: mean |Δpixel| / 255
SAME = dict(rtol=0.02, atol=0.006, img=0.02)   # a rerun on the platform that wrote the outputs
OTHER = dict(rtol=0.15, atol=0.05, img=0.06)   # another platform: training's drift from other rounding
DPI = 72
BUILD_PACKAGES = ('torch', 'torchvision', 'numpy', 'scipy', 'scikit-learn', 'pandas', 'matplotlib', 'pillow', 'fastai', 'fastcore')


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
    os.environ['OMP_NUM_THREADS'] = '1'   # also for the processes a tutorial starts
    sh._run(f"import matplotlib; matplotlib.rcParams['figure.dpi'] = {DPI}\nimport torch; torch.set_num_threads(1)\n" + _QUIET)
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
    "Execute the notebook and save it with its outputs and their record (`record`), cleaned as nbdev_clean cleans it."
    from execnb.nbio import write_nb
    nb = execute(path)
    for c in nb.cells:
        if c.cell_type == 'code' and 'outputs' not in c: c.outputs = []
    nb.metadata[RECORD_KEY] = record(nb.cells)
    write_nb(nb, path)
    _clean(path)


# --- what produced the outputs ------------------------------------------------------------------------------------------
def _source(cell): return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']


def code_digest(src):
    """8 hex digits that change when the code of a cell does, not when only its comments or blank lines do: the cell's
    `#|` directives (which decide whether it runs) and its syntax tree (the source itself if it is not plain Python)."""
    directives = [l.strip() for l in src.splitlines() if l.lstrip().startswith('#|')]
    try: code = ast.dump(ast.parse(src))
    except SyntaxError: code = src
    return hashlib.sha256(json.dumps([directives, code]).encode()).hexdigest()[:8]


def _build(dist):
    "A distribution's version and a digest of the files it installed (their hashes in its RECORD): another build, another digest."
    from importlib import metadata
    try: d = metadata.distribution(dist)
    except metadata.PackageNotFoundError: return None
    rec = d.read_text('RECORD') or ''
    files = sorted(l for l in rec.splitlines() if l.split(',')[1:2] != [''] and not l.startswith('..')
                   and '.dist-info/' not in l and '__pycache__' not in l)
    return f"{d.version} {hashlib.sha256(chr(10).join(files).encode()).hexdigest()[:8]}" if files else d.version


def platform_record():
    "What a tutorial's numbers depend on besides its code and the library: Python, the numeric packages' builds, torch's CPU kernels."
    import platform, torch
    return dict(python=platform.python_version(), machine=platform.machine(), cpu=torch.backends.cpu.get_cpu_capability(),
                **{p: _build(p) for p in BUILD_PACKAGES})


def library_digest():
    "A digest of the library's modules: when it differs from the record, the library changed since the outputs were written."
    files = sorted((ROOT/'robust_attr').glob('*.py'))
    return hashlib.sha256(b''.join(f.read_bytes() for f in files if f.name != '_modidx.py')).hexdigest()[:12]


def record(cells):
    "The record `write` keeps with the outputs: each code cell's digest, the platform, the library."
    return dict(code=[code_digest(_source(c)) for c in cells if c['cell_type'] == 'code'], platform=platform_record(),
                library=library_digest())


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


DRIFT = dict(number=0., figure=0.)  # the largest differences met: numbers as a share of OTHER's tolerance, figures in mean |Δpixel|

def _same_text(a, b, tol=SAME):
    "Equal up to volatile parts and numbers within `tol`; None if so, else a short description."
    a, b = _text(a), _text(b)
    if _NUM.sub('#', a) != _NUM.sub('#', b):
        import difflib
        d = difflib.unified_diff(b.splitlines(), a.splitlines(), 'committed', 'executed', lineterm='', n=1)
        return '\n'.join(list(d)[:20])
    for x, y in zip(_NUM.findall(a), _NUM.findall(b)):
        d = abs(float(x) - float(y))
        DRIFT['number'] = max(DRIFT['number'], d / (OTHER['atol'] + OTHER['rtol']*abs(float(y))))
        if d > tol['atol'] + tol['rtol']*abs(float(y)): return f"number {x} (executed) vs {y} (committed)"


def _same_png(a, b, tol=SAME):
    import numpy as np
    from PIL import Image
    ia, ib = (np.asarray(Image.open(io.BytesIO(base64.b64decode(''.join(v)))).convert('RGB'), dtype=float) for v in (a, b))
    if ia.shape != ib.shape: return f"figure size {ia.shape[1]}×{ia.shape[0]} (executed) vs {ib.shape[1]}×{ib.shape[0]} (committed)"
    d = np.abs(ia - ib).mean() / 255
    DRIFT['figure'] = max(DRIFT['figure'], d)
    if d > tol['img']: return f"figure differs by {d:.3f} mean |Δpixel| (tolerance {tol['img']})"


def _outputs(cell):
    return [o for o in cell.get('outputs', []) if not _is_progress(o)]


def compare_cell(new, old, tol=SAME):
    "Differences between the executed cell `new` and the committed cell `old`, numbers and pixels within `tol`, as strings."
    a, b = _outputs(new), _outputs(old)
    if [o['output_type'] for o in a] != [o['output_type'] for o in b]:
        return [f"outputs {[o['output_type'] for o in a]} (executed) vs {[o['output_type'] for o in b]} (committed)"]
    errs = []
    for x, y in zip(a, b):
        if x['output_type'] == 'stream':
            if x.get('name') != y.get('name'): errs.append(f"stream {x.get('name')} vs {y.get('name')}")
            elif (e := _same_text(x.get('text', ''), y.get('text', ''), tol)): errs.append(e)
            continue
        if x['output_type'] == 'error': errs.append(f"an error: {x.get('ename')}: {x.get('evalue')}"); continue
        dx, dy = x.get('data', {}), y.get('data', {})
        if set(dx) != set(dy): errs.append(f"formats {sorted(dx)} (executed) vs {sorted(dy)} (committed)"); continue
        for mime in dx:
            if mime == 'image/png': e = _same_png(dx[mime], dy[mime], tol)
            elif mime.startswith('image/'): e = None
            elif isinstance(dx[mime], (dict, list)) and mime.endswith('json'): e = _same_text(json.dumps(dx[mime], sort_keys=True), json.dumps(dy[mime], sort_keys=True), tol)
            else: e = _same_text(dx[mime], dy[mime], tol)
            if e: errs.append(f"{mime}: {e}")
    return errs


def stale_code(path):
    """What in the notebook's code changed since its outputs were written, read from its record (no execution): printable
    lines, empty if nothing did."""
    nb = json.loads(Path(path).read_text())
    rec = nb.get('metadata', {}).get(RECORD_KEY)
    run = f"run `python tools/tutorials.py write {path}`"
    if not rec: return [f"{path}: no record of the code and platform behind its outputs: {run}"]
    cells = [c for c in nb['cells'] if c['cell_type'] == 'code']
    now = [code_digest(_source(c)) for c in cells]
    if len(now) != len(rec['code']): return [f"{path}: {len(now)} code cells, {len(rec['code'])} when the outputs were written: {run}"]
    return [f"{path}, code cell {i} ({(_source(c).strip().splitlines() or [''])[0][:60]}): changed since its outputs were written: {run}"
            for i, (c, a, b) in enumerate(zip(cells, now, rec['code'])) if a != b]


def platform_changes(rec):
    "`{name: (recorded, here)}` for each platform entry that differs from the record's."
    here = platform_record()
    return {k: (rec.get(k), here.get(k)) for k in sorted(set(rec) | set(here)) if rec.get(k) != here.get(k)}


def check(path):
    """Differences between the committed outputs of the notebook and a fresh execution, as printable lines: stale code
    first (then nothing is executed), else every output compared on this platform's terms (module docstring)."""
    path = Path(path)
    if (stale := stale_code(path)): return stale
    old = json.loads(path.read_text())
    rec = old['metadata'][RECORD_KEY]
    changes = platform_changes(rec['platform'])
    tol = OTHER if changes else SAME
    new = execute(path)
    code_old = [c for c in old['cells'] if c['cell_type'] == 'code']
    code_new = [c for c in new.cells if c.cell_type == 'code']
    problems = []
    if not any(c.get('outputs') for c in code_old):
        problems.append(f"{path}: no outputs committed: run `python tools/tutorials.py write {path}`")
    for i, (n, o) in enumerate(zip(code_new, code_old)):
        for e in compare_cell(n, o, tol):
            src = _source(o).strip().splitlines()
            problems.append(f"{path}, code cell {i} ({src[0][:60] if src else ''}): {e}")
    if problems:
        if changes: problems.append(f"{path}: outputs written on another platform ({', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in changes.items())}): "
                                    f"numbers compared within {OTHER}")
        elif rec.get('library') != library_digest(): problems.append(f"{path}: the library changed since the outputs were written")
    return problems


def describe(path):
    "One line on how `check` compares the notebook here: on this platform's terms or another's."
    rec = json.loads(Path(path).read_text()).get('metadata', {}).get(RECORD_KEY)
    if not rec: return f"{path}: no record"
    changes = platform_changes(rec['platform'])
    return (f"{path}: written on another platform ({', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in changes.items())}); "
            f"numbers within {OTHER}" if changes else f"{path}: written on this platform; numbers within {SAME}")


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
            DRIFT.update(number=0., figure=0.)
            probs = check(nb)
            print('\n'.join(probs) if probs else f"{nb}: outputs are up to date ({describe(nb).split(': ', 1)[1]}; largest "
                  f"differences: numbers {DRIFT['number']:.0%} of another platform's tolerance, figures {DRIFT['figure']:.3f} mean |Δpixel|)")
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
