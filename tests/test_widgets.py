"""The saliency explorer in a real Jupyter kernel: a notebook builds it, and the test drives it with the messages a
browser sends when a button is clicked (widget comm messages), including Stop while an attack runs in the background."""
import json
from pathlib import Path
import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

ROOT = Path(__file__).resolve().parents[1]

SETUP = """
import json, time, torch, torch.nn as nn
from robust_attr.data import get_arrays
from robust_attr.models import SmallCNN
from robust_attr.widgets import SaliencyExplorer
x, y = get_arrays('digits', 'valid', n=8, seed=0)
torch.manual_seed(0); a = SmallCNN().eval()
torch.manual_seed(1); b = SmallCNN().eval()
broken = nn.Sequential(nn.Flatten(), nn.Linear(784, 1), nn.Flatten(0))
ex = SaliencyExplorer({'a': a, 'b': b, 'broken': broken}, x, y, steps=3, k=20, ig_steps=10, attack_ig_steps=3)
ex.model_select.value = ('a', 'b')
ex
"""

STATE = """
def state():
    "What the explorer shows, as JSON."
    print(json.dumps(dict(results=list(ex.results), figures={n: [a.get_title() for a in f.axes] for n,f in ex.figures.items()},
                          images=len(ex.images.children), status=ex.status.value, table=ex.table.value,
                          steps={n: o.steps.tolist() for n,o in ex.results.items()},
                          IN={n: o.IN.tolist() for n,o in ex.results.items()}, progress=ex.progress.value,
                          error=type(ex.error).__name__ if ex.error else None, run_disabled=ex.run_button.disabled)))
print(json.dumps(dict(run=ex.run_button.model_id, stop=ex.stop_button.model_id)))
"""

WAIT = """
t0 = time.time()
while ex.progress.value < {min_progress} and ex.thread.is_alive() and time.time() - t0 < 120: time.sleep(0.05)
"""

FINISH = """
ex.thread.join(120)
assert not ex.thread.is_alive()
state()
"""


def _code(src): return nbformat.v4.new_code_cell(src.strip())


class Kernel:
    "A notebook executed cell by cell in a real kernel, with button clicks sent as widget comm messages."
    def __init__(self, client): self.client, self.nb = client, client.nb

    def run(self, src):
        cell = _code(src)
        self.nb.cells.append(cell)
        self.client.execute_cell(cell, len(self.nb.cells) - 1)
        return cell

    def json(self, src):
        "Run `src` and parse the JSON line it prints last."
        out = ''.join(o.get('text', '') for o in self.run(src).outputs if o.output_type == 'stream')
        return json.loads(out.strip().splitlines()[-1])

    def click(self, model_id):
        "Send what a browser sends when a Button is clicked."
        kc = self.client.kc
        kc.shell_channel.send(kc.session.msg('comm_msg', dict(comm_id=model_id, data=dict(method='custom', content=dict(event='click')))))


@pytest.fixture(scope='module')
def kernel():
    nb = nbformat.v4.new_notebook()
    nb.metadata['kernelspec'] = dict(name='python3', display_name='python3', language='python')
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3', store_widget_state=True,
                                     resources=dict(metadata=dict(path=str(ROOT))))
    with client.setup_kernel():
        k = Kernel(client)
        k.setup = k.run(SETUP)
        k.ids = k.json(STATE)
        yield k


def test_explorer_displays_as_a_widget(kernel):
    views = [o for o in kernel.setup.outputs if 'application/vnd.jupyter.widget-view+json' in o.get('data', {})]
    assert len(views) == 1


def test_run_click_renders_one_figure_per_model(kernel):
    kernel.click(kernel.ids['run'])  # with background=True this starts a thread
    kernel.run(WAIT.format(min_progress=6))
    s = kernel.json(FINISH)
    assert s['results'] == ['a', 'b'] and s['images'] == 2 and s['error'] is None
    assert s['figures']['a'][0].startswith('a: clean, pred') and s['figures']['b'][0].startswith('b: clean, pred')
    assert s['figures']['a'][3] == f"IN {s['IN']['a'][0]:.2f}  CO" + s['figures']['a'][3].split('CO')[1]
    assert 'done in' in s['status'] and s['steps'] == {'a': [3], 'b': [3]} and s['progress'] == 6
    assert not s['run_disabled']


def test_stop_click_ends_a_running_attack(kernel):
    kernel.run("ex.steps.value = 200")
    kernel.click(kernel.ids['run'])
    kernel.run(WAIT.format(min_progress=2))  # the attack is under way
    kernel.click(kernel.ids['stop'])
    s = kernel.json(FINISH)
    assert 'stopped after' in s['status'] and s['results'] == ['a']
    assert 2 <= s['steps']['a'][0] < 200 and s['images'] == 1 and not s['run_disabled']


def test_failed_attack_shows_its_error_and_the_explorer_recovers(kernel):
    kernel.run("ex.steps.value = 2; ex.model_select.value = ('broken',)")
    kernel.click(kernel.ids['run'])
    s = kernel.json(FINISH)
    assert s['error'] == 'ValueError' and 'attack failed' in s['status'] and s['images'] == 0 and not s['run_disabled']
    kernel.run("ex.model_select.value = ('b',)")
    kernel.click(kernel.ids['run'])
    s = kernel.json(FINISH)
    assert s['error'] is None and s['results'] == ['b'] and s['images'] == 1


def test_synchronous_run_updates_reach_the_frontend(kernel):
    kernel.run("ex.background = False; ex.model_select.value = ('a',); ex.steps.value = 2; ex.run_button.click()")
    htmls = [st.get('value', '') for st in kernel.client.widget_state.values() if st.get('_model_name') == 'HTMLModel']
    assert any('done in' in h for h in htmls)
