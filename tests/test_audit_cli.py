"""`robust_attr audit` on a small digits model. Issue 26: every ensemble member runs, at every surrogate β, and nothing
is skipped or warned about, whatever classes the sample holds. Issue 28: an audit split over two processes, or stopped
by SIGTERM and resumed, gives one process's numbers image by image. Tiny budgets: one IFIA step on 2-point IG maps."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from robust_attr.audit import ensemble_members, EnsembleAttack
from robust_attr.evaluate import get_protocol, protocol_attacks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'bench'))
from fault_soak_evaluate import saved_batches
CHEAP = ['--set', 'ifia_steps=1', '--set', 'ig_steps=2', '--set', 'attack_ig_steps=2']

def cli(*argv, cwd):
    "The command line in a fresh interpreter on this checkout (every warning shows, none deduplicated by an earlier test)."
    env = os.environ | dict(PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-c', 'import sys; from robust_attr.cli import main; sys.exit(main())', *argv],
                          cwd=cwd, env=env, text=True, capture_output=True, timeout=600)

@pytest.fixture(scope='module')
def digits_model(tmp_path_factory):
    "A natural digits model trained for one short epoch."
    d = tmp_path_factory.mktemp('audit')
    r = cli('train', '--data', 'digits', '--n-train', '512', '--bs', '64', '--epochs', '1', '--no-progress', '--out', 'm.pth', cwd=d)
    assert r.returncode == 0, r.stderr
    return d

def table_rows(out):
    "The first column of the printed ensemble table."
    return [l.split('|')[1].strip() for l in out.splitlines() if l.startswith('| ') and not l.startswith('| attack')]

@pytest.mark.parametrize('sample, bs', [('balanced', 100), ('first', 1)])   # bs=1: every batch holds one class
def test_audit_runs_every_member_with_no_warning(digits_model, sample, bs):
    r = cli('audit', '--model', 'm.pth', '--n', '20', '--bs', str(bs), '--out', f'{sample}.html', *CHEAP, '--set', f'sample={sample!r}',
            cwd=digits_model)
    assert r.returncode == 0, r.stderr
    assert 'warning' not in r.stderr.lower() and 'skipped' not in r.stderr, r.stderr
    members = list(ensemble_members(protocol_attacks(get_protocol('digits'))[1]))
    assert len(members) == 12 and {'targeted', 'targeted_beta100', 'ifia_beta10'} <= set(members)
    assert table_rows(r.stdout) == members + ['ensemble', 'noise'], r.stdout
    images = [l.split('|')[6].strip() for l in r.stdout.splitlines() if l.startswith('| ensemble')]
    assert images == ['20'], r.stdout
    assert (digits_model/f'{sample}.html').exists()


# Sharded and resumed audits (issue 28): the ensemble's batches, the model's and the reference's, split over two
# processes or stopped and resumed, give one uninterrupted process's numbers, image by image.
COMPARED = ('idx', 'per_image', 'per_member', 'noise', 'found_by', 'found_by_IN', 'classes')

def numbers(out):
    "What must not depend on how the work was split: the audit's per-image results, the reference's too (from the JSON beside the report)."
    r = json.loads(Path(out).with_suffix('.json').read_text())
    return {k: r[k] for k in COMPARED} | dict(reference={k: r['reference'][k] for k in ('positions', 'per_image', 'noise')})

def start(*argv, cwd):
    "The command, started in its own session (killed whole if the test fails)."
    env = os.environ | dict(PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, '-m', 'robust_attr.cli', *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

def finish(p, timeout=600):
    try: return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); p.communicate(); pytest.fail('timed out')

SPLIT = ['--n', '8', '--bs', '2', '--reference', 'r.pth', *CHEAP]

@pytest.fixture(scope='module')
def one_process(digits_model):
    "The audit of 8 digits against a second model in one process, checked not to be trivial."
    r = cli('train', '--data', 'digits', '--n-train', '512', '--bs', '64', '--epochs', '1', '--seed', '1', '--no-progress', '--out', 'r.pth',
            cwd=digits_model)
    assert r.returncode == 0, r.stderr
    r = cli('audit', '--model', 'm.pth', '--out', 'one.html', *SPLIT, cwd=digits_model)
    assert r.returncode == 0, r.stderr
    n = numbers(digits_model/'one.html')
    co = n['per_image']['CO']
    assert len(co) == 8 and len(set(co)) > 4 and min(co) < 0.99, co             # the ensemble moved maps, differently per image
    assert len(n['reference']['per_image']['CO']) > 4 and n['reference']['per_image']['CO'] != co
    assert len(n['classes']) >= 6                                                # the sample takes the classes in turn
    return n

@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason='this PyTorch has no gloo backend')
def test_audit_in_two_processes_equals_one(digits_model, one_process):
    out, err = finish(start('audit', '--model', 'm.pth', '--out', 'two.html', '--procs', '2', *SPLIT, cwd=digits_model))
    assert (digits_model/'two.html').exists(), err[-3000:]
    assert out.count('auditing') == 1, out                                      # rank 0 alone speaks
    assert numbers(digits_model/'two.html') == one_process

def test_audit_stopped_by_sigterm_resumes_to_the_same_numbers(digits_model, one_process):
    state = digits_model/'stopped.state.jsonl'
    p = start('audit', '--model', 'm.pth', '--out', 'stopped.html', *SPLIT, cwd=digits_model)
    t = time.time()
    while saved_batches(state) < 1:
        assert p.poll() is None and time.time() - t < 600, p.communicate()[1][-3000:]
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = finish(p)
    assert p.returncode == 128 + signal.SIGTERM and '--resume' in err, err[-3000:]
    assert not (digits_model/'stopped.html').exists() and 1 <= saved_batches(state) < 8   # stopped in the middle: 4 + 4 batches in all
    _, err = finish(start('audit', '--model', 'm.pth', '--out', 'stopped.html', '--resume', *SPLIT, cwd=digits_model))
    assert not state.exists(), err[-3000:]
    assert numbers(digits_model/'stopped.html') == one_process
