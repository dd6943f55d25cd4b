"Property tests for `robust_attr.metrics`: rank correlations against scipy, top-k against sets."
import itertools, warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from robust_attr.metrics import (_count_inversions, aa_kendall, aa_spearman, aa_topk, average_ranks,
                                 kendall_tau, spearman, topk_intersection)

NAN = float('nan')
BACKENDS = ('torch', 'scipy')
shapes = st.tuples(st.integers(1, 4), st.integers(1, 40))

def scipy_rows(f, a, b):
    "`f(x, y).statistic` for each pair of rows, as a float64 tensor (NaN where scipy says undefined)."
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return torch.tensor([f(x, y).statistic for x,y in zip(a.double().numpy(), b.double().numpy())], dtype=torch.float64)

@st.composite
def tied_pairs(draw, max_value=None):
    "Two `(B, n)` float64 batches of small integers: ties everywhere, constant rows when `max_value` is 0."
    shape = draw(shapes)
    hi = draw(st.integers(0, 5)) if max_value is None else max_value
    elems = st.integers(0, hi).map(float)
    a,b = (torch.from_numpy(draw(hnp.arrays(np.float64, shape, elements=elems))) for _ in range(2))
    return a, b

@st.composite
def float_pairs(draw):
    "Two `(B, n)` batches of arbitrary finite floats (signed zeros, huge and tiny magnitudes included)."
    shape = draw(shapes)
    elems = st.floats(allow_nan=False, allow_infinity=False)
    a,b = (torch.from_numpy(draw(hnp.arrays(np.float64, shape, elements=elems))) for _ in range(2))
    return a, b

def assert_close_nan(actual, expected, atol=1e-6):
    "Equal within `atol`, with NaN in the same places."
    expected = expected.to(actual.dtype)
    assert torch.equal(actual.isnan(), expected.isnan()), (actual, expected)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, equal_nan=True)

# --- Kendall's tau-b -------------------------------------------------------------------------------

@pytest.mark.parametrize('backend', BACKENDS)
@settings(max_examples=150, deadline=None)
@given(pair=tied_pairs())
def test_kendall_matches_scipy_with_ties(pair, backend):
    a,b = pair
    assert_close_nan(kendall_tau(a, b, undefined=NAN, backend=backend), scipy_rows(stats.kendalltau, a, b))

@settings(max_examples=100, deadline=None)
@given(pair=float_pairs())
def test_kendall_matches_scipy_on_arbitrary_floats(pair):
    a,b = pair
    assert_close_nan(kendall_tau(a, b, undefined=NAN, backend='torch'), scipy_rows(stats.kendalltau, a, b))

@settings(max_examples=50, deadline=None)
@given(pair=tied_pairs(max_value=0))
def test_kendall_constant_maps_give_undefined(pair):
    const,_ = pair
    b = torch.rand_like(const)
    for backend in BACKENDS:
        torch.testing.assert_close(kendall_tau(const, b, backend=backend), torch.zeros(const.shape[0], dtype=torch.float64))
        assert kendall_tau(b, const, undefined=NAN, backend=backend).isnan().all()
        torch.testing.assert_close(kendall_tau(const, b, undefined=-3., backend=backend), torch.full((const.shape[0],), -3., dtype=torch.float64))

@settings(max_examples=100, deadline=None)
@given(pair=tied_pairs())
def test_kendall_backends_agree_and_tau_is_symmetric(pair):
    a,b = pair
    t = kendall_tau(a, b, backend='torch')
    torch.testing.assert_close(t, kendall_tau(a, b, backend='scipy'), atol=1e-12, rtol=0)
    torch.testing.assert_close(t, kendall_tau(b, a, backend='torch'), atol=1e-12, rtol=0)
    assert ((t >= -1) & (t <= 1)).all()

@settings(max_examples=100, deadline=None)
@given(pair=tied_pairs(), seed=st.integers(0, 2**16))
def test_kendall_is_invariant_to_monotone_maps_and_pixel_permutations(pair, seed):
    a,b = pair
    t = kendall_tau(a, b, backend='torch')
    torch.testing.assert_close(kendall_tau(3*a.exp() - 1, b.pow(3), backend='torch'), t, atol=1e-12, rtol=0)
    torch.testing.assert_close(kendall_tau(-a, b, backend='torch'), -t, atol=1e-12, rtol=0)
    perm = torch.randperm(a.shape[1], generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(kendall_tau(a[:, perm], b[:, perm], backend='torch'), t, atol=1e-12, rtol=0)

def test_kendall_treats_signed_zeros_as_ties():
    a = torch.tensor([[0., -0., 0., -0., 1., 2.]], dtype=torch.float64)
    b = torch.tensor([[3., 1., 2., 4., 0., 5.]], dtype=torch.float64)
    for backend in BACKENDS:
        torch.testing.assert_close(kendall_tau(a, b, backend=backend), scipy_rows(stats.kendalltau, a, b))
        torch.testing.assert_close(kendall_tau(b, a, backend=backend), scipy_rows(stats.kendalltau, b, a))

@pytest.mark.parametrize('n', [784, 4097])
def test_kendall_matches_scipy_on_map_sized_inputs(n):
    g = torch.Generator().manual_seed(n)
    a = torch.rand(3, n, generator=g, dtype=torch.float64).mul(50).round()   # ties, as in a quantized map
    b = (a + torch.rand(3, n, generator=g, dtype=torch.float64).mul(30)).round()
    expected = scipy_rows(stats.kendalltau, a, b)
    for backend in ('torch', 'scipy', 'auto'):
        torch.testing.assert_close(kendall_tau(a, b, backend=backend), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(kendall_tau(a.float(), b.float()), expected.float(), atol=1e-6, rtol=0)

@settings(max_examples=100, deadline=None)
@given(perms=st.integers(1, 40).flatmap(lambda n: st.lists(st.permutations(range(n)), min_size=1, max_size=4)))
def test_count_inversions_matches_pairwise_count(perms):
    expected = [sum(p[i] > p[j] for i,j in itertools.combinations(range(len(p)), 2)) for p in perms]
    assert _count_inversions(torch.tensor(perms)).tolist() == expected

# --- Spearman and ranks ----------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(pair=tied_pairs())
def test_spearman_matches_scipy_with_ties(pair):
    a,b = pair
    assert_close_nan(spearman(a, b, undefined=NAN), scipy_rows(stats.spearmanr, a, b))

@settings(max_examples=100, deadline=None)
@given(pair=float_pairs())
def test_spearman_matches_scipy_on_arbitrary_floats(pair):
    a,b = pair
    assert_close_nan(spearman(a, b, undefined=NAN), scipy_rows(stats.spearmanr, a, b))

@settings(max_examples=100, deadline=None)
@given(pair=tied_pairs())
def test_average_ranks_match_scipy_rankdata(pair):
    a,_ = pair
    expected = torch.from_numpy(stats.rankdata(a.numpy(), axis=1))
    assert torch.equal(average_ranks(a), expected)

@settings(max_examples=50, deadline=None)
@given(pair=tied_pairs(max_value=0))
def test_spearman_constant_maps_give_undefined(pair):
    const,_ = pair
    b = torch.rand_like(const)
    torch.testing.assert_close(spearman(const, b), torch.zeros(const.shape[0], dtype=torch.float64))
    assert spearman(b, const, undefined=NAN).isnan().all()

# --- Top-k intersection and AA metrics -------------------------------------------------------------

def topk_sets(a, k):
    return [set(row.argsort(descending=True)[:k].tolist()) for row in a]

@st.composite
def distinct_maps_and_k(draw):
    "Three `(B, ...)` batches of distinct values (top-k sets unambiguous) and a valid `k`."
    B, shape = draw(st.integers(1, 4)), draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    n = int(np.prod(shape))
    maps = [torch.stack([torch.tensor(draw(st.permutations(range(n))), dtype=torch.float32) for _ in range(B)]).view(B, *shape)
            for _ in range(3)]
    return (*maps, draw(st.integers(1, n)))

@settings(max_examples=150, deadline=None)
@given(data=distinct_maps_and_k())
def test_topk_intersection_matches_set_reference(data):
    a,b,_,k = data
    sa,sb = topk_sets(a.flatten(1), k), topk_sets(b.flatten(1), k)
    expected = torch.tensor([len(x & y)/k for x,y in zip(sa, sb)])
    torch.testing.assert_close(topk_intersection(a, b, k), expected)
    torch.testing.assert_close(topk_intersection(b, a, k), expected)

@settings(max_examples=100, deadline=None)
@given(data=distinct_maps_and_k())
def test_aa_metrics_are_goodness_times_stability(data):
    ref,before,after,k = data
    sr,sb,sa = (topk_sets(m.flatten(1), k) for m in (ref, before, after))
    expected = torch.tensor([len(x & y)/k * len(y & z)/k for x,y,z in zip(sr, sb, sa)])
    torch.testing.assert_close(aa_topk(ref, before, after, k), expected)
    r,b,a = (m.flatten(1).double() for m in (ref, before, after))
    tau = lambda x, y: scipy_rows(stats.kendalltau, x, y).nan_to_num(0.)
    rho = lambda x, y: scipy_rows(stats.spearmanr, x, y).nan_to_num(0.)
    torch.testing.assert_close(aa_kendall(ref, before, after).double(), tau(r, b) * tau(b, a), atol=1e-6, rtol=0)
    torch.testing.assert_close(aa_spearman(ref, before, after).double(), rho(r, b) * rho(b, a), atol=1e-6, rtol=0)

# --- Bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize('f', [kendall_tau, spearman, lambda a, b: topk_intersection(a, b, 2)])
def test_metrics_reject_bad_maps(f):
    a = torch.rand(2, 5)
    with pytest.raises(ValueError, match='must have the same shape'): f(a, torch.rand(2, 6))
    with pytest.raises(ValueError, match='`b` contains NaN or inf'): f(a, a.clone().index_fill_(1, torch.tensor([1]), float('inf')))
    with pytest.raises(TypeError, match='`a` must be a torch.Tensor'): f(a.numpy(), a)
    with pytest.raises(ValueError, match='at least 2 dims'): f(a[0], a[1])
