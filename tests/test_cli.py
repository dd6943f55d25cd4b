"""The command line as a user meets it: `--lam` and `--eps` for every method, checkpoints that know what they
were trained for, `evaluate` following them (and warning when told otherwise), and one-line user errors.

Tiny runs: 32 digits, two batches, one epoch, one- or two-step attacks on 2-point IG maps."""
import inspect, json, os, shutil, subprocess, sys, time
from pathlib import Path
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

# ---------- issue 16: every bad value refused before the work, output a person can read ----------

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, '-c', 'import sys; from robust_attr.cli import main; sys.exit(main())']

def cli(*argv, cwd, **kw):
    "Run the command line in a fresh interpreter on this checkout, from `cwd`."
    env = os.environ | dict(PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    return subprocess.run([*CLI, *argv], cwd=cwd, env=env, text=True, **kw)

def test_train_with_a_negative_learning_rate_exits_2_at_once_and_writes_nothing(tmp_path):
    start = time.time()
    r = cli('train', '--data', 'digits', '--lr=-1', '--out', 'm.pth', cwd=tmp_path, capture_output=True, timeout=120)
    took = time.time() - start
    assert (r.returncode, r.stdout) == (2, '') and r.stderr.count('\n') == 1 and '--lr' in r.stderr, r.stderr
    assert r.stderr == "robust_attr train: error: --lr must be > 0, got -1.0\n"
    assert not (tmp_path/'m.pth').exists() and list(tmp_path.iterdir()) == []
    assert took < 2, f'{took:.1f} s'

@pytest.fixture
def no_work(monkeypatch, tmp_path):
    "Make loading data, models or training fail loudly: a check that comes after them is too late. Work in `tmp_path`."
    import robust_attr.data, robust_attr.models, robust_attr.train
    def work(*a, **k): raise AssertionError('the work started before the bad value was refused')
    for mod, name in [(robust_attr.data, 'get_dls'), (robust_attr.data, 'get_arrays'), (robust_attr.models, 'load_model'),
                      (robust_attr.train, 'robust_learner')]: monkeypatch.setattr(mod, name, work)
    monkeypatch.chdir(tmp_path)
    (tmp_path/'a_dir').mkdir(); (tmp_path/'a_file').write_text('x'); (tmp_path/'m.pth').write_text('x')

@pytest.mark.parametrize('argv, message', [
    (['train', '--lr', '0'], '--lr must be > 0, got 0.0'),
    (['train', '--lr=-0.001'], '--lr must be > 0, got -0.001'),
    (['train', '--epochs', '0'], '--epochs must be >= 1, got 0'),
    (['train', '--epochs', '-1'], '--epochs must be >= 1, got -1'),
    (['train', '--bs', '0'], '--bs must be >= 1, got 0'),
    (['train', '--n-train', '0'], '--n-train must be >= 1, got 0'),
    (['train', '--n-valid', '-3'], '--n-valid must be >= 1, got -3'),
    (['train', '--method', 'aat', '--eps', '0'], '--eps must be > 0, got 0.0'),
    (['train', '--out', 'a_dir'], '--out must name a file, but a_dir is a directory'),
    (['train', '--out', 'a_file/m.pth'], '--out: cannot create the directory a_file: a_file is a file'),
    (['train', '--init', 'a_dir'], '--init must name a model checkpoint, but a_dir is a directory'),
    (['evaluate', '--model', 'm.pth', '--out', 'a_dir'], '--out must name a file, but a_dir is a directory'),
    (['evaluate', '--model', 'm.pth', '--n', '0'], '--n must be >= 1, got 0'),
    (['evaluate', '--model', 'm.pth', '--bs', '0'], '--bs must be >= 1, got 0'),
    (['evaluate', '--model', 'm.pth', '--reference', 'missing.pth'], 'no model checkpoint at missing.pth'),
    (['demo', '--nat-epochs', '-1'], '--nat-epochs must be >= 1, got -1'),
    (['demo', '--aat-epochs', '0'], '--aat-epochs must be >= 1, got 0'),
    (['demo', '--n-eval', '0'], '--n-eval must be >= 1, got 0'),
    (['demo', '--out', 'a_file'], '--out must name a directory, but a_file is a file')])
def test_a_bad_value_is_refused_before_any_data_model_or_training(argv, message, no_work, capsys):
    assert user_error(argv, capsys) == f"robust_attr {argv[0]}: error: {message}\n"

def test_the_python_functions_refuse_the_same_values(no_work):
    from robust_attr.cli import train, evaluate_saved, demo
    with pytest.raises(ValueError, match='lr must be > 0'): train(lr=-1.)
    with pytest.raises(ValueError, match="data must be one of digits"): train(data='imagenet')
    with pytest.raises(ValueError, match='out must name a file'): evaluate_saved('m.pth', out='a_dir')
    with pytest.raises(TypeError, match='n_eval must be an integer'): demo(n_eval=2.5)

def test_evaluate_prints_a_legend_for_every_column_and_the_protocol_as_a_list(digits_aat, tmp_path, capsys):
    r = evaluate(digits_aat, tmp_path=tmp_path)
    progress, out = capsys.readouterr().out.split('\n', 1)
    assert progress.startswith(f'evaluating {digits_aat} on the valid split of digits')
    table, legend = out.split('\n\n')[:2]
    columns = table.splitlines()[0].split()
    assert {'NA', 'AA', 'IN', 'CO', 'never_moved', 'n', 'spearman', 'tried', 'skipped_misclassified', 'flat_starts', 'seconds'} <= set(columns)
    assert [l.split()[0] for l in legend.splitlines()] == columns
    k = r['protocol']['k']
    assert f"IN{' ' * 20}"[:len('skipped_misclassified')] + f" — top-{k} intersection: share of the clean map's {k} most important pixels" in legend
    assert all('higher' in l or 'lower' in l for l in legend.splitlines() if l.split()[0] in ('NA', 'AA', 'IN', 'CO', 'spearman', 'never_moved'))
    assert 'Protocol(' not in out and f"ε = {r['protocol']['eps']:g}" in out
    assert f"IFIA: {r['protocol']['ifia_steps']} steps × {r['protocol']['ifia_step_size']:g}" in out and f"IN's k = {k}" in out

def test_the_demo_written_to_a_file_has_plain_progress_lines_and_a_legend(tmp_path):
    log = tmp_path/'demo.log'
    with open(log, 'w') as f:
        r = cli('demo', '--out', str(tmp_path/'d'), '--nat-epochs', '1', '--aat-epochs', '1', '--n-eval', '2', '--n-train', '64',
                cwd=tmp_path, stdout=f, stderr=subprocess.PIPE, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = log.read_text()
    assert '\r' not in out and '█' not in out, out[:500]
    assert 'epoch 1/1: train_loss' in out and 'evaluating AAT' in out
    assert 'never_moved — ' in out and 'Protocol(' not in out and "IN's k = " in out
    assert (tmp_path/'d'/'demo_attacks.png').exists()

def test_the_demos_default_directory_is_ignored_by_git():
    from robust_attr.cli import demo
    if not (ROOT/'.git').exists() or shutil.which('git') is None: pytest.skip('not a git checkout')
    out = inspect.signature(demo).parameters['out'].default
    r = subprocess.run(['git', 'check-ignore', '-q', f'{out}/results.json'], cwd=ROOT)
    assert r.returncode == 0, f'{out}/ is not in .gitignore'
