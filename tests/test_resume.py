"""Interrupted training goes on bit for bit (issue 28): `robust_attr train` stopped by SIGTERM (gracefully: the batch
finishes, the state is saved, exit 143) or killed by SIGKILL at random moments, then resumed with `--resume`, ends with
the weights of a run never interrupted; under `torchrun` with two gloo processes too.

The SIGKILL trials use the harness of `bench/fault_soak.py` (which runs more of them). Every process runs in its own
session with a timeout and is killed with its group if it outlives it, so no worker survives a failing test. The
in-process tests of the callback itself (natural training with dropout, Madry's training with random starts from
torch's and from the attack's generator, a one-cycle schedule, stops in an epoch and at its end) are in
nbs/08_train.ipynb.
"""
import json, os, shutil, signal, sys
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'bench'))
import fault_soak as FS

TIMEOUT = 300  # seconds for one process (the machine may be busy)
ARGS = ['train', '--data', 'digits', '--method', 'adv', '--set', 'steps=2', '--n-train', '96', '--n-valid', '16',
        '--bs', '16', '--epochs', '2', '--seed', '0', '--no-progress']  # 6 batches an epoch; PGD's random starts from torch's generator
JOB = FS.Job('train-adv', ARGS + ['--save-every', '2'], 'model.pth', 'model.state.pth', FS.same_weights)

@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    "The uninterrupted run's model and its working time."
    d = tmp_path_factory.mktemp('reference')
    rc, work, out, err = FS.run_once(JOB.command(d), d, TIMEOUT, JOB.done)
    assert rc == 0, err
    assert out.startswith("training adv on digits for 2 epochs (state: ") and 'saved' in out, out
    return d/JOB.out, work

def test_sigterm_finishes_the_batch_saves_the_state_and_resume_ends_with_the_same_weights(tmp_path, reference):
    from robust_attr.train import read_training_state
    from robust_attr.models import load_model
    with FS.Attempt(JOB.command(tmp_path), tmp_path) as a:
        assert a.started.wait(TIMEOUT)
        a.kill(signal.SIGTERM)  # during the first epoch: its work has just started
        rc = a.wait(TIMEOUT)
    err = ''.join(a.err)
    assert rc == 128 + signal.SIGTERM, err
    assert err.startswith("robust_attr train: stopped by SIGTERM; to resume: run the same command with --resume") and err.count('\n') == 1, err
    state = read_training_state(tmp_path/'model.state.pth')
    assert (state['epoch'], state['batch']) < (2, 0), "the run was not stopped before its end"
    assert not (tmp_path/'model.pth').exists()
    rc, _, out, err = FS.run_once(JOB.command(tmp_path, resume=True), tmp_path, TIMEOUT)
    assert rc == 0, err
    assert out.startswith(f"resuming from {tmp_path/'model.state.pth'}: "), out
    equal, detail = FS.same_weights(reference[0], tmp_path/'model.pth')
    assert equal, detail
    final = load_model(reference[0]).state_dict()  # the subject is not trivial: the stopped run's weights are not the final ones
    assert not all(torch.equal(state['model'][k], final[k]) for k in final)

def test_sigkill_at_random_moments_then_resume_ends_with_the_same_weights(tmp_path, reference):
    import random
    rec = FS.trial(JOB, tmp_path, *reference, random.Random(0), TIMEOUT, window=0.6, max_kills=2)  # kills in the first 60% of the work
    assert not rec['failures'], rec['failures']
    assert rec['kills_after_state'] >= 1, rec  # at least one attempt was killed after it had saved a state, and resumed from it
    assert rec['equal'], rec['detail']

def test_a_resume_with_other_settings_is_refused_in_one_line(tmp_path, reference):
    (tmp_path/'model.state.pth').write_bytes((reference[0].parent/'model.state.pth').read_bytes())
    cmd = JOB.command(tmp_path, resume=True)
    cmd[cmd.index('--n-train') + 1] = '80'
    rc, _, out, err = _run(cmd + ['--lr', '0.01'], tmp_path)
    assert rc == 2 and err.count('\n') == 1, err
    assert err.startswith(f"robust_attr train: error: cannot resume from {tmp_path/'model.state.pth'}: it was saved by a run with "
                          "n_train=96, lr=0.001, this run has n_train=80, lr=0.01 (only the number of epochs may change)"), err

def _run(cmd, cwd):
    "(exit status, None, stdout, stderr) of a command that may print nothing."
    with FS.Attempt(cmd, cwd) as a:
        rc = a.wait(TIMEOUT)
    return rc, None, ''.join(a.out), ''.join(a.err)

# %% two processes: `robust_attr train` run by a torchrun worker (the CLI's own code path, launched), one launch for all

WORLD = 2
DIST_ARGS = ['train', '--data', 'digits', '--method', 'adv', '--set', 'steps=2', '--n-train', '30', '--n-valid', '10',
             '--bs', '5', '--epochs', '2', '--seed', '0', '--no-progress']  # global batches of 10: 3 an epoch

def _worker(out:Path):
    "Under torchrun: train uninterrupted; train with a SIGTERM to rank 1 only during batch 5; resume; record each exit status."
    import robust_attr.cli as cli, robust_attr.train as T
    from fastai.callback.core import Callback
    from fastai.torch_core import rank_distrib
    from robust_attr.distributed import teardown_process_group
    cli._leave_process_group = lambda: None  # one process group for the three commands; left at the end
    make = T.robust_learner
    class SignalRank1(Callback):
        def after_batch(self):
            if self.training and rank_distrib()==1 and self.train_iter==5: os.kill(os.getpid(), signal.SIGTERM)
    rcs = {'reference': cli.main(DIST_ARGS + ['--out', str(out/'reference.pth')])}
    T.robust_learner = lambda *a, **k: make(*a, **k).add_cb(SignalRank1())
    try: rcs['stopped'] = cli.main(DIST_ARGS + ['--out', str(out/'model.pth')])
    finally: T.robust_learner = make
    rcs['state'] = sorted(p.name for p in out.iterdir())
    if rank_distrib()==0: shutil.copy(out/'model.state.pth', out/'stopped.state.pth')
    rcs['resumed'] = cli.main(DIST_ARGS + ['--out', str(out/'model.pth'), '--resume'])
    (out/f'rank{rank_distrib()}.json').write_text(json.dumps(rcs))
    teardown_process_group()

if __name__ == '__main__' and sys.argv[1:2] == ['--worker']:
    _worker(Path(sys.argv[2]))
    sys.exit(0)

def test_torchrun_two_processes_stop_together_and_resume_with_the_same_weights(tmp_path):
    pytest.importorskip('accelerate', reason='robust_attr.distributed needs accelerate')
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()): pytest.skip('no gloo backend')
    from robust_attr.train import read_training_state
    from robust_attr.models import load_model
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={WORLD}', __file__, '--worker', str(tmp_path)]
    rc, _, out, err = _run(cmd, tmp_path)
    assert rc == 0, (out + err)[-3000:]
    ranks = [json.loads((tmp_path/f'rank{r}.json').read_text()) for r in range(WORLD)]
    for r in ranks:  # rank 0 got no signal, yet stopped at the same batch as rank 1
        assert (r['reference'], r['stopped'], r['resumed']) == (0, 128 + signal.SIGTERM, 0), r
    assert ranks[0]['state'] == ['model.state.pth', 'reference.pth', 'reference.state.pth'], ranks[0]['state']  # one state, no model yet
    s = read_training_state(tmp_path/'stopped.state.pth')
    assert (s['epoch'], s['batch']) == (1, 2), "the stop was not after batch 5 (epoch 1, batch 2)"
    assert s['world_size'] == WORLD and len(s['ranks']) == WORLD and s['meta']['processes'] == WORLD
    equal, detail = FS.same_weights(tmp_path/'reference.pth', tmp_path/'model.pth')
    assert equal, detail
    final = load_model(tmp_path/'reference.pth').state_dict()  # not trivial: the resumed run still had weights to change
    assert not all(torch.equal(s['model'][k], final[k]) for k in final)
    assert 'stopped by SIGTERM; to resume' in err
