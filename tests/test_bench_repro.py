"Tests of the Fashion-MNIST reproduction helpers in bench/ (the scripts' building blocks, at tiny sizes)."
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]/'bench'))
import _repro as R
from robust_attr.data import get_arrays
from robust_attr.models import SmallCNN


def tiny_budget(**kw):
    "The smoke budget shrunk further: a few batches of training, a handful of attacked images."
    return R.get_budget('smoke', nat_images=100, ft_images=50, n_valid=50, **kw)


def test_eval_set_roundtrip_gives_the_same_images(tmp_path):
    "`robust_attr evaluate --path` must read back exactly the images the table was computed on."
    x = torch.randint(0, 256, (7, 1, 28, 28)).float() / 255
    y = torch.tensor([0, 1, 2, 3, 9, 8, 7])
    d = R.write_eval_set(x, y, tmp_path/'set')
    xr, yr = get_arrays('fashion_mnist', 'test', path=d)
    assert torch.equal(xr, x) and torch.equal(yr, y)
    first = (d/'t10k-images-idx3-ubyte').read_bytes()
    R.write_eval_set(x, y, d)
    assert (d/'t10k-images-idx3-ubyte').read_bytes() == first  # re-runs do not churn the committed files


def test_common_correct_keeps_only_images_every_model_gets_right():
    x = torch.zeros(6, 1, 28, 28)
    y = torch.tensor([0, 1, 0, 1, 0, 0])
    class Const(torch.nn.Module):
        def __init__(self, c): super().__init__(); self.c = c
        def forward(self, x): return torch.nn.functional.one_hot(torch.full((len(x),), self.c), 2).float()
    idx = R.common_correct({'a': Const(0), 'b': Const(0)}, x, y, 3)
    assert idx.tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match='only 0 images'):
        R.common_correct({'a': Const(0), 'b': Const(1)}, x, y, 1)


def test_paired_ci_is_the_interval_of_per_image_differences():
    res = {'nat': {'per_sample': {'IN': [0.5]*40, 'CO': [0.2]*40}},
           'aat': {'per_sample': {'IN': [0.6, 0.8]*20, 'CO': [0.2]*40}}}
    d = R.paired_ci(res, 'aat')
    assert abs(d['dIN'] - 0.2) < 1e-6 and d['dIN_ci'][0] > 0.1 and d['dIN_ci'][1] < 0.3
    assert d['dCO'] == 0 and d['dCO_ci'] == [0., 0.]


def test_budgets_state_the_sizes_and_the_quick_protocol():
    b = R.get_budget('quick')
    p = R.protocol_of(b)
    assert (p.variant, p.eps, p.n) == ('quick', 0.1, 200)
    assert set(b.methods) == set(R.FINETUNED) - {'aat_sm'}
    with pytest.raises(ValueError, match='unknown budget'): R.get_budget('huge')
    with pytest.raises(ValueError, match='needs the Adv model'): R.method_spec('aat_sm', b)


def test_snapshots_keep_the_weights_after_each_count(fashion_mnist):
    b = tiny_budget()
    snaps = R.Snapshots([50, 100])
    init = SmallCNN()
    final, _, _ = R.finetune('adv', init, b, seed=0, n_images=100, cbs=[snaps])
    assert sorted(snaps.states) == [50, 100]
    w = lambda s: s['1.weight']  # the first convolution
    assert torch.equal(w(snaps.states[100]), w(final.state_dict()))
    assert not torch.equal(w(snaps.states[50]), w(snaps.states[100]))
    assert not torch.equal(w(snaps.states[50]), w(init.state_dict()))


def test_finetuning_is_reproducible_with_the_same_seed(fashion_mnist):
    "Same seed: same data subset and order, same random starts, same weights (threads fixed)."
    b = tiny_budget()
    init = SmallCNN()
    runs = [R.finetune('aat', init, b, seed=3)[0].state_dict() for _ in range(2)]
    other = R.finetune('aat', init, b, seed=4)[0].state_dict()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], other[k]) for k in runs[0])


def test_rerun_comparison_flags_a_change_beyond_the_tolerance():
    import far_table
    def run(shift):
        per = [0.5 + shift, 0.4, 0.6]
        r = dict(NA=0.9, AA=0.1, IN=sum(per)/3, CO=0.5, per_sample=dict(IN=per, CO=[0.5]*3))
        return dict(eval_indices=[3, 5, 8], results={'nat': r, 'aat': dict(r, IN=0.7)})
    same = far_table.compare(run(0.), run(0.))
    assert same['ok'] and same['same_images'] and same['rows']['nat']['max_image_dIN'] == 0
    moved = far_table.compare(run(0.15), run(0.))  # one image moves by .15: the mean by .05
    assert not moved['ok'] and moved['rows']['nat']['max_image_dIN'] == 0.15 and abs(moved['rows']['nat']['IN'] - 0.05) < 1e-4
    assert moved['rows']['aat']['IN'] == 0  # within tolerance for the other model
