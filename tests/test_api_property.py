"""Bad input at the public API, generated (issue 16): for every argument of `integrated_gradients`, the metrics, each
attack, `evaluate`, `get_dls` and `load_model`, hypothesis draws values outside what the argument accepts — numbers out of
range, NaN and inf, wrong types, strings that are not a choice — and each call must raise `ValueError` or `TypeError`
(a missing file: `FileNotFoundError`) whose message names the argument: never a torch internal error, never silence.
The CLI's numeric options must exit with status 2 and one line naming the option, having written nothing (its other
user errors are listed in `tests/test_cli.py`).

A one-layer model on 1×4×4 images keeps every call cheap; each property runs 50 examples, the file well under a minute."""
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, HealthCheck, strategies as st

from robust_attr.attribution import integrated_gradients, saliency, QUADRATURES, OUTPUTS
from robust_attr.metrics import topk_intersection, kendall_tau, spearman
from robust_attr.attacks import PGD, IFIA, AdvIFIA, TargetedAttributionAttack, ARTAttack
from robust_attr.evaluate import evaluate, PROTOCOLS
from robust_attr.data import get_dls, DATASETS
from robust_attr.models import load_model

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ATTACKS = (PGD, IFIA, AdvIFIA, TargetedAttributionAttack, ARTAttack)

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.ReLU(), nn.Linear(3, 3)).eval()

X, Y = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2])

def raises_naming(name, call, errors=(ValueError, TypeError)):
    "`call()` raises one of `errors` whose message names `name`."
    with pytest.raises(errors) as e: call()
    assert name in str(e.value), f"{type(e.value).__name__} does not name {name!r}: {e.value}"

# Values no argument of these kinds accepts.
not_a_number = st.one_of(st.text(max_size=3), st.none(), st.lists(st.integers(), max_size=2), st.just(float('nan')),
                         st.just(float('inf')), st.just(True))
negative = st.one_of(st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False), st.integers(max_value=-1))
below_one = st.one_of(st.integers(max_value=0), st.floats(max_value=0.999, allow_nan=False, allow_infinity=False))
not_int = st.floats(min_value=1.01, max_value=100, allow_nan=False).filter(lambda v: not float(v).is_integer())
def not_a_choice(choices): return st.text(max_size=8).filter(lambda s: s not in choices)

# ---------- attributions ----------

@SETTINGS
@given(steps=st.one_of(below_one, not_int, not_a_number))
def test_ig_steps(steps): raises_naming('`steps`', lambda: integrated_gradients(model(), X, Y, steps=steps))

@SETTINGS
@given(method=not_a_choice(QUADRATURES))
def test_ig_method(method): raises_naming('`method`', lambda: integrated_gradients(model(), X, Y, method=method))

@SETTINGS
@given(of=not_a_choice(OUTPUTS))
def test_ig_of(of): raises_naming('`of`', lambda: integrated_gradients(model(), X, Y, of=of))

@SETTINGS
@given(size=st.one_of(st.integers(max_value=0), not_int, st.text(max_size=3)))
def test_ig_internal_batch_size(size):
    raises_naming('`internal_batch_size`', lambda: integrated_gradients(model(), X, Y, internal_batch_size=size))

@SETTINGS
@given(baseline=st.one_of(st.floats(min_value=1.001, max_value=1e6), st.floats(max_value=-0.001, min_value=-1e6),
                          st.just(float('nan')), st.text(min_size=1, max_size=3)))
def test_ig_baseline(baseline): raises_naming('`baseline`', lambda: integrated_gradients(model(), X, Y, baseline))

@SETTINGS
@given(target=st.one_of(st.integers(min_value=3, max_value=10**6), st.integers(max_value=-1), st.floats(allow_nan=True),
                        st.text(max_size=2)))
def test_attribution_target(target):
    raises_naming('`target`', lambda: integrated_gradients(model(), X, target))
    raises_naming('`target`', lambda: saliency(model(), X, target))

@SETTINGS
@given(scale=st.one_of(st.floats(min_value=1.01, max_value=1e3), st.floats(max_value=-0.01, min_value=-1e3)),
       fill=st.sampled_from([float('nan'), float('inf'), None]))
def test_attribution_x(scale, fill):
    x = X * scale if fill is None else X.masked_fill(X > 0.5, fill)
    raises_naming('`x`', lambda: integrated_gradients(model(), x, Y))

def test_attribution_model_that_is_not_a_module():
    raises_naming('`model`', lambda: integrated_gradients(lambda t: t, X, Y))

# ---------- metrics ----------

@SETTINGS
@given(k=st.one_of(st.integers(max_value=0), st.integers(min_value=17, max_value=10**6), not_int, not_a_number))
def test_topk_intersection_k(k): raises_naming('`k`', lambda: topk_intersection(X, X.flip(0), k))

@SETTINGS
@given(n=st.integers(1, 3))
def test_metrics_shapes(n):
    for f in (topk_intersection, kendall_tau, spearman):
        args = (X, X[..., :n]) if f is not topk_intersection else (X, X[..., :n], 1)
        with pytest.raises(ValueError, match='same shape|must have'): f(*args)

# ---------- attacks ----------

@SETTINGS
@given(cls=st.sampled_from(ATTACKS), bad=st.one_of(negative, not_a_number))
def test_attack_eps(cls, bad): raises_naming('`eps`', lambda: cls(bad, 0.01, 2))

@SETTINGS
@given(cls=st.sampled_from(ATTACKS), bad=st.one_of(negative, st.just(0), st.just(0.), not_a_number))
def test_attack_step_size(cls, bad): raises_naming('`step_size`', lambda: cls(0.1, bad, 2))

@SETTINGS
@given(cls=st.sampled_from(ATTACKS), bad=st.one_of(st.integers(max_value=-1), not_int, not_a_number))
def test_attack_steps(cls, bad): raises_naming('`steps`', lambda: cls(0.1, 0.01, bad))

@SETTINGS
@given(cls=st.sampled_from(ATTACKS), name=st.sampled_from(['restarts', 'seed', 'norm']), data=st.data())
def test_attack_options(cls, name, data):
    bad = data.draw({'restarts': st.one_of(below_one, not_int), 'seed': st.one_of(negative, not_int, st.text(min_size=1, max_size=3)),
                     'norm': not_a_choice(('linf', 'l2'))}[name])
    raises_naming(f'`{name}`', lambda: cls(0.1, 0.01, 2, **{name: bad}))

@SETTINGS
@given(name=st.sampled_from(['k', 'ig_steps', 'attack_ig_steps', 'beta', 'select', 'smooth', 'objective', 'ig_method', 'of',
                             'baseline', 'reduce']), data=st.data())
def test_ifia_options(name, data):
    bad = data.draw({'k': st.one_of(below_one, not_int), 'ig_steps': st.one_of(below_one, not_int),
                     'attack_ig_steps': st.one_of(below_one, not_int), 'beta': st.one_of(negative, st.just(0.)),
                     'select': not_a_choice(('kendall', 'topk', 'last')), 'smooth': not_a_choice(('softplus', 'second_order')),
                     'objective': not_a_choice(('topk', 'mass_center', 'pcc', 'l1', 'l2', 'cosine', 'targeted_mse',
                                                'saliency_match', 'soft_margin', 'kl')),
                     'ig_method': not_a_choice(QUADRATURES), 'of': not_a_choice(OUTPUTS),
                     'baseline': not_a_choice(('clean',)).filter(bool), 'reduce': not_a_choice(('sum', 'mean', 'max'))}[name])
    name = 'dissimilarity' if name == 'objective' else name   # a map objective is a dissimilarity by name
    raises_naming(f'`{name}`', lambda: IFIA(0.1, 0.01, 2, **{name if name != 'dissimilarity' else 'objective': bad}))

@SETTINGS
@given(cls=st.sampled_from(ATTACKS), kind=st.sampled_from(['x', 'y', 'model']), data=st.data())
def test_attack_call(cls, kind, data):
    atk = cls(0.1, 0.05, 1, **({'ig_steps': 2, 'attack_ig_steps': 2, 'k': 4} if issubclass(cls, IFIA) else {}))
    if kind == 'x': raises_naming('`x`', lambda: atk(model(), X * data.draw(st.floats(1.1, 100)), Y))
    elif kind == 'y': raises_naming('`y`', lambda: atk(model(), X, data.draw(st.one_of(st.integers(3, 99), st.integers(-99, -1)))))
    else: raises_naming('`model`', lambda: atk(data.draw(st.sampled_from([lambda t: t, nn.Linear(3, 3), nn.Flatten(0)])), X, Y))

# ---------- evaluate ----------

@SETTINGS
@given(name=st.sampled_from(['bs', 'aa_n', 'n', 'seed', 'variant', 'protocol', 'eps', 'k']), data=st.data())
def test_evaluate_arguments(name, data):
    bad = data.draw({'bs': st.one_of(below_one, not_int, st.text(min_size=1, max_size=2)), 'aa_n': st.one_of(below_one, not_int),
                     'n': st.one_of(below_one, not_int), 'seed': st.one_of(negative, not_int), 'variant': not_a_choice(('full', 'quick')),
                     'protocol': not_a_choice(PROTOCOLS), 'eps': st.one_of(negative, not_a_number), 'k': st.one_of(below_one, not_int)}[name])
    kw = dict(protocol='synthetic', n=2, aa=False, progress=False, ifia_steps=1, ig_steps=2, attack_ig_steps=2, k=4, attack_k=4)
    raises_naming(name if name in ('protocol',) else f'`{name}`', lambda: evaluate(model(), X, Y, **(kw | {name: bad})))

# ---------- data ----------

@SETTINGS
@given(name=st.sampled_from(['name', 'bs', 'n_train', 'n_valid', 'size']), data=st.data())
def test_get_dls_arguments(name, data):
    bad = data.draw({'name': not_a_choice(DATASETS), 'bs': st.one_of(below_one, not_int), 'n_train': st.one_of(below_one, not_int),
                     'n_valid': st.one_of(below_one, not_int), 'size': st.one_of(below_one, not_int)}[name])
    raises_naming(f'`{name}`', lambda: get_dls(**{'name': 'synthetic'} | {name: bad}))

# ---------- checkpoints ----------

@SETTINGS
@given(content=st.binary(max_size=512))
def test_load_model_refuses_what_is_not_a_checkpoint(content, tmp_path_factory):
    path = tmp_path_factory.mktemp('ckpt')/'model.pth'
    path.write_bytes(content)
    raises_naming(str(path), lambda: load_model(path), (ValueError,))

def test_load_model_missing_file(tmp_path):
    raises_naming('no model checkpoint', lambda: load_model(tmp_path/'missing.pth'), (FileNotFoundError,))

# ---------- the command line: exit status 2 and one line naming the option, before any work ----------

CLI_NUMBERS = {('train', '--lr'): st.one_of(st.floats(max_value=0., allow_nan=False, allow_infinity=False), st.just('nan')),
               ('train', '--epochs'): st.integers(max_value=0), ('train', '--bs'): st.integers(max_value=0),
               ('train', '--n-train'): st.integers(max_value=0), ('train', '--n-valid'): st.integers(max_value=0),
               ('train', '--eps'): st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False),
               ('demo', '--nat-epochs'): st.integers(max_value=0), ('demo', '--aat-epochs'): st.integers(max_value=0),
               ('demo', '--n-eval'): st.integers(max_value=0)}

@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(sorted(CLI_NUMBERS)), data=st.data())
def test_cli_refuses_bad_values_in_one_line(case, data, tmp_path_factory):
    from robust_attr.cli import main
    import contextlib, io
    command, option = case
    value = data.draw(CLI_NUMBERS[case])
    out = tmp_path_factory.mktemp('cli')
    argv = [command, f'{option}={value}'] + (['--out', str(out/'m.pth')] if command=='train' else ['--out', str(out/'demo')])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e: main(argv)
    lines = err.getvalue().strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and option in lines[0], (argv, err.getvalue())
    assert not any(out.iterdir()), 'nothing may be written'
