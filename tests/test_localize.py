"Property tests of `robust_attr.localize` against brute-force references, and `evaluate(..., localization=True)`."
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from robust_attr.localize import (largest_component, mask_to_box, saliency_to_box, saliency_to_mask, saliency_heatmap,
                                  iou, object_topk, object_alignment, localization_metrics, localization_arrays,
                                  LOCALIZATION_COLUMNS)

masks_st = st.integers(1, 4).flatmap(lambda b: st.tuples(st.integers(1, 9), st.integers(1, 9)).flatmap(
    lambda hw: arrays(np.bool_, (b, *hw))))


def components(mask: np.ndarray, connectivity: int):
    "Connected components of one 2-D mask by breadth-first search, in raster order of their first pixel."
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)] + ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if connectivity == 8 else [])
    seen, comps = np.zeros_like(mask), []
    for r, c in zip(*np.nonzero(mask)):
        if seen[r, c]: continue
        comp, todo = [], deque([(r, c)])
        seen[r, c] = True
        while todo:
            i, j = todo.popleft(); comp.append((i, j))
            for di, dj in steps:
                u, v = i + di, j + dj
                if 0 <= u < mask.shape[0] and 0 <= v < mask.shape[1] and mask[u, v] and not seen[u, v]:
                    seen[u, v] = True; todo.append((u, v))
        comps.append(comp)
    return comps


def largest_reference(mask: np.ndarray, connectivity: int):
    "The largest component; ties to the one whose first pixel comes first in raster order."
    out = np.zeros_like(mask)
    comps = components(mask, connectivity)
    if comps:
        best = max(comps, key=len)            # max keeps the first of equal sizes, i.e. raster order
        out[tuple(np.array(best).T)] = True
    return out


@settings(max_examples=60, deadline=None)
@given(masks_st, st.sampled_from([4, 8]))
def test_largest_component_matches_breadth_first_search(m, connectivity):
    got = largest_component(torch.from_numpy(m), connectivity).numpy()
    want = np.stack([largest_reference(mi, connectivity) for mi in m])
    np.testing.assert_array_equal(got, want)


@settings(max_examples=60, deadline=None)
@given(masks_st)
def test_mask_to_box_is_the_tight_pixel_edge_box(m):
    boxes = mask_to_box(torch.from_numpy(m))
    for mi, b in zip(m, boxes.tolist()):
        if not mi.any():
            assert b == [0, 0, 0, 0]; continue
        rows, cols = np.nonzero(mi)
        assert b == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(2, 10), st.integers(2, 10), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_box_is_batch_independent_and_holds_a_hot_component(b, h, w, threshold, seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(b, 3, h, w, generator=g) * (torch.rand(b, 1, 1, 1, generator=g) > 0.2)   # some maps all zero
    boxes = saliency_to_box(maps, threshold)
    single = torch.cat([saliency_to_box(maps[i:i + 1], threshold) for i in range(b)])
    torch.testing.assert_close(boxes, single)
    heat, mask = saliency_heatmap(maps), saliency_to_mask(maps, threshold, largest=True)
    for i in range(b):
        x1, y1, x2, y2 = boxes[i].long().tolist()
        if not mask[i].any():
            assert (x1, y1, x2, y2) == (0, 0, 0, 0) and heat[i].max() < threshold; continue
        inside = torch.zeros(h, w, dtype=torch.bool); inside[y1:y2, x1:x2] = True
        assert not (mask[i] & ~inside).any()                        # the component lies in its box
        assert (heat[i][mask[i]] >= threshold).all()
        assert mask[i][y1].any() and mask[i][y2 - 1].any() and mask[i][:, x1].any() and mask[i][:, x2 - 1].any()


rects_st = st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8), st.integers(0, 8), st.integers(0, 8)), min_size=2, max_size=8)


def raster(r):
    x1, x2, y1, y2 = min(r[0], r[1]), max(r[0], r[1]), min(r[2], r[3]), max(r[2], r[3])
    m = torch.zeros(8, 8, dtype=torch.bool); m[y1:y2, x1:x2] = True
    return m, torch.tensor([x1, y1, x2, y2], dtype=torch.float32) if m.any() else torch.zeros(4)


@settings(max_examples=60, deadline=None)
@given(rects_st)
def test_box_iou_equals_mask_iou_of_rasterized_rectangles(rects):
    ms, bs = zip(*map(raster, rects))
    ma, mb, ba, bb = torch.stack(ms[:-1]), torch.stack(ms[1:]), torch.stack(bs[:-1]), torch.stack(bs[1:])
    torch.testing.assert_close(iou(ba, bb), iou(ma, mb))
    torch.testing.assert_close(iou(ba, bb), iou(bb, ba))
    assert ((iou(ma, mb) >= 0) & (iou(ma, mb) <= 1)).all()
    torch.testing.assert_close(iou(ma, ma), ma.flatten(1).any(1).float())      # 1 unless empty


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(2, 30), st.one_of(st.none(), st.integers(1, 30)), st.integers(0, 2**31 - 1))
def test_object_topk_matches_sorting(b, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randint(0, 4, (b, 1, n), generator=g).float()                 # many ties
    masks = torch.rand(b, 1, n, generator=g) > 0.5
    if k is not None and k > n: k = n
    got = object_topk(maps, masks, k)
    for i in range(b):
        order = sorted(range(n), key=lambda j: (-maps[i, 0, j].item(), j))
        area = int(masks[i].sum())
        kk = area if k is None else k
        hit = sum(bool(masks[i, 0, j]) for j in order[:kk])
        assert got[i].item() == pytest.approx(hit / max(min(kk, area), 1))


def test_object_alignment_prefers_the_object_over_a_shifted_map():
    x, y, m, _ = localization_arrays('synthetic', n=16, size=20)
    on, off = object_alignment(m.float(), m), object_alignment(m.roll(8, -1).float(), m)
    assert (on['topk'] == 1).all() and (on['kendall'] > off['kendall']).all() and (on['spearman'] > off['spearman']).all()


def test_localization_arrays_synthetic_rgb_boxes_fit_masks():
    x, y, m, b = localization_arrays('synthetic_rgb', n=5, size=16)
    assert x.shape == (5, 3, 16, 16) and m.shape == (5, 16, 16)
    torch.testing.assert_close(b, mask_to_box(m))


def template_model(masks: torch.Tensor, n_classes: int):
    "A linear model whose class-c weights are the mask of the first sample of class c (so its saliency is that mask)."
    lin = nn.Linear(masks[0].numel(), n_classes, bias=False)
    return nn.Sequential(nn.Flatten(), lin), lin


def test_evaluate_with_localization_adds_columns_and_per_sample_values():
    from robust_attr.evaluate import evaluate, results_frame
    x, y, m, b = localization_arrays('synthetic', n=12, size=12, seed=1)
    model, lin = template_model(m, 4)
    with torch.no_grad(): lin.weight.copy_(torch.randn(4, 144) * 0.1)
    small = dict(ifia_steps=2, ig_steps=4, attack_ig_steps=2, pgd_steps=2, pgd_step_size=0.05, k=8, attack_k=8)
    res = evaluate(model, x, y, 'synthetic', n=4, bs=8, aa=False, progress=False, localization=True, masks=m, **small)
    assert set(LOCALIZATION_COLUMNS) <= set(res)
    assert len(res['per_sample']['loc_IoU']) == 12 and len(res['per_sample']['CO']) == res['n']
    assert set(LOCALIZATION_COLUMNS) <= set(results_frame(res).columns)
    res = evaluate(model, x, y, 'synthetic', n=4, bs=8, aa=False, progress=False, localization=dict(threshold=0.5),
                   boxes=b, **small)
    assert 'loc_IoU' in res and 'seg_IoU' not in res
    with pytest.raises(ValueError, match='localization needs ground truth'):
        evaluate(model, x, y, 'synthetic', n=4, bs=8, aa=False, progress=False, localization=True, **small)


def test_localization_metrics_give_perfect_scores_to_the_object_template():
    x, y, m, b = localization_arrays('synthetic', n=8, size=16, seed=3)
    # one template per sample: a model with one class per sample whose weights are that sample's mask
    model, lin = template_model(m, len(m))
    with torch.no_grad(): lin.weight.copy_(m.flatten(1).float())
    res = localization_metrics(model, x, torch.arange(len(m)), masks=m, threshold=1.0, seg_threshold=1.0, smooth=1)
    assert res['obj_topk'] == 1 and res['seg_IoU'] == 1
    assert res['loc_IoU'] > res['center_IoU']


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_boxes_and_masks_stay_on_the_device():
    maps = torch.rand(3, 1, 8, 8, device='cuda')
    assert saliency_to_box(maps).device == maps.device and saliency_to_mask(maps, largest=True).device == maps.device
