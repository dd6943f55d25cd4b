"""The command line as a user meets it: `--lam` and `--eps` for every method, checkpoints that know what they
were trained for, `evaluate` following them (and warning when told otherwise), and one-line user errors.

Tiny runs: 32 digits, two batches, one epoch, one- or two-step attacks on 2-point IG maps."""
import json, shutil, subprocess
import pytest
from robust_attr.cli import main
from robust_attr.models import load_model, checkpoint_threat
from robust_attr.evaluate import threat_model_for
from robust_attr.train import METHODS

TINY = ['--data', 'digits', '--n-train', '32', '--n-valid', '16', '--bs', '16', '--epochs', '1', '--no-progress']
CHEAP = {'adv': [], 'trades': [], 'art': [], 'ig_norm': ['attack_m=2', 'grad_m=2'], 'ig_sum_norm': ['attack_m=2', 'grad_m=2'],
         'aat': ['ig_steps=2'], 'adv_aat': ['ig_steps=2']}  # + steps=1 for every method
QUICK_EVAL = ['--n', '2', '--no-progress', '--set', 'ifia_steps=1', '--set', 'ig_steps=2', '--set', 'attack_ig_steps=2',
              '--set', 'pgd_steps=1', '--set', 'aa_n=8', '--split', 'valid']

def train(tmp_path, method, *options):
    "Train a tiny digits model through `main`; return the loaded checkpoint."
    out = tmp_path/f'{method}.pth'
    cheap = [a for s in ['steps=1', *CHEAP.get(method, [])] for a in ('--set', s)] if method != 'natural' else []
    assert main(['train', *TINY, '--method', method, *options, *cheap, '--out', str(out)]) == 0
    return load_model(out)

def test_every_method_but_natural_is_covered():
    assert set(CHEAP) == set(METHODS) - {'natural'}

@pytest.mark.parametrize('method', sorted(CHEAP))
def test_lam_and_eps_reach_every_method_and_its_checkpoint(tmp_path, method, capsys):
    lam = 0. if method == 'adv' else 0.25  # Madry's objective has no extra term: its λ can only be 0
    m = train(tmp_path, method, '--lam', str(lam), '--eps', '0.05')
    assert (m.meta['data'], m.meta['method']) == ('digits', method)
    assert (m.meta['settings']['lam'], m.meta['settings']['eps'], m.meta['settings']['steps']) == (lam, 0.05, 1)
    assert checkpoint_threat(m).eps == 0.05
    assert f"saved {tmp_path/method}.pth" in capsys.readouterr().out

def test_a_natural_checkpoint_records_its_data_sets_threat_model(tmp_path):
    m = train(tmp_path, 'natural')
    assert (m.meta['data'], m.meta['method'], m.meta['settings']) == ('digits', 'natural', {})
    assert checkpoint_threat(m) == threat_model_for('digits')

def test_a_method_trains_at_the_data_sets_radius_unless_told(tmp_path):
    m = train(tmp_path, 'trades', '--lam', '1')
    assert checkpoint_threat(m) == threat_model_for('digits')
    assert m.meta['settings']['lam'] == 1.0

@pytest.fixture(scope='module')
def digits_aat(tmp_path_factory):
    "The path of a tiny AAT checkpoint trained at ε = 0.05, half the digits' radius."
    d = tmp_path_factory.mktemp('aat')
    train(d, 'aat', '--eps', '0.05')
    return d/'aat.pth'

def evaluate(model, *options, tmp_path):
    out = tmp_path/'r.json'
    assert main(['evaluate', '--model', str(model), *QUICK_EVAL, *options, '--out', str(out)]) == 0
    return json.loads(out.read_text())

def test_evaluate_defaults_to_the_checkpoints_data_set_and_radius(digits_aat, tmp_path, capsys):
    r = evaluate(digits_aat, tmp_path=tmp_path)
    assert (r['data'], r['protocol']['eps']) == ('digits', 0.05)   # the protocol's own ε would be 0.1
    assert 'warning' not in capsys.readouterr().err

def warnings_about(err, *words):
    "The stderr lines that warn about all of `words`."
    return [l for l in err.splitlines() if l.startswith('robust_attr evaluate: warning: ') and all(w in l for w in words)]

def test_evaluating_a_digits_checkpoint_on_another_data_set_warns_once_in_one_line(digits_aat, tmp_path, capsys):
    r = evaluate(digits_aat, '--data', 'synthetic', tmp_path=tmp_path)
    assert r['data'] == 'synthetic' and r['protocol']['eps'] == threat_model_for('synthetic').eps
    err = capsys.readouterr().err
    assert len(warnings_about(err, 'trained on', 'digits', 'synthetic')) == 1, err
    assert len([l for l in err.splitlines() if 'digits' in l]) == 1, err

def test_evaluating_at_another_radius_warns(digits_aat, tmp_path, capsys):
    r = evaluate(digits_aat, '--eps', '0.1', tmp_path=tmp_path)
    assert r['protocol']['eps'] == 0.1
    assert len(warnings_about(capsys.readouterr().err, 'ε = 0.05', 'ε = 0.1')) == 1

# ---------- user errors: one line on stderr, exit status 2, no traceback ----------

def user_error(argv, capsys):
    with pytest.raises(SystemExit) as e: main(argv)
    assert e.value.code == 2
    out = capsys.readouterr()
    assert out.err.count('\n') == 1 and 'Traceback' not in out.err, out.err
    return out.err

@pytest.mark.parametrize('argv, message', [
    (['train', '--data', 'imagenet'], "robust_attr train: error: argument --data: invalid choice: 'imagenet' (choose from 'digits'"),
    (['train', '--method', 'madry'], "robust_attr train: error: argument --method: invalid choice: 'madry' (choose from 'natural'"),
    (['train', '--arch', 'resnet50'], "robust_attr train: error: argument --arch: invalid choice: 'resnet50'"),
    (['train', '--epochs', 'two'], "robust_attr train: error: argument --epochs: invalid int value: 'two'"),
    (['train', '--n-train', '16', '--lam', '1'], "robust_attr train: error: natural training takes no method"),
    (['train', '--n-train', '16', '--eps', '0.1'], "robust_attr train: error: natural training takes no method"),
    (['train', '--n-train', '16', '--method', 'aat', '--set', 'lam=1'], "robust_attr train: error: lam has an option of its own"),
    (['train', '--n-train', '16', '--method', 'aat', '--lam', '-1'], "robust_attr train: error: `lam` must be"),
    (['train', '--n-train', '16', '--method', 'aat', '--set', 'radius=1'], "robust_attr train: error: "),  # + 'radius'
    (['train', '--n-train', '16', '--init', 'missing.pth'], "robust_attr train: error: no model checkpoint at missing.pth"),
    (['evaluate', '--model', 'missing.pth'], "robust_attr evaluate: error: no model checkpoint at missing.pth"),
    (['evaluate'], "robust_attr evaluate: error: the following arguments are required: --model"),
    (['demo', '--seed', 'x'], "robust_attr demo: error: argument --seed: invalid int value: 'x'")])
def test_a_user_error_is_one_line_and_exit_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = user_error(argv, capsys)
    assert err.startswith(message) and (argv[-1] != 'radius=1' or "'radius'" in err), err

def test_an_unknown_evaluation_setting_is_a_user_error(digits_aat, capsys):
    err = user_error(['evaluate', '--model', str(digits_aat), '--set', 'ifia_stepz=3'], capsys)
    assert err.startswith("robust_attr evaluate: error: unknown settings ['ifia_stepz']")

def test_an_error_after_the_work_started_keeps_its_traceback(tmp_path, monkeypatch):
    import robust_attr.cli as cli
    def broken(learn): raise ValueError('a bug in the training loop')
    monkeypatch.setattr(cli, '_distrib_ctx', broken)
    with pytest.raises(ValueError, match='a bug in the training loop'):
        main(['train', *TINY, '--out', str(tmp_path/'m.pth')])

def test_the_console_script_reports_a_user_error_in_one_line():
    if shutil.which('robust_attr') is None: pytest.skip('the robust_attr console script is not on PATH')
    r = subprocess.run(['robust_attr', 'train', '--data', 'imagenet'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ''
    assert r.stderr.startswith("robust_attr train: error: argument --data: invalid choice: 'imagenet'") and r.stderr.count('\n') == 1
