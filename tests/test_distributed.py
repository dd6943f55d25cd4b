"""Two gloo processes train exactly like one process on the same global batches; the CLI under `torchrun` and `accelerate launch`.

The multi-process runs start this file as a `torchrun` worker (`python -m torch.distributed.run ... test_distributed.py
--worker OUT`), once for all scenarios; the single-process references run in the pytest process. Every launch has a
timeout (the subprocess's, and gloo's on every collective), so a dead process fails the test instead of hanging it.

Why float64: the attacks step along sign(gradient). In float32, the all-reduce sums the gradients in another order
than one process's batch mean, the parameters then differ in the last bits, and sooner or later one pixel's gradient
component near zero flips sign in a later attack — after which the runs differ by a whole attack step (observed: one
pixel of one sample in the third AdvAAT step, parameters 1e-3 apart under Adam). That is float chaos, not a
distribution bug, so the callback tests run in float64 (differences 1e-17) and compare at 1e-9, while a missing or
wrong gradient all-reduce moves parameters by 1e-2. Random starts are drawn through `sharded_random_starts` (the trainer
overrides `Attack.random_points` of the learner's attacks, so each process keeps its slice of the global batch's noise),
so the presets keep their random starts; AAT's IFIA gets one, because at the clean input its Pearson objective is flat
and its first step would follow the sign of rounding noise.
"""
import os, shutil, signal, subprocess, sys
from datetime import timedelta
from pathlib import Path
import pytest
import torch

WORLD, BS, N_TRAIN, N_VALID, SEED = 2, 5, 20, 12, 0 # 2 processes × 5 = global batches of 10: two SGD steps
TIMEOUT = 300 # seconds for one launch (the machine may be busy)
ROOT = Path(__file__).resolve().parents[1]
if __name__!='__main__':
    pytest.importorskip('accelerate', reason='robust_attr.distributed needs accelerate')
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip('this PyTorch has no gloo backend', allow_module_level=True)

def _scenarios():
    "name -> (method, method kwargs): every callback of `robust_attr.train`, with cheap settings."
    return {'adv_aat': ('adv_aat', dict(lam=0.5, steps=2, ig_steps=3)), # the three ...
            'adv': ('adv', dict(eps=0.1, step_size=0.04, steps=3)),
            'ig_norm': ('ig_norm', dict(lam=1.0, steps=2, attack_m=2, grad_m=4)),
            'aat': ('aat', dict(lam=1.0, steps=2, ig_steps=3)), # ... and the others
            'ig_sum_norm': ('ig_sum_norm', dict(lam=0.5, steps=2, attack_m=2, grad_m=4)),
            'trades': ('trades', dict(lam=6.0, steps=2)),
            'art': ('art', dict(lam=0.5, eps=0.1, step_size=0.04, steps=2)),
            'saliency_match': ('natural', dict()),
            'aat_chunked': ('aat', dict(lam=1.0, steps=2, ig_steps=3, internal_batch_size=3)), # the term per chunk of samples, its
            'trades_chunked': ('trades', dict(lam=6.0, steps=2, internal_batch_size=2))}       # gradients through DDP's one backward

def _float64(t): return t.double() if t.is_floating_point() else t

def _learner(name, bs, **overrides):
    "The learner of scenario `name` with per-process batch size `bs`, in float64, trained with SGD."
    from fastai.callback.core import Callback
    from fastai.optimizer import SGD
    from fastai.torch_core import set_seed
    from robust_attr.data import get_dls
    from robust_attr.models import SmallCNN
    from robust_attr.train import robust_learner, SaliencyMatchCallback
    class _FloatLoss(Callback): # fastai's smoothed-loss recorder keeps a float32 state
        order = 60
        def after_loss(self): self.learn.loss = self.learn.loss.float()
    method, kw = _scenarios()[name]
    set_seed(SEED)
    dls = get_dls('digits', bs=bs, n_train=N_TRAIN, n_valid=N_VALID, seed=SEED, after_batch=_float64)
    cbs = [_FloatLoss()]
    if name=='saliency_match': cbs.append(SaliencyMatchCallback(SmallCNN(10, 1, 28).double(), lam=1.0))
    learn = robust_learner(dls, method, opt_func=SGD, lr=0.5, cbs=cbs, **(kw | overrides))
    learn.model.double()
    if method=='aat': learn.cbs.filter(lambda cb: hasattr(cb, 'attack'))[0].attack.random_start = True
    return learn

def _fit(learn):
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    return {k: v.detach().clone() for k,v in learn.model.state_dict().items()}

# %% the worker: run by torchrun with 2 processes

def _local_gradients(state, bucket):
    "A DDP comm hook that skips the all-reduce (each process keeps its own gradient)."
    fut = torch.futures.Future(); fut.set_result(bucket.buffer()); return fut

def _summed_gradients(state, bucket):
    "A DDP comm hook that sums gradients instead of averaging them."
    import torch.distributed as dist
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

def _worker(out:Path):
    from accelerate.utils import InitProcessGroupKwargs
    from fastai.callback.core import Callback
    from fastai.torch_core import rank_distrib
    from robust_attr.distributed import RobustDistributedTrainer
    class _CommHook(Callback):
        order = RobustDistributedTrainer.order + 1 # right after DDP wrapping
        def __init__(self, hook): self.hook = hook
        def before_fit(self): self.learn.model.register_comm_hook(None, self.hook)
    runs = [(n, n, None) for n in _scenarios()] + [('no_allreduce', 'adv', _local_gradients),
                                                   ('summed_allreduce', 'adv', _summed_gradients)]
    timeout = [InitProcessGroupKwargs(timeout=timedelta(seconds=90))] # a dead peer fails every collective after this
    for run, name, hook in runs:
        learn = _learner(name, BS)
        if hook is not None: learn.add_cb(_CommHook(hook))
        with learn.robust_distrib_ctx(kwargs_handlers=timeout): params = _fit(learn)
        torch.save(params, out/f'{run}_rank{rank_distrib()}.pt')

if __name__=='__main__' and sys.argv[1:2]==['--worker']:
    _worker(Path(sys.argv[2]))
    sys.exit(0)

# %% helpers of the tests

def _launch(cmd, cwd, timeout=TIMEOUT):
    "Run `cmd` in its own process group; kill the group and fail on timeout or error."
    env = os.environ | dict(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep),
                            OMP_NUM_THREADS='1')
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try: log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, _ = p.communicate()
        pytest.fail(f"{' '.join(map(str, cmd[:6]))} ... timed out after {timeout} s:\n{log[-3000:]}")
    if p.returncode: pytest.fail(f"{' '.join(map(str, cmd[:6]))} ... failed ({p.returncode}):\n{log[-3000:]}")
    return log

def _torchrun(*args): return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={WORLD}', *args]

def _max_diff(a, b): return max((a[k].double() - b[k].double()).abs().max().item() for k in a)

# %% the tests

@pytest.fixture(scope='module')
def distributed_run(tmp_path_factory):
    "Directory with each run's final parameters on each rank, from one 2-process launch."
    out = tmp_path_factory.mktemp('distributed')
    _launch(_torchrun(__file__, '--worker', str(out)), cwd=out)
    return out

_references = {}
def _reference(name):
    "Parameters before and after single-process training on the same global batches (batch size WORLD·BS)."
    if name not in _references:
        learn = _learner(name, WORLD*BS)
        init = {k: v.detach().clone() for k,v in learn.model.state_dict().items()}
        _references[name] = init, _fit(learn)
    return _references[name]

def _params(out, run, rank): return torch.load(out/f'{run}_rank{rank}.pt')

@pytest.mark.parametrize('name', list(_scenarios()))
def test_two_gloo_processes_train_like_one_process_on_the_global_batch(distributed_run, name):
    init, single = _reference(name)
    r0, r1 = (_params(distributed_run, name, r) for r in range(WORLD))
    assert _max_diff(r0, r1) == 0, "DDP replicas drifted apart"
    assert _max_diff(single, init) > 1e-3, "the reference did not train: the comparison would be vacuous"
    assert _max_diff(r0, single) < 1e-9

def test_attribution_term_is_part_of_the_compared_gradients():
    "Without λ the AdvAAT reference ends elsewhere: the equality above covers the gradient of the double-backward term."
    _, single = _reference('adv_aat')
    assert _max_diff(_fit(_learner('adv_aat', WORLD*BS, lam=0.)), single) > 1e-4

@pytest.mark.parametrize('run', ['no_allreduce', 'summed_allreduce'])
def test_comparison_detects_missing_or_wrong_gradient_allreduce(distributed_run, run):
    _, single = _reference('adv')
    assert _max_diff(_params(distributed_run, run, 0), single) > 1e-4

# %% the command line: one global step of AdvAAT, so that float32 sign chaos cannot enter (see the module docstring)

CLI_ARGS = ['train', '--data', 'digits', '--method', 'adv_aat', '--n-train', str(WORLD*BS), '--n-valid', str(N_VALID),
            '--lam', '0.5', '--set', 'steps=2', '--set', 'ig_steps=3', '--seed', str(SEED)]

@pytest.fixture(scope='module')
def cli_single(tmp_path_factory):
    "The CLI's model trained by one process with the global batch size."
    from robust_attr.cli import main
    out = tmp_path_factory.mktemp('cli')/'single.pth'
    main(CLI_ARGS + ['--bs', str(WORLD*BS), '--out', str(out)])
    return out

def _launcher(name):
    "The README's launch command for the `robust_attr` console script (`torchrun` is `python -m torch.distributed.run`)."
    from robust_attr.distributed import free_port
    if shutil.which('robust_attr') is None: pytest.skip('the robust_attr console script is not on PATH')
    if name=='torchrun': return _torchrun('--no-python', 'robust_attr')
    if shutil.which('accelerate') is None: pytest.skip('accelerate is not on PATH')
    return ['accelerate', 'launch', '--multi_gpu', f'--num_processes={WORLD}', f'--main_process_port={free_port()}',
            '--num_machines=1', '--mixed_precision=no', '--dynamo_backend=no', '--no_python', 'robust_attr']

@pytest.mark.parametrize('launcher', ['torchrun', 'accelerate'])
def test_cli_train_under_a_launcher_equals_single_process(cli_single, tmp_path, launcher):
    from robust_attr.models import load_model
    out = tmp_path/'model.pth'
    _launch(_launcher(launcher) + CLI_ARGS + ['--bs', str(BS), '--out', str(out)], cwd=tmp_path)
    dist_model, single = load_model(out), load_model(cli_single)
    assert dist_model.meta['n_train'] == WORLD*BS
    assert _max_diff(dist_model.state_dict(), single.state_dict()) < 1e-5 # a missing all-reduce: ~lr = 1e-3
