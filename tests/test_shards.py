"""`robust_attr evaluate` split over processes, stopped and killed: the result equals one uninterrupted process's, image by image.

Every run is a real command (`python -m robust_attr.cli evaluate`, one thread per process) on a SmallCNN fitted to
the bundled digits for a few seconds, with the digits protocol shrunk so that the work takes seconds
(`bench/fault_soak_evaluate.py`'s `SETTINGS`: 8 IFIA and about 7 PGD batches of 2 digits). The reference is one
process run to its end; results are compared on every field but `seconds`. Each run has a timeout and runs in
its own session, so a hung run fails the test and leaves nothing behind.
"""
import json, os, random, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]/'bench'))
import fault_soak_evaluate as F

TIMEOUT = 300  # seconds for one run (the machine may be busy)
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip('this PyTorch has no gloo backend', allow_module_level=True)
linux_only = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='finds the workers through /proc')


@pytest.fixture(scope='module')
def model(tmp_path_factory): return F.fit_digits_model(tmp_path_factory.mktemp('model')/'digits.pth')

@pytest.fixture(scope='module')
def reference(model, tmp_path_factory):
    "The result of one uninterrupted process, checked not to be trivial."
    out = tmp_path_factory.mktemp('reference')/'r.json'
    F.run_to_end(F.command(model, out), TIMEOUT)
    r = json.loads(out.read_text())
    co = r['per_sample']['CO']
    assert r['n'] == 16 and r['never_moved'] < 16 and len(set(co)) > 8 and min(co) < 0.99, r   # the attack moved maps, differently per image
    assert 0 < r['AA'] < r['NA']                                                               # and PGD changed some predictions
    return F.without_seconds(r)

def _start(cmd):
    return subprocess.Popen(cmd, env=F.environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

def _finish(p, timeout=TIMEOUT):
    "`(exit status, stdout, stderr)` of `p`; on timeout its session is killed and the test fails."
    try: out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); out, err = p.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{err[-3000:]}")
    return p.returncode, out, err

def _when_saved(p, state:Path, batches:int=1):
    "Wait until `state` holds `batches` finished batches (the run is then in the middle of its work)."
    start = time.time()
    while F.saved_batches(state) < batches:
        assert p.poll() is None, f"the run ended before its state held {batches} batches: {p.communicate()[1][-2000:]}"
        assert time.time() - start < TIMEOUT, 'no batch saved in time'
        time.sleep(0.02)

def _result(out): return F.without_seconds(json.loads(Path(out).read_text()))


@pytest.mark.parametrize('launch', ['procs', 'torchrun'])
def test_two_processes_give_the_result_of_one_image_by_image(model, reference, tmp_path, launch):
    out = tmp_path/'r.json'
    if launch == 'procs': cmd = F.command(model, out, '--procs', '2')
    else:  # the documented line: `--` keeps torchrun from reading --n as an abbreviation of its own options
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'robust_attr.cli', '--', *F.command(model, out)[3:]]
    status, stdout, err = _finish(_start(cmd))
    assert status == 0, err[-3000:]
    assert stdout.count('evaluating') == 1 and stdout.count('protocol: digits') == 1, stdout   # rank 0 alone speaks
    assert _result(out) == reference


def test_sigterm_stops_after_the_batch_and_resume_completes(model, reference, tmp_path):
    out, state = tmp_path/'r.json', tmp_path/'r.state.jsonl'
    p = _start(F.command(model, out))
    _when_saved(p, state)
    p.send_signal(signal.SIGTERM)
    status, _, err = _finish(p)
    assert status == 128 + signal.SIGTERM, err[-2000:]
    assert 'robust_attr evaluate: stopped by SIGTERM' in err and '--resume' in err, err[-2000:]
    saved = F.saved_batches(state)
    assert saved >= 1 and not out.exists()
    status, _, err = _finish(_start(F.command(model, out, '--resume')))
    assert status == 0, err[-2000:]
    assert _result(out) == reference and not state.exists()


def test_resume_with_other_settings_is_refused_in_one_line(model, tmp_path):
    out, state = tmp_path/'r.json', tmp_path/'r.state.jsonl'
    p = _start(F.command(model, out))
    _when_saved(p, state)
    os.killpg(p.pid, signal.SIGKILL); p.communicate()
    status, _, err = _finish(_start(F.command(model, out, '--resume', '--set', 'seed=1')))
    assert status == 2 and err.count('\n') == 1, err
    assert err.startswith(f'robust_attr evaluate: error: cannot resume {state}: it was saved with other settings (seed 0 there, 1 here)'), err
    status, _, err = _finish(_start(F.command(model, out)))
    assert status == 2 and 'finished batches of an interrupted run: resume it' in err, err   # nor thrown away by a fresh run


@linux_only
@pytest.mark.parametrize('how', [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_launcher_stops_its_workers_and_resume_completes(model, reference, tmp_path, how):
    "SIGTERM: the launcher passes it on, the workers finish their batch. SIGKILL: the kernel tells them their parent died. Either way the state holds whole batches."
    out, state = tmp_path/'r.json', tmp_path/'r.state.jsonl'
    p = _start(F.command(model, out, '--procs', '2'))
    _when_saved(p, state)
    assert len(F.workers_of(p.pid)) == 2
    os.kill(p.pid, how)
    status, _, err = _finish(p)
    assert status == (128 + signal.SIGTERM if how == signal.SIGTERM else -signal.SIGKILL), err[-3000:]
    F.wait_gone(p.pid, timeout=TIMEOUT)   # no worker outlives its launcher
    assert F.saved_batches(state) >= 1 and not out.exists()
    status, _, err = _finish(_start(F.command(model, out, '--resume')))   # one process resumes what two began
    assert status == 0, err[-3000:]
    assert _result(out) == reference


def test_random_sigkills_then_resume_end_with_the_uninterrupted_result(model, reference, tmp_path):
    "The fault test, short: two kills at random moments (`bench/fault_soak_evaluate.py` is the long soak)."
    out = tmp_path/'r.json'
    r = F.killed_run(F.command(model, out), out, kills=2, window=20., rng=random.Random(0), batches=8)
    assert len(r['kills']) >= 1 and r['runs'] == len(r['kills']) + 1, r
    assert _result(out) == reference
