"""Any image classifier a user brings: one test per architecture family, on tiny 32×32 inputs with random weights.

Every test first shows that its subject is not trivial: the model's logits differ between classes and between images, and
its maps are not constant (`assert_not_trivial`). A zero map would make "IG equals captum" read 0 == 0 and "IFIA moved
the map" pass on `kendall_tau`'s value for a map without a ranking. For torchvision's ResNet-18, VGG-11 with BatchNorm, MobileNetV3-small, a small ConvNeXt, a small VisionTransformer, a
model calling `F.relu` and one sharing a ReLU module: IG and saliency equal captum's; IFIA keeps every label and moves
the map; the model is bit-identical afterwards; one AAT and one AdvAAT step change the parameters with a finite loss;
`evaluate` returns its counts. The ViT runs every second-order path (IFIA's smoothed map, AAT's training map) without
the test choosing an attention backend. About a minute of CPU on one thread."""
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from captum.attr import IntegratedGradients, Saliency
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed
from torchvision.models.convnext import CNBlockConfig

from robust_attr.attacks import IFIA
from robust_attr.attribution import integrated_gradients, saliency
from robust_attr.evaluate import evaluate
from robust_attr.metrics import kendall_tau
from robust_attr.models import ImageClassifier
from robust_attr.smooth import softplus_surrogate
from robust_attr.train import AATCallback, AdvAATCallback

N_CLASSES, SIZE, EPS = 10, 32, 8/255


class FunctionalCNN(nn.Module):
    "A small CNN whose ReLUs are `F.relu` / `torch.relu` / `Tensor.relu` calls in `forward`."
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Linear(8*16*16, N_CLASSES)
    def forward(self, x):
        h = torch.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(h.flatten(1).relu())


class SharedReLUCNN(nn.Module):
    "A small CNN applying one `nn.ReLU` object (in place) after every layer."
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Linear(8*16*16, N_CLASSES), nn.ReLU(inplace=True)
    def forward(self, x): return self.fc(self.act(self.c2(self.act(self.c1(x)))).flatten(1))


def vgg11_bn():
    "torchvision's VGG-11-BN features with a classifier sized for 32×32 inputs (the 7×7×512→4096 head is 120 M weights)."
    m = torchvision.models.vgg11_bn(num_classes=N_CLASSES)
    m.avgpool, m.classifier = nn.AdaptiveAvgPool2d(1), nn.Sequential(nn.Flatten(), nn.Linear(512, 64), nn.ReLU(True), nn.Linear(64, N_CLASSES))
    return m


def vit():
    """A small torchvision VisionTransformer. Its classification head starts at zero (torchvision's choice for fine-tuning),
    so every logit and every map of the random model would be 0: the head gets small random weights, as the body has."""
    m = torchvision.models.VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                             mlp_dim=64, num_classes=N_CLASSES)
    nn.init.normal_(m.heads.head.weight, std=0.02)
    return m


ARCHITECTURES = {
    'resnet18': partial(torchvision.models.resnet18, num_classes=N_CLASSES),
    'vgg11_bn': vgg11_bn,
    'mobilenet_v3_small': partial(torchvision.models.mobilenet_v3_small, num_classes=N_CLASSES),
    'convnext': partial(torchvision.models.ConvNeXt, [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=N_CLASSES),
    'vit': vit,
    'functional_relu': FunctionalCNN,
    'shared_relu': SharedReLUCNN,
}


def build(name):
    "The architecture with seeded random weights, wrapped with ImageNet statistics as a user would, in eval mode."
    torch.manual_seed(0)
    return ImageClassifier(ARCHITECTURES[name](), mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]).eval()


def images(model, n=4, seed=1):
    "`n` random images and the model's own predictions as labels (random weights: every image counts as correct)."
    x = torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(): return x, model(x).argmax(1)


def varies(t, dims):
    "Whether `t` takes more than one value along `dims` for every index of the other dimensions."
    return bool(((t.amax(dims) - t.amin(dims)) > 0).all())


def assert_not_trivial(model, x, y):
    """The test's subject is not trivial: each image's logits differ between classes, the logits differ between images, and
    each image's saliency and IG maps take more than one value."""
    with torch.no_grad(): logits = model(x)
    assert varies(logits, 1) and varies(logits, 0), f"constant logits: {logits}"
    for name, m in (('saliency', saliency(model, x, y)), ('IG', integrated_gradients(model, x, y, steps=8))):
        assert varies(m.flatten(1), 1), f"a constant {name} map"


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()], [dict(vars(m)).get('forward') for m in model.modules()])


def assert_unchanged(model, before):
    sd, modes, flags, forwards = before
    after = model.state_dict()
    assert list(after) == list(sd) and all(torch.equal(after[k], v) for k, v in sd.items())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [dict(vars(m)).get('forward') for m in model.modules()] == forwards
    assert all(p.grad is None for p in model.parameters())


def close(a, b, rel=1e-4):
    "Equal up to float32 summation order, relative to the map's scale."
    scale = b.abs().max().clamp_min(1e-12)
    return (a - b).abs().max() <= rel * scale


@pytest.mark.parametrize('name', ARCHITECTURES)
def test_ig_and_saliency_equal_captum(name):
    model = build(name)
    x, y = images(model)
    assert_not_trivial(model, x, y)
    ours = integrated_gradients(model, x, y, steps=16, method='riemann_right')
    theirs = IntegratedGradients(model).attribute(x, target=y, n_steps=16, method='riemann_right')
    assert close(ours, theirs)
    assert close(saliency(model, x, y), Saliency(model).attribute(x, target=y))


@pytest.mark.parametrize('name', ARCHITECTURES)
def test_ifia_keeps_labels_moves_maps_and_leaves_the_model(name):
    model = build(name)
    x, y = images(model)
    assert_not_trivial(model, x, y)
    before = snapshot(model)
    ifia = IFIA(EPS, EPS/2, 3, k=50, ig_steps=8, attack_ig_steps=4, seed=0)
    xa = ifia(model, x, y)
    assert_unchanged(model, before)
    with torch.no_grad(): assert torch.equal(model(xa).argmax(1), y)
    assert (xa - x).abs().max() <= EPS + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    clean, adv = ifia.measure_map(model, x, y), ifia.measure_map(model, xa, y)
    assert varies(clean.flatten(1), 1) and varies(adv.flatten(1), 1), "a constant map has no ranking to move"
    co = kendall_tau(adv, clean)
    assert (co < 1).any(), co
    assert_unchanged(model, before)


class LossRecorder(Callback):
    "The training loss of every step, as the optimizer sees it."
    order = 90
    def before_fit(self): self.losses = []
    def before_step(self): self.losses.append(float(self.learn.loss))


def one_step(model, cb):
    "One training step on one batch of four images; the recorded loss and whether any parameter tensor moved."
    set_seed(0)
    x = torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(): y = model(x).argmax(1)
    assert_not_trivial(model, x, y)
    dls = DataLoaders.from_dsets(list(zip(x[:4], y[:4])), list(zip(x[4:], y[4:])), bs=4, device='cpu')
    rec = LossRecorder()
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), lr=1e-3, cbs=[cb, rec])
    before = [p.detach().clone() for p in model.parameters()]
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    changed = any(not torch.equal(p, q) for p, q in zip(before, model.parameters()))
    return rec.losses, changed


@pytest.mark.parametrize('name', ARCHITECTURES)
@pytest.mark.parametrize('method', [partial(AATCallback, ig_steps=4), partial(AdvAATCallback, ig_steps=4, seed=0)],
                         ids=['aat', 'adv_aat'])
def test_a_training_step_changes_the_parameters_with_a_finite_loss(name, method):
    losses, changed = one_step(build(name), method(eps=EPS, steps=1))
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses)).all(), losses
    assert changed


@pytest.mark.parametrize('name', ARCHITECTURES)
def test_evaluate_returns_its_counts(name):
    model = build(name)
    x, y = images(model, n=3)
    assert_not_trivial(model, x, y)
    res = evaluate(model, x, y, 'cifar10', variant='quick', n=2, aa_n=2, bs=4, progress=False, ifia_steps=2, ig_steps=8,
                   attack_ig_steps=4, pgd_steps=2, k=20, attack_k=20)
    assert res['n'] == 2 and res['tried'] == 2 and res['skipped_misclassified'] == 0
    assert len(res['per_sample']['CO']) == 2 and 0 <= res['IN'] <= 1
    assert res['constant_maps'] == 0 and all(-1 <= c <= 1 for c in res['per_sample']['CO'])


@pytest.mark.parametrize('name', ['functional_relu', 'shared_relu', 'resnet18'])
def test_far_surrogate_gives_a_second_derivative_only_inside(name):
    "FAR's second-order ReLU: the attack's second derivative is zero on the ReLU network and non-zero inside the context."
    model = build(name)
    x, y = images(model, n=2)
    assert_not_trivial(model, x, y)
    model = model.double()
    def curvature(smooth):
        xg = x.double().requires_grad_()
        with (softplus_surrogate(model, 5., 'second_order') if smooth else torch.enable_grad()):
            g = saliency(model, xg, y, create_graph=True)
            h, = torch.autograd.grad(g.sum(), xg, allow_unused=True)
        return 0. if h is None else h.abs().sum().item()
    assert curvature(False) == 0.
    assert curvature(True) > 0.
