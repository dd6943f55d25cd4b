"""Weakly supervised localization on the synthetic shapes: a natural, an AAT and an adversarially trained
SmallCNN, ART's box recipe on their gradient and IG maps, against a centred-box baseline.

Same settings as the slow cells of nbs/tutorials/localization.ipynb. Run from the repository root:

    OMP_NUM_THREADS=1 python bench/localization.py     # 24 min wall on a shared 2-core machine at load ~10

Writes bench/results/localization.json and prints the tables.
"""
import json, os, platform, time
from pathlib import Path
import torch
from fastai.torch_core import set_seed
from robust_attr.data import get_dls
from robust_attr.train import robust_learner
from robust_attr.evaluate import get_protocol, protocol_attacks, first_correct, bootstrap_ci
from robust_attr.localize import (localization_arrays, localization_metrics, attribution_maps, saliency_heatmap, predict,
                                  heatmap_to_box, iou, centered_boxes, object_alignment, LOCALIZATION_COLUMNS)

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
ATTRIBUTIONS = {'gradient': ('saliency', {}), 'IG': ('ig', dict(steps=50))}


def train_models(seed=0):
    "Nat (6 epochs, 2000 images); AAT and Adv fine-tuned from it (1000 images); returns models and seconds."
    set_seed(seed)
    dls = get_dls('synthetic', bs=64, n_train=2000)
    t = time.time(); nat = robust_learner(dls, 'natural')
    with nat.no_bar(), nat.no_logging(): nat.fit(6, 1e-3)
    secs = {'Nat': time.time() - t}
    small = get_dls('synthetic', bs=64, n_train=1000)
    t = time.time(); aat = robust_learner(small, 'aat', init=nat.model, lr=1e-3, eps=0.1, steps=3, ig_steps=5)
    with aat.no_bar(), aat.no_logging(): aat.fit(1)
    secs['AAT'] = time.time() - t
    t = time.time(); adv = robust_learner(small, 'adv', init=nat.model, lr=1e-3, eps=0.1, step_size=0.025, steps=5)
    with adv.no_bar(), adv.no_logging(): adv.fit(2)
    secs['Adv'] = time.time() - t
    return {'Nat': nat.model.eval(), 'AAT': aat.model.eval(), 'Adv': adv.model.eval()}, secs


def threshold_curve(model, x, y, boxes, attribution='saliency', **kwargs):
    "Mean box IoU at each threshold of `THRESHOLDS` (heat maps computed once)."
    heat = saliency_heatmap(attribution_maps(model, x, y, attribution, **kwargs))
    return [iou(heatmap_to_box(heat, t), boxes).mean().item() for t in THRESHOLDS]


def object_aa(model, x, y, masks, n=50, k=50):
    "Object-as-reference AA-Top-K / AA-Kendall (teacher paper Table 5) under the quick synthetic IFIA."
    p = get_protocol('synthetic', 'quick', n=n, ifia_steps=30)
    _, ifia = protocol_attacks(p)
    idx, _ = first_correct(model, x, y, n)
    xa = ifia(model, x[idx], y[idx])
    clean, adv = ifia.measure_map(model, x[idx], y[idx]), ifia.measure_map(model, xa, y[idx])
    r = object_alignment(clean, masks[idx], k=k, after=adv)
    return {key: r[key].mean().item() for key in ('topk', 'kendall', 'AA_topk', 'AA_kendall')}


def main():
    start, load = time.time(), os.getloadavg()
    models, train_seconds = train_models()
    x, y, masks, boxes = localization_arrays('synthetic', 'valid', n=200)
    out = dict(settings=dict(data="localization_arrays('synthetic', 'valid', n=200)", threshold=0.2, seg_threshold=0.2,
                             thresholds=THRESHOLDS, object_aa="quick synthetic IFIA, 30 steps, first 50 correct, k=50"),
               train_seconds=train_seconds, accuracy={}, results={}, curves={}, object_aa={})
    for name, model in models.items():
        for att, (fn, kw) in ATTRIBUTIONS.items():
            r = localization_metrics(model, x, y, masks=masks, attribution=fn, **kw)
            per = r.pop('per_sample')
            r.update({f'{c}_ci95': bootstrap_ci(per[c]) for c in ('loc_IoU', 'GT_known_loc', 'seg_IoU')})
            out['results'][f'{name} / {att}'] = r
            out['curves'][f'{name} / {att}'] = threshold_curve(model, x, y, boxes, fn, **kw)
        out['object_aa'][name] = object_aa(model, x, y, masks)
        out['accuracy'][name] = (predict(model, x) == y).float().mean().item()
    out['curves']['centred box'] = [iou(centered_boxes(boxes, 28, 28), boxes).mean().item()] * len(THRESHOLDS)
    out['env'] = dict(torch=torch.__version__, python=platform.python_version(), load_before=load, load_after=os.getloadavg(),
                      threads=torch.get_num_threads(), seconds=time.time() - start)
    Path('bench/results').mkdir(parents=True, exist_ok=True)
    Path('bench/results/localization.json').write_text(json.dumps(out, indent=1))
    cols = LOCALIZATION_COLUMNS
    print(f"{'':16}" + ''.join(f'{c:>14}' for c in cols))
    for k, r in out['results'].items(): print(f'{k:16}' + ''.join(f'{r[c]:14.3f}' for c in cols))
    print('\nmean box IoU by threshold', THRESHOLDS)
    for k, v in out['curves'].items(): print(f'{k:16}' + ''.join(f'{a:7.3f}' for a in v))
    print('\nloc_IoU 95% CI', {k: tuple(round(v, 3) for v in r['loc_IoU_ci95']) for k, r in out['results'].items()})
    print('accuracy', out['accuracy'])
    print('\nobject as reference (IG maps, IFIA)', out['object_aa'])
    print('train seconds', train_seconds, 'load', load, '->', out['env']['load_after'])


if __name__ == '__main__':
    main()
