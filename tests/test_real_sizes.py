"""What users reach for when their model is big (issue 27, items 2–4), on tiny models and 8×8 or 32×32 images.

* Gradient checkpointing — `torch.utils.checkpoint` non-reentrant and reentrant, `checkpoint_sequential`, torchvision's
  DenseNet(`memory_efficient=True`), timm's `set_grad_checkpointing()` — gives the plain model's AAT and IG-NORM loss and
  parameter gradients and the plain model's IFIA iterates; with the library's recompute hook switched off the same
  steps fail or differ, so the tests can fail.
* A `torch.compile`d model runs `evaluate` and an AAT step, with the eager model's numbers.
* A ReLU written as `clamp(min=0)` beside a GELU is smoothed; GoogLeNet's train-mode outputs stop `robust_learner`
  before the first step, with the `ImageClassifier` hint.
"""
import contextlib
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed
from torch.utils.checkpoint import CheckpointError, checkpoint, checkpoint_sequential

import robust_attr.core as core
from robust_attr.attacks import IFIA
from robust_attr.evaluate import evaluate
from robust_attr.metrics import kendall_tau
from robust_attr.models import ImageClassifier
from robust_attr.train import AATCallback, IGNormCallback, robust_learner

N_CLASSES, EPS = 5, 0.05
FORMS = ('nonreentrant', 'reentrant', 'sequential')


class CheckpointedNet(nn.Module):
    "A stem, a Conv–BN–ReLU body run by `form` (None: plain), a head. The stem is outside the checkpoint, as in timm."
    def __init__(self, form=None):
        super().__init__()
        self.form = form
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.body = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6*8*8, N_CLASSES))

    def forward(self, x):
        h = self.stem(x)
        if self.form == 'sequential': h = checkpoint_sequential(self.body, 2, h, use_reentrant=False)
        elif self.form is not None: h = checkpoint(self.body, h, use_reentrant=self.form == 'reentrant')
        else: h = self.body(h)
        return self.head(h)


def with_running_stats(model):
    "`model` with BatchNorm running statistics away from (0, 1), so eval and train mode differ."
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def pair(form):
    "The plain model and its checkpointed twin, with the same weights."
    torch.manual_seed(0)
    plain = with_running_stats(CheckpointedNet())
    twin = CheckpointedNet(form)
    twin.load_state_dict(plain.state_dict())
    return plain, twin


def densenet_pair():
    "torchvision's DenseNet, plain and memory-efficient (its bottlenecks checkpointed), with the same weights."
    make = lambda eff: torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                                   num_classes=N_CLASSES, memory_efficient=eff)
    torch.manual_seed(0)
    plain = with_running_stats(make(False))
    twin = make(True)
    twin.load_state_dict(plain.state_dict())
    return plain, twin


def timm_pair(name, **kwargs):
    "A timm test model, plain and with `set_grad_checkpointing()`, with the same weights."
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    plain = with_running_stats(timm.create_model(name, num_classes=N_CLASSES, pretrained=False, **kwargs))
    twin = timm.create_model(name, num_classes=N_CLASSES, pretrained=False, **kwargs)
    twin.load_state_dict(plain.state_dict())
    twin.set_grad_checkpointing()
    return plain, twin


PAIRS = {**{f: (lambda f=f: pair(f)) for f in FORMS}, 'densenet_memory_efficient': densenet_pair,
         'timm_resnet': lambda: timm_pair('test_resnet'), 'timm_vit': lambda: timm_pair('test_vit', img_size=32)}
SIZES = {'densenet_memory_efficient': 16, 'timm_resnet': 32, 'timm_vit': 32}


class Grads(Callback):
    "The loss and every parameter's gradient at the optimizer step."
    order = 90
    def before_step(self):
        self.loss = float(self.learn.loss)
        self.grads = [p.grad.clone() for p in self.learn.model.parameters()]


def count_calls(model):
    "A list that grows at every forward of any of `model`'s norm layers (a checkpointed model runs some again in the backward)."
    calls = []
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)): m.register_forward_hook(lambda *_: calls.append(1))
    return calls


def train_step(model, cb, size=8):
    "One training step of `cb` on one batch of four images: the loss, the gradients, and the norm layers' forward calls."
    calls = count_calls(model)
    set_seed(0)
    x = torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(2))
    y = torch.arange(8) % N_CLASSES
    dls = DataLoaders.from_dsets(list(zip(x[:4], y[:4])), list(zip(x[4:], y[4:])), bs=4, device='cpu')
    rec = Grads()
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), lr=1e-3, cbs=[cb, rec])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, )
    return rec.loss, rec.grads, len(calls)


METHODS = {'aat': lambda: AATCallback(eps=EPS, steps=2, ig_steps=3, seed=0),
           'ig_norm': lambda: IGNormCallback(eps=EPS, steps=2, attack_m=3, grad_m=3, seed=0)}


def assert_same_step(a, b, rel=1e-5):
    "Equal losses and parameter gradients, up to float32 summation order; the gradients are not all zero."
    (loss_a, grads_a, _), (loss_b, grads_b, _) = a, b
    assert loss_a == pytest.approx(loss_b, rel=rel)
    assert any(g.abs().sum() > 0 for g in grads_b)
    for ga, gb in zip(grads_a, grads_b):
        assert (ga - gb).abs().max() <= rel * gb.abs().max().clamp_min(1e-12), (ga - gb).abs().max()


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('form', PAIRS)
def test_training_step_on_checkpointed_model_equals_plain(form, method):
    if form == 'timm_vit' and method == 'ig_norm': pytest.skip('one method is enough for the ViT (time)')
    plain, twin = PAIRS[form]()
    size = SIZES.get(form, 8)
    ref, got = train_step(plain, METHODS[method](), size), train_step(twin, METHODS[method](), size)
    assert got[2] > ref[2], 'the checkpointed model must recompute (run its regions again in the backward)'
    assert_same_step(got, ref)


@contextlib.contextmanager
def without_recompute_state():
    "torch's checkpoint left alone, as before the library followed recomputes."
    hook, core._hook_checkpoint = core._hook_checkpoint, lambda on: None
    try: yield
    finally: core._hook_checkpoint = hook


def test_without_the_recompute_hook_the_checkpointed_step_fails():
    "The subject is not trivial: torch recomputes the map's regions in train mode and refuses (or refuses autograd.grad)."
    for form, error in (('nonreentrant', CheckpointError), ('reentrant', RuntimeError)):
        _, twin = pair(form)
        with without_recompute_state(), pytest.raises(error, match='Recomputed values|use_reentrant=True'):
            train_step(twin, METHODS['aat']())


def ifia_iterates(model, smooth):
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(): y = model.eval()(x).argmax(1)
    ifia = IFIA(EPS, EPS/3, 3, k=30, ig_steps=6, attack_ig_steps=3, smooth=smooth, beta=3., objective='pcc', select='last', seed=0,
                random_start=True)
    return ifia(model, x, y), x, ifia, y


@pytest.mark.parametrize('smooth', ['softplus', 'second_order'])
@pytest.mark.parametrize('form', FORMS)
def test_ifia_steps_on_checkpointed_model_equal_plain(form, smooth):
    plain, twin = pair(form)
    (xa_plain, x, ifia, y), (xa_twin, *_) = ifia_iterates(plain, smooth), ifia_iterates(twin, smooth)
    assert (xa_plain - x).abs().max() > EPS/2                          # the attack moved
    assert (kendall_tau(ifia.measure_map(plain, xa_plain, y), ifia.measure_map(plain, x, y)) < 1).any()   # the map moved
    torch.testing.assert_close(xa_twin, xa_plain, rtol=0, atol=1e-6)


def test_without_the_recompute_hook_ifia_climbs_another_map():
    "In eval mode at the backward nothing fails: the recompute just runs without the surrogate, and the steps differ."
    plain, twin = pair('nonreentrant')
    with without_recompute_state(): xa_twin, x, *_ = ifia_iterates(twin, 'second_order')
    xa_plain, *_ = ifia_iterates(plain, 'second_order')
    assert (xa_twin - xa_plain).abs().max() > 1e-3


def test_model_state_is_left_as_found_by_a_checkpointed_step():
    "Checkpoint hooks are gone after the work; BatchNorm statistics of an attack on a checkpointed model are untouched."
    import torch.utils.checkpoint as tc
    _, twin = pair('reentrant')
    stats = {k: v.clone() for k, v in twin.state_dict().items()}
    ifia_iterates(twin, 'second_order')
    assert all(torch.equal(v, stats[k]) for k, v in twin.state_dict().items())
    assert tc.CheckpointFunction is core._TORCH_CHECKPOINT['CheckpointFunction']
    assert tc._CheckpointFrame is core._TORCH_CHECKPOINT['_CheckpointFrame'] and core._hooks['users'] == 0


# --- torch.compile ---------------------------------------------------------------------------------------------------

def compiled_pair():
    "A small BatchNorm CNN and the same module `torch.compile`d (aot_autograd, whose backward cannot be differentiated again)."
    plain, _ = pair(None)
    return plain, torch.compile(plain, backend='aot_eager')


def test_compiled_model_fails_double_backward_without_the_library():
    "The subject is not trivial: torch.compile's graphs refuse a gradient of a gradient."
    _, compiled = compiled_pair()
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match='double backward|donated buffers'):
        g, = torch.autograd.grad(compiled.eval()(x)[:, 0].sum(), x, create_graph=True)
        torch.autograd.grad(g.square().sum(), x)


def test_compiled_model_runs_an_aat_step_with_the_eager_numbers():
    plain, compiled = compiled_pair()
    ref = train_step(pair(None)[0], METHODS["aat"]())
    assert_same_step(train_step(compiled, METHODS['aat']()), ref, rel=1e-4)


def test_compiled_model_runs_evaluate():
    plain, compiled = compiled_pair()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(): y = plain.eval()(x).argmax(1)
    kw = dict(variant='quick', n=2, aa_n=2, bs=4, progress=False, ifia_steps=2, ig_steps=8, attack_ig_steps=4, pgd_steps=2, k=20,
              attack_k=20, seed=0)
    res, ref = evaluate(compiled, x, y, 'cifar10', **kw), evaluate(plain, x, y, 'cifar10', **kw)
    assert res['n'] == 2 and res['tried'] == 2
    torch.testing.assert_close(torch.as_tensor(res['per_sample']['CO']), torch.as_tensor(ref['per_sample']['CO']), rtol=0, atol=1e-4)


def test_compiled_model_on_a_torch_without_set_stance_stops_at_once(monkeypatch):
    _, compiled = compiled_pair()
    monkeypatch.delattr(torch.compiler, 'set_stance')
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"`model` is torch.compile'd.*needs torch>=2.6.*pass `model._orig_mod`") as e:
        IFIA(EPS, EPS/3, 2)(compiled, x, 0)
    assert '\n' not in str(e.value)


# --- every ReLU however written, and multi-output models -------------------------------------------------------------

class GeluThenReLU(nn.Module):
    "A GELU layer, then a layer whose ReLU is `relu` (e.g. written as `clamp(min=0)`)."
    def __init__(self, relu):
        super().__init__()
        self.a, self.b, self.out, self.relu = nn.Linear(48, 16), nn.Linear(16, 16), nn.Linear(16, N_CLASSES), relu
    def forward(self, x): return self.out(self.relu(self.b(F.gelu(self.a(x.flatten(1))))))


def test_clamp_relu_beside_a_gelu_is_smoothed_as_nn_relu():
    "IFIA on the model whose only ReLU is `clamp(min=0)` climbs the same smoothed map as on the same model with nn.ReLU."
    torch.manual_seed(0)
    ref = GeluThenReLU(nn.ReLU())
    clamp = GeluThenReLU(lambda h: h.clamp(min=0)); clamp.load_state_dict(ref.state_dict())
    x = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(): y = ref(x).argmax(1)
    run = lambda m: IFIA(0.1, 0.03, 3, k=10, ig_steps=6, attack_ig_steps=3, objective='pcc', select='last', seed=0,
                         random_start=True)(m, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                    # and says nothing
        xa_ref, xa_clamp = run(ref), run(clamp)
    assert (xa_ref - x).abs().max() > 0.05
    torch.testing.assert_close(xa_clamp, xa_ref, rtol=0, atol=1e-6)


def googlenet():
    torch.manual_seed(0)
    return torchvision.models.GoogLeNet(num_classes=N_CLASSES, aux_logits=True, init_weights=False)


def tiny_dls():
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    y = torch.arange(8) % N_CLASSES
    dls = DataLoaders.from_dsets(list(zip(x[:4], y[:4])), list(zip(x[4:], y[4:])), bs=4, device='cpu')
    dls.c = N_CLASSES
    return dls


def test_raw_googlenet_stops_before_the_first_step_with_the_image_classifier_hint():
    model = googlenet()
    before = [p.detach().clone() for p in model.parameters()]
    learn = robust_learner(tiny_dls(), 'natural', arch=model)
    with learn.no_bar(), learn.no_logging(), pytest.raises(Exception, match='got GoogLeNetOutputs: wrap the model in `robust_attr.models.ImageClassifier'):
        learn.fit(1)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_wrapped_googlenet_trains_and_names_its_auxiliary_heads():
    model = googlenet()
    aux = [p.detach().clone() for p in model.aux1.parameters()]
    learn = robust_learner(tiny_dls(), 'natural', arch=ImageClassifier(model))
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn.fit(1)
    assert any("['aux_logits2', 'aux_logits1'] take no part in it" in str(m.message) for m in w)
    assert all(torch.equal(p, q) for p, q in zip(aux, model.aux1.parameters()))   # what the warning says: no gradient
