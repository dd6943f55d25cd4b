"""Stale BatchNorm statistics after robust fine-tuning, and `train.RecomputeBatchNormStats`.

    python bench/batchnorm_stats.py            # about 5 minutes on one CPU thread

A SmallCNN-like network with BatchNorm after each layer (conv-BN-ReLU-pool twice, linear-BN-ReLU, linear) is trained
naturally on the bundled digits (4 epochs), then fine-tuned with the demo's AAT (λ = 5, a one-step IFIA on 4-point IG
maps, lr 1e-3, one epoch, bf16 inner steps where the CPU has them) for three seeds of the batch order and random starts,
each twice from the same weights and seed: without and with `RecomputeBatchNormStats` in `cbs`. Each fine-tuned model is validated three ways: in eval mode with its running
statistics (what `validate`, the attacks and a deployment use), with the validation set's own statistics (all 359 digits
as one batch), and in eval mode after recomputing the running statistics over all training batches.
Writes bench/results/batchnorm_stats.{md,json}.
"""
from __future__ import annotations
import copy, sys
from pathlib import Path
import torch
import torch.nn as nn
sys.path.insert(0, str(Path(__file__).resolve().parent))
SEEDS = (0, 1, 2)
from _env import env_info, load, write, set_threads, timed, with_notes

def bn_cnn(n_classes=10):
    "Conv-BN-ReLU-pool ×2, linear-BN-ReLU, linear: SmallCNN's shape with BatchNorm after each layer."
    return nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64*7*7, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, n_classes))

def accuracies(model, dls):
    "Validation accuracy with the running statistics, with the validation set's own statistics, and after recomputing the running ones."
    from robust_attr.train import recompute_batchnorm_stats
    x, y = (torch.cat(t) for t in zip(*dls.valid.new(shuffle=False, drop_last=False)))
    def acc(m):
        with torch.no_grad(): return float((m.eval()(x).argmax(1) == y).float().mean())
    own = copy.deepcopy(model)
    for b in own.modules():   # without running buffers, BatchNorm normalizes by the batch's own statistics in eval mode too
        if isinstance(b, nn.modules.batchnorm._BatchNorm): b.track_running_stats, b.running_mean, b.running_var = False, None, None
    recomputed = copy.deepcopy(model)
    recompute_batchnorm_stats(recomputed, dls.train.new(shuffle=False, drop_last=False))
    return dict(running=acc(copy.deepcopy(model)), batch=acc(own), recomputed=acc(recomputed))

def main():
    from fastai.torch_core import set_seed
    from robust_attr.data import get_dls
    from robust_attr.train import robust_learner, RecomputeBatchNormStats
    from robust_attr.cli import native_bf16, DEMO_AAT
    set_threads(1)
    r = dict(env=env_info(), load_before=load(), aat_settings=DEMO_AAT, precision=native_bf16())
    set_seed(0)
    dls = get_dls('digits', bs=64, seed=0)
    nat = robust_learner(dls, 'natural', arch=bn_cnn(), lr=1e-3)
    with nat.no_bar(), nat.no_logging(): nat.fit(4)
    r['natural'] = accuracies(nat.model, dls)
    for seed in SEEDS:   # the fine-tuning's batch order and random starts; the same natural model each time
        for name, cbs in (('aat', []), ('aat_recomputed_stats', [RecomputeBatchNormStats()])):
            set_seed(seed)
            dls = get_dls('digits', bs=64, seed=seed)   # fresh: the same shuffling in both runs, so the same weights
            learn = robust_learner(dls, 'aat', arch=copy.deepcopy(nat.model), lr=1e-3, seed=seed, precision=r['precision'], cbs=cbs, **DEMO_AAT)
            with learn.no_bar(), learn.no_logging(): _, s = timed(learn.fit, 1)
            r.setdefault(name, []).append(accuracies(learn.model, dls) | dict(seconds=round(s, 1), seed=seed))
            print(name, r[name][-1], flush=True)
    r['load_after'] = load()
    e = r['env']
    lines = ["# Stale BatchNorm statistics after robust fine-tuning (`bench/batchnorm_stats.py`)", "",
             f"Command: `{e['command']}`; torch {e['torch']}, {e['threads']} thread(s); load average {tuple(r['load_before'])} before, "
             f"{tuple(r['load_after'])} after; {e['date']}.", "",
             f"SmallCNN-like network with BatchNorm after each layer, digits (28×28), natural training 4 epochs, then the demo's AAT "
             f"({r['aat_settings']}, lr 1e-3, one epoch, inner steps {r['precision']}) from the same weights and seed, without and with "
             "`RecomputeBatchNormStats()` (50 training batches: here all 23). Validation accuracy on the 359 validation digits:", "",
             "| model | fine-tuning seed | running statistics (eval mode: validate, attacks, deployment) | the validation set's own statistics | running statistics recomputed on the training data |",
             "|---|---|---|---|---|"]
    a = r['natural']
    lines.append(f"| natural | — | {a['running']:.3f} | {a['batch']:.3f} | {a['recomputed']:.3f} |")
    for name, label in (('aat', 'AAT'), ('aat_recomputed_stats', 'AAT with `RecomputeBatchNormStats`')):
        for a in r[name]: lines.append(f"| {label} | {a['seed']} | {a['running']:.3f} | {a['batch']:.3f} | {a['recomputed']:.3f} |")
    lines += ["", "The fine-tuned weights classify as well as the natural ones once BatchNorm uses statistics that match them; "
              "the running averages (momentum 0.1) lag weights that robust fine-tuning moves fast. The callback recomputes them at "
              "the end of each training epoch. Both fine-tuning runs see the same batches in the same order (fresh, seeded "
              "DataLoaders), so they end with the same weights: the callback's accuracy equals the first run's after recomputation.", ""]
    write('batchnorm_stats', r, with_notes(lines, r))

if __name__ == '__main__': main()
