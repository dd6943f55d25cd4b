"""The tutorials are committed with their outputs, so a reader on the repository's page sees their figures and tables.
This test executes each one (as `nbdev_test` would: `nbs/tutorials/.notest` keeps `nbdev_test` from running them a
second time) and checks that the committed outputs are what the committed code produces, forgiving timings, progress
bars and small float differences (`tools/tutorials.py`). After changing a tutorial, or the library under it:
`python tools/tutorials.py write nbs/tutorials/NAME.ipynb`."""
import os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT/'tools'/'tutorials.py'


def test_tutorials_are_skipped_by_nbdev_test_and_all_have_outputs():
    assert (ROOT/'nbs'/'tutorials'/'.notest').exists()
    sys.path.insert(0, str(TOOL.parent))
    try: import tutorials
    finally: sys.path.remove(str(TOOL.parent))
    nbs = tutorials.tutorials()
    assert len(nbs) >= 7
    import json
    bare = [n.name for n in nbs if not any(c.get('outputs') for c in json.loads(n.read_text())['cells'] if c['cell_type'] == 'code')]
    assert not bare, f"tutorials without outputs: {bare}; run python tools/tutorials.py write on each"


def test_committed_outputs_are_those_of_the_committed_code():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
               OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    r = subprocess.run([sys.executable, str(TOOL), 'check', '--jobs', str(min(2, os.cpu_count() or 1))],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=1500)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]


def _tool():
    sys.path.insert(0, str(TOOL.parent))
    try:
        import tutorials
        return tutorials
    finally: sys.path.remove(str(TOOL.parent))


def _png(value):
    "A 20×10 PNG, grey `value` with a white square, base64 as in a notebook."
    import base64, io
    from PIL import Image
    im = Image.new('RGB', (20, 10), (value,)*3); im.paste((255, 255, 255), (2, 2, 6, 6))
    buf = io.BytesIO(); im.save(buf, 'png')
    return base64.b64encode(buf.getvalue()).decode()


def _cell(*outputs): return dict(cell_type='code', source='x', outputs=list(outputs))
def _stream(text): return dict(output_type='stream', name='stdout', text=text)
def _fig(v): return dict(output_type='display_data', data={'image/png': _png(v), 'text/plain': '<Figure size 20x10 with 1 Axes>'})


def test_the_check_forgives_timings_and_rounding_but_not_changes():
    t = _tool()
    table = 'epoch  train_loss  time\n0      0.512345    00:11\nIN 0.492 after 2.5 s\n'
    assert t.compare_cell(_cell(_stream(table)), _cell(_stream(table.replace('00:11', '00:14').replace('2.5 s', '3.1 s')))) == []
    assert t.compare_cell(_cell(_stream(table)), _cell(_stream(table.replace('0.512345', '0.512346')))) == []
    assert t.compare_cell(_cell(_stream(table)), _cell(_stream(table.replace('0.492', '0.55'))))  # a result moved
    assert t.compare_cell(_cell(_stream(table)), _cell(_stream(table.replace('IN', 'CO'))))       # other words
    assert t.compare_cell(_cell(_stream(table)), _cell())                                          # an output missing
    assert t.compare_cell(_cell(_fig(100)), _cell(_fig(101))) == []
    assert t.compare_cell(_cell(_fig(100)), _cell(_fig(160)))                                      # another picture
    w = '/a/robust_attr/evaluate.py:266: UserWarning: IFIA never moved 1 of 8\n'
    assert t.compare_cell(_cell(_stream(w)), _cell(_stream(w.replace('/a/', '/ci/clone/').replace('266', '270')))) == []
    assert t._last_of_lines('a\rprogress 50%\rdone\nnext') == 'done\nnext'
