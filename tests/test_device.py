"""Attacks, evaluation and training follow the model's device, in fp32 and with bf16 inner steps.

Run on every device this machine has: the CPU always, CUDA (and MPS) when present; `bench/gpu.py` runs this file on the
GPU and records the outcome.
"""
import pytest, torch
from fastai.data.core import DataLoaders
from robust_attr.models import SmallCNN
from robust_attr.attacks import PGD, IFIA, AdvIFIA, TargetedAttributionAttack, ARTAttack
from robust_attr.metrics import kendall_tau
from robust_attr.evaluate import evaluate
from robust_attr.train import robust_learner

def _devices():
    yield 'cpu'
    yield pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU'))
    mps = getattr(torch.backends, 'mps', None)
    yield pytest.param('mps', marks=pytest.mark.skipif(not (mps and mps.is_available()), reason='needs an Apple GPU'))

DEVICES = list(_devices())

def toy(device, n=8, seed=0):
    "A small SmallCNN and `n` 1×8×8 images on `device`, labelled with the model's own predictions."
    torch.manual_seed(seed)
    model = SmallCNN(n_classes=3, img_size=8).to(device).eval()
    x = torch.rand(n, 1, 8, 8, device=device)
    with torch.no_grad(): y = model(x).argmax(1)
    return model, x, y

ATTACKS = dict(pgd=lambda p: PGD(0.1, 0.02, 2, seed=0, precision=p),
               ifia=lambda p: IFIA(0.1, 0.02, 2, k=8, ig_steps=4, attack_ig_steps=2, seed=0, precision=p),
               adv_ifia=lambda p: AdvIFIA(0.1, 0.02, 2, attack_ig_steps=2, seed=0, precision=p),
               targeted=lambda p: TargetedAttributionAttack(0.1, 0.02, 2, ig_steps=4, attack_ig_steps=2, seed=0, precision=p),
               art=lambda p: ARTAttack(0.1, 0.02, 2, seed=0, precision=p))

@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
@pytest.mark.parametrize('name', list(ATTACKS))
@pytest.mark.parametrize('device', DEVICES)
def test_attacks_stay_on_the_device(device, name, precision):
    model, x, y = toy(device)
    xa, rec = ATTACKS[name](precision)(model, x, y, return_record=True)
    assert xa.device == x.device and xa.dtype == torch.float32 and rec.score.device == x.device
    assert (xa - x).abs().amax() <= 0.1 + 1e-6 and xa.min() >= 0 and xa.max() <= 1

@pytest.mark.parametrize('device', DEVICES)
def test_bf16_scores_are_fp32_scores(device):
    model, x, y = toy(device)
    ifia = IFIA(0.1, 0.02, 3, k=8, ig_steps=4, attack_ig_steps=2, precision='bf16')
    xa, rec = ifia(model, x, y, return_record=True)
    clean, adv = ifia.measure_map(model, x, y), ifia.measure_map(model, xa, y)
    assert clean.dtype == adv.dtype == torch.float32
    flat = clean.flatten(1)
    assert (flat.amax(1) > flat.amin(1)).all(), "a constant clean map: Kendall's τ would be 0 for any score"
    torch.testing.assert_close(-rec.score, kendall_tau(adv, clean), atol=1e-5, rtol=0)

@pytest.mark.parametrize('device', DEVICES)
def test_evaluate_on_the_device(device):
    model, x, y = toy(device, n=6)
    res = evaluate(model, x, y, 'synthetic', 'quick', k=8, attack_k=8, ifia_steps=2, ig_steps=4, attack_ig_steps=2, pgd_steps=2,
                   progress=False, bs=3)
    assert res['n'] == 6 and res['constant_maps'] == 0 and 0 <= res['CO'] <= 1 and 0 <= res['IN'] <= 1

@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
@pytest.mark.parametrize('method', ['adv', 'aat'])
@pytest.mark.parametrize('device', DEVICES)
def test_training_on_the_device(device, method, precision):
    _, x, _ = toy('cpu', n=16)
    y = (x[:, 0, :, :4].mean((1, 2)) > x[:, 0, :, 4:].mean((1, 2))).long()
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:8], y[:8])), bs=8, device=device, num_workers=0)
    dls.c = 2
    settings = dict(steps=1, ig_steps=2) if method=='aat' else dict(steps=1)
    learn = robust_learner(dls, method, arch=SmallCNN(2, img_size=8), eps=0.1, precision=precision, metrics=[], **settings)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert next(learn.model.parameters()).device.type == torch.device(device).type
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1][:2])).all()
    assert learn.method_settings['precision'] == precision
