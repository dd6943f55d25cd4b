"""`robust_attr audit` on a small digits model (issue 26): every ensemble member runs, at every surrogate β, and nothing
is skipped or warned about, whatever classes the sample holds. Tiny budgets: one IFIA step on 2-point IG maps."""
import os, subprocess, sys
from pathlib import Path
import pytest
from robust_attr.audit import ensemble_members, EnsembleAttack
from robust_attr.evaluate import get_protocol, protocol_attacks

ROOT = Path(__file__).resolve().parents[1]
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
