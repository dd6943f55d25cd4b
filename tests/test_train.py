"""Tests of `robust_attr.train` on the bundled digits: every callback trains a SmallCNN and records a non-zero term;
the attack reuses the clean map; on a fixed batch each callback's own regularizer shrinks; mixed precision and
double backward under autocast; bad input the notebook does not cover.

The digits are used at their native 8×8 and every attack is shortened (2 steps, 3–4 IG points), so the file takes
about 25 s of CPU on one thread."""
import math, warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam
from fastai.torch_core import set_seed

from robust_attr.data import get_dls
from robust_attr.models import SmallCNN
from robust_attr.train import (METHODS, FARCallback, AdvTrainCallback, IGNormCallback, IGSumNormCallback, TRADESCallback,
                               ARTCallback, AATCallback, AdvAATCallback, SaliencyMatchCallback, robust_learner,
                               method_callback)
from robust_attr.passes import step_passes

SIZE, BS = 8, 16
SHORT = dict(eps=0.1, steps=2)

def make_callback(name, **kw):
    "The preset `name` with short attacks (seeded where the attack has random starts)."
    settings = {'adv': dict(step_size=0.05, seed=0), 'ig_norm': dict(step_size=0.05, attack_m=3, grad_m=4, seed=0),
                'ig_sum_norm': dict(step_size=0.05, attack_m=3, grad_m=4, lam=1., seed=0),
                'trades': dict(step_size=0.05, seed=0), 'art': dict(step_size=0.05, seed=0),
                'aat': dict(ig_steps=4), 'adv_aat': dict(ig_steps=4, seed=0)}[name]
    return METHODS[name](**(SHORT | settings | kw))

PRESETS = [m for m in METHODS if m != 'natural']


def digits():
    "Four batches of digits; fastai seeds a DataLoader's shuffling when it is built, so fresh ones shuffle alike."
    set_seed(0)
    return get_dls('digits', bs=BS, n_train=4*BS, n_valid=BS, size=SIZE, seed=0)

@pytest.fixture
def dls(): return digits()


def learner(dls, cbs=(), seed=0, model=None, **kw):
    set_seed(seed)   # torch, random (fastai's shuffling) and numpy
    model = SmallCNN(10, img_size=SIZE) if model is None else model
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=Adam, lr=1e-3, cbs=list(cbs), **kw)


def fit(learn, epochs=1):
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs)
    return learn


def recorded(learn):
    "The last epoch's recorder values by column name."
    names = list(learn.recorder.metric_names)[1:-1]   # drop 'epoch' and 'time'
    return dict(zip(names, learn.recorder.values[-1]))


# ---------- every callback trains on the digits and records a non-zero term ----------

class CleanLoss(Callback):
    "After the FAR callback swapped in attacked inputs, the cross-entropy of the clean batch (for comparison)."
    order, run_valid = 60, False
    def before_fit(self): self.clean, self.adv = [], []
    def after_loss(self):
        cb = next(c for c in self.learn.cbs if isinstance(c, FARCallback))
        with torch.no_grad(): self.clean.append(F.cross_entropy(self.learn.model(cb._x), cb._y).item())
        self.adv.append(self.learn.loss.item())


@pytest.mark.parametrize('name', PRESETS)
def test_every_preset_trains_on_digits_and_records_nonzero_term(dls, name):
    cb, probe = make_callback(name), CleanLoss()
    learn = fit(learner(dls, [cb, probe]))
    vals = recorded(learn)
    assert math.isfinite(vals['valid_loss']) and vals['ce'] > 0
    if cb.lam:
        reg = vals[f'{cb.term}_reg']
        assert math.isfinite(reg) and reg != 0, vals
    else:   # Madry: the extra term is the robust loss itself, CE(x̃) − CE(x) > 0
        assert f'{cb.term}_reg' not in vals
        assert sum(probe.adv) > sum(probe.clean), (probe.adv, probe.clean)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in learn.model.parameters())


def test_saliency_match_composed_with_aat_trains_and_records_both_terms(dls):
    teacher = fit(learner(dls, seed=1)).model
    learn = fit(learner(dls, [make_callback('aat'), SaliencyMatchCallback(teacher, lam=1.)]))
    vals = recorded(learn)
    assert vals['aat_reg'] > 0 and vals['saliency_match'] > 0, vals


# ---------- the clean map is computed once per step ----------

@pytest.mark.parametrize('name', ['aat', 'adv_aat'])
def test_attack_reuses_the_clean_training_map(dls, name):
    def own_targets(cb):
        "How often the attack computes a detached map itself (its own target) during one epoch."
        calls, attack_map = [], cb.attack.attack_map
        def spy(model, x, y, ctx, create_graph=True):
            if not create_graph: calls.append(len(x))
            return attack_map(model, x, y, ctx, create_graph)
        cb.attack.attack_map = spy
        fit(learner(dls, [cb]))
        return len(calls)
    assert own_targets(make_callback(name)) == 0
    assert own_targets(make_callback(name, smooth='softplus')) == 4   # maps that differ: the attack needs its own


@pytest.mark.parametrize('name', ['aat', 'ig_norm', 'trades'])
def test_regularizer_objective_with_zero_weight_runs_no_attack(dls, name):
    cb, calls = make_callback(name, lam=0.), []
    attack_call = type(cb.attack).__call__
    class Spy(type(cb.attack)):
        def __call__(self, *args, **kwargs): calls.append(1); return attack_call(self, *args, **kwargs)
    cb.attack.__class__ = Spy
    vals = recorded(fit(learner(dls, [cb])))
    assert calls == [] and vals['ce'] > 0 and f'{cb.term}_reg' not in vals
    cb.lam = 1.   # with a weight the attack runs every step
    fit(learner(dls, [cb]))
    assert len(calls) == 4


# ---------- on a fixed batch, training shrinks the callback's own regularizer ----------

@pytest.fixture(scope='module')
def natural():
    "A SmallCNN trained naturally on all the digits: the start of every fine-tuning below (FAR fine-tunes natural models)."
    set_seed(0)
    return fit(learner(get_dls('digits', bs=64, size=SIZE, seed=0)), epochs=3).model.eval()


def fresh_copy(model):
    new = SmallCNN(10, img_size=SIZE)
    new.load_state_dict(model.state_dict())
    return new


def fixed_batch(dls):
    "The first BS training images (not a shuffled batch, so the batch does not depend on test order)."
    return tuple(t[:BS].clone() for t in dls.train_ds.tensors)


def regularizer(cb, model, x, y, x_adv):
    "The callback's term at a fixed attacked input, with its own maps: d_s[S(x̃), S^T(x)] (CE(x̃) for Madry)."
    model.eval()
    if not cb.lam: return F.cross_entropy(model(x_adv), y).item()
    s_adv = cb.map_of(model, x_adv, y, x_clean=x, create_graph=False)
    target = cb.target_map(model, x, y)
    target = torch.zeros_like(s_adv) if target is None else target.detach()
    return cb._d(s_adv.detach(), target).mean().item()


def learner_on(x, y, start, cbs, steps=8):
    "A learner fitted for `steps` optimizer steps on the batch (x, y) with callbacks `cbs`, from a copy of `start`."
    dls = DataLoaders.from_dsets(list(zip(x.repeat(steps, 1, 1, 1), y.repeat(steps))), list(zip(x, y)),
                                 bs=len(x), shuffle=False, device='cpu', num_workers=0)
    return fit(learner(dls, cbs, model=fresh_copy(start)))


def train_on(x, y, start, cbs, steps=8):
    "A copy of `start` after `steps` optimizer steps on the batch (x, y) with callbacks `cbs`."
    return learner_on(x, y, start, cbs, steps).model


# AAT's and AdvAAT's PCL between the maps of inputs 0.1 apart is ~0.02 for a natural model, far below its CE, and ART's
# L_attr moves slowly: a larger weight lets 8 steps show the term's effect. IG-NORM's term at λ = 1 sufficed on a batch of
# one digit (the split was sorted by class); on a batch of seven digits the CE's own descent shrinks the IG norm about as
# much in 8 steps (0.158 with the term, 0.140 without), so λ = 5 (0.113).
FIXED_BATCH = {'aat': dict(lam=20.), 'adv_aat': dict(lam=20.), 'art': dict(lam=5.), 'ig_norm': dict(lam=5.)}

@pytest.mark.parametrize('name', PRESETS)
def test_training_on_a_fixed_batch_decreases_the_regularizer(dls, natural, name):
    x, y = fixed_batch(dls)
    cb = make_callback(name, **FIXED_BATCH.get(name, {}))
    x_adv = cb.attack(fresh_copy(natural), x, y)       # once, before training (the attacks are seeded)
    before = regularizer(cb, natural, x, y, x_adv)
    after = regularizer(cb, train_on(x, y, natural, [make_callback(name, **FIXED_BATCH.get(name, {}))]), x, y, x_adv)
    # The control trains the same way without the term (its weight 0: natural training, or Madry's for a robust
    # objective). Madry's own term is the robust loss, so its control is natural training; so is IG-SUM-NORM's:
    # its norm is of the loss change along x → x̃, which Madry training at the stronger CE-maximizing x̃ shrinks as
    # much at this scale (the notebook pins β = 0 to Madry, and IG-NORM's case checks the same gradient path).
    control = [] if name in ('adv', 'ig_sum_norm') else [make_callback(name, lam=0.)]
    after_control = regularizer(cb, train_on(x, y, natural, control), x, y, x_adv)
    assert after < before, (name, before, after)
    assert after < after_control, (name, after, after_control)   # the callback's term did it, not the loss alone


def test_saliency_match_term_decreases_on_a_fixed_batch(dls, natural):
    from robust_attr.losses import saliency_match_loss
    x, y = fixed_batch(dls)
    teacher = fit(learner(dls, seed=1), epochs=2).model.eval()
    def l_diff(model):
        model.eval()
        return saliency_match_loss(SaliencyMatchCallback(teacher)._attr(model, x, y),
                                   SaliencyMatchCallback(teacher)._attr(teacher, x, y)).mean().item()
    with_sm = train_on(x, y, natural, [make_callback('aat'), SaliencyMatchCallback(teacher, lam=10.)])
    without = train_on(x, y, natural, [make_callback('aat')])
    assert l_diff(with_sm) < l_diff(natural) and l_diff(with_sm) < l_diff(without), (l_diff(natural), l_diff(with_sm), l_diff(without))


# ---------- mixed precision ----------

def losses_of(learn):
    "Every training step's total loss."
    losses = []
    class Grab(Callback):
        order, run_valid = 90, False
        def after_loss(self): losses.append(self.learn.loss.item())
    learn.add_cb(Grab())
    fit(learn)
    return torch.tensor(losses)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU MixedPrecision really autocasts")
@pytest.mark.parametrize('amp_mode', ['fp16', 'bf16'])
@pytest.mark.parametrize('name', ['aat', 'trades'])
def test_fastai_mixed_precision_is_inert_on_cpu_and_training_works(dls, name, amp_mode):
    # fastai 2.8's MixedPrecision autocasts for 'cuda' only: on a CPU it warns and changes nothing
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*CUDA is not available.*')
        warnings.filterwarnings('ignore', message='.*GradScaler.*')
        with_mp = losses_of(learner(digits(), [make_callback(name), MixedPrecision(amp_mode=amp_mode)]))
    without = losses_of(learner(digits(), [make_callback(name)]))
    assert torch.isfinite(with_mp).all() and len(with_mp) == 4
    torch.testing.assert_close(with_mp, without)


class CPUAutocast(Callback):
    "fastai's MixedPrecision event placement (autocast from `before_batch` to `after_loss`), for the CPU."
    order = 10
    def __init__(self, dtype): self.dtype = dtype
    def before_batch(self): self._ctx = torch.autocast('cpu', dtype=self.dtype); self._ctx.__enter__()
    def after_pred(self): self.learn.pred = self.pred.float()
    def after_loss(self): self._ctx.__exit__(None, None, None)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_maps_stay_float32_under_autocast(dls, natural, dtype):
    # one step: the CE runs in reduced precision, but the attack and both maps are float32, so the AAT term is unchanged
    x, y = fixed_batch(dls)
    vals = [recorded(learner_on(x, y, natural, [make_callback('aat')] + cbs, steps=1)) for cbs in ([CPUAutocast(dtype)], [])]
    assert vals[0]['ce'] != vals[1]['ce']                      # autocast really was on for the classification loss
    assert vals[0]['aat_reg'] == pytest.approx(vals[1]['aat_reg'], rel=1e-5)


def parameter_grad(model, x, y, dtype=None, order=2):
    "Parameter gradient of AAT's term (order 2: the PCL of the maps at x and x + 0.05) or of the CE (order 1)."
    cb = make_callback('aat')
    model.zero_grad()
    with (torch.autocast('cpu', dtype=dtype) if dtype else torch.autocast('cpu', enabled=False)):
        if order == 1: loss = F.cross_entropy(model(x), y)
        else: loss = cb._d(cb.map_of(model, (x + 0.05).clamp(0, 1), y), cb.target_map(model, x, y)).mean()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_pytorch_allows_double_backward_under_autocast_but_it_is_inaccurate(natural, dls, dtype):
    # What PyTorch allows: a map built with create_graph under CPU autocast can be differentiated again (no error).
    # The second-order gradient is far from float32's — relative errors of 0.1–0.7 here, 25–40× those of the
    # first-order CE gradient under the same autocast — which is why FARCallback computes its maps with autocast off.
    x, y = fixed_batch(dls)
    model = fresh_copy(natural)
    def error(order):
        g32, g = parameter_grad(model, x, y, order=order), parameter_grad(model, x, y, dtype, order=order)
        assert torch.isfinite(g).all()
        return ((g - g32).norm() / g32.norm()).item()
    first, second = error(1), error(2)
    assert second > 5 * first and second > 0.02, (first, second)


# ---------- bad input (the notebook tests AAT's λ < 0, robust_learner's unknown method, a 3-class teacher at
# fit time and AAT's warning for a model without nn.ReLU) ----------

@pytest.mark.parametrize('make, name', [
    (lambda: FARCallback(lam=-0.1), 'lam'), (lambda: AdvAATCallback(lam=-1.), 'lam'), (lambda: IGNormCallback(lam=-1.), 'lam'),
    (lambda: IGSumNormCallback(beta=-0.1), 'beta'), (lambda: TRADESCallback(beta=-6.), 'beta'), (lambda: ARTCallback(lam=-0.5), 'lam'),
    (lambda: IGSumNormCallback(lam=-0.1), 'lam'), (lambda: TRADESCallback(lam=-6.), 'lam'),
    (lambda: SaliencyMatchCallback(SmallCNN(10, img_size=SIZE), lam=-1.), 'lam'), (lambda: method_callback('adv_aat', lam=-1.), 'lam'),
    (lambda: FARCallback(adv_ratio=1.5), 'adv_ratio'), (lambda: AdvTrainCallback(adv_ratio=-0.3), 'adv_ratio')])
def test_negative_weights_are_rejected_by_every_preset(make, name):
    with pytest.raises(ValueError, match=f'`{name}` must be'): make()


def test_unknown_method_is_rejected_everywhere_a_name_is_taken(dls):
    from robust_attr.cli import train
    for call in (lambda: method_callback('igsumnorm'), lambda: robust_learner(dls, 'AAT'), lambda: step_passes('madry'),
                 lambda: train(data='digits', method='trade', n_train=16, out='/nonexistent/model.pth', progress=False)):
        with pytest.raises(ValueError, match='method'): call()


def test_teacher_must_be_a_module_with_the_students_classes(dls):
    with pytest.raises(TypeError, match='`teacher` must be an nn.Module'): SaliencyMatchCallback(teacher=lambda x: x)
    learn = learner(dls, [SaliencyMatchCallback(SmallCNN(2, img_size=SIZE))])
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match='the teacher has 2 classes but the model has 10'): fit(learn)
    assert all(torch.equal(p, q) for p, q in zip(before, learn.model.parameters()))   # raised before the first step


class FunctionalReLU(nn.Module):
    "A digits classifier whose nonlinearity is `F.relu`: the surrogate smooths it like an `nn.ReLU` module."
    def __init__(self): super().__init__(); self.lin1, self.lin2 = nn.Linear(SIZE*SIZE, 32), nn.Linear(32, 10)
    def forward(self, x): return self.lin2(F.relu(self.lin1(x.flatten(1))))


class ClampReLU(FunctionalReLU):
    "The same classifier with ReLU written as arithmetic (`clamp_min(0)`), which the surrogate smooths like `F.relu`."
    def forward(self, x): return self.lin2(self.lin1(x.flatten(1)).clamp_min(0))


class ClampAt(FunctionalReLU):
    "The same classifier cut at another bound (`clamp_min(-0.5)`), which no surrogate smooths."
    def forward(self, x): return self.lin2(self.lin1(x.flatten(1)).clamp_min(-0.5))


def surrogate_warnings(dls, name, model):
    learn = learner(dls, [make_callback(name)], model=model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        fit(learn)
    return [str(w.message) for w in caught if 'softplus_surrogate' in str(w.message)]


@pytest.mark.parametrize('name, warns', [('ig_norm', True), ('ig_sum_norm', True), ('art', True), ('adv_aat', True),
                                         ('adv', False), ('trades', False)])
def test_unsmoothable_model_warned_only_by_methods_that_need_the_surrogate(dls, name, warns):
    assert any('ClampAt ran clamp_min (at a bound other than 0)' in m for m in surrogate_warnings(dls, name, ClampAt())) == warns


@pytest.mark.parametrize('model', [FunctionalReLU, ClampReLU])
@pytest.mark.parametrize('name', ['ig_norm', 'art', 'adv_aat'])
def test_functional_relu_is_smoothed_without_warning(dls, name, model):
    assert surrogate_warnings(dls, name, model()) == []
