"""Time per training step of every robust-attribution method, relative to a natural step, next to its pass-count bound.

SmallCNN, batch 50, 28×28 inputs (Fashion-MNIST when installed, else the bundled digits at 28×28), each preset
with its default settings. The bound is `robust_attr.passes.step_passes` priced with `unit_costs` measured in the
same run on the same CPU, plus the natural step's time outside its passes (optimizer step, fastai's loop). The
passes each step actually ran (counted by `CountPasses`) are reported next to the derived ones, so a wasted pass
shows even when the timings are noisy.

    python bench/train_speed.py                      # all methods, default threads
    python bench/train_speed.py --methods adv aat    # a subset (results are then written with a suffix)
    OMP_NUM_THREADS=1 python bench/train_speed.py --threads 1

Writes bench/results/train_speed.md and bench/results/train_speed.json.
"""
from __future__ import annotations
import argparse, json, os, platform, statistics, time
from dataclasses import astuple
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders

from robust_attr.data import get_arrays, fashion_mnist_path
from robust_attr.models import SmallCNN
from robust_attr.train import METHODS, robust_learner
from robust_attr.passes import CountPasses, step_passes, total_passes, unit_costs, relative_units, step_cost, pass_bound

RESULTS = Path(__file__).parent/'results'
TARGET = 1.3  # each method's step time within this factor of its pass-count bound


class StepTimer(Callback):
    "Time of each training step: attack, forward, loss, backward and optimizer step."
    order, run_valid = -101, False
    def __init__(self, clock=time.perf_counter): self.clock = clock
    def before_fit(self): self.times = []
    def before_batch(self): self._t = self.clock()
    def after_batch(self): self.times.append(self.clock() - self._t)


def batches(bs, n_batches, seed=0):
    "DataLoaders whose training set is `n_batches` batches of 28×28 images (Fashion-MNIST if installed)."
    name = 'fashion_mnist' if fashion_mnist_path() is not None else 'digits'
    x, y = get_arrays(name, 'train', n=bs*n_batches, seed=seed, **({} if name=='fashion_mnist' else {'size': 28}))
    xv, yv = x[:bs], y[:bs]
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(xv, yv)), bs=bs, shuffle=False, device='cpu', num_workers=0)
    dls.c = 10
    return dls, name


def time_method(method, bs, steps, clock, seed=0):
    "Per-step times (the first step is a warm-up and dropped) and the passes per image each step ran, for `method`."
    dls, _ = batches(bs, steps + 1, seed)
    torch.manual_seed(seed)
    learn = robust_learner(dls, method, arch=SmallCNN(10), metrics=[])
    timer, counter = StepTimer(clock), CountPasses()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[timer, counter])
    return timer.times[1:], [p * (1/bs) for p in counter.steps[1:]]


def measure_units(bs, rows_per_image, repeats, clock, seed=0):
    "Unit costs on SmallCNN with as many rows as the IG passes of a step have."
    torch.manual_seed(seed)
    n = bs * rows_per_image
    x, y = torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,))
    return unit_costs(SmallCNN(10), x, y, repeats=repeats, clock=clock)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--methods', nargs='*', default=list(METHODS), help='methods to time (default: all)')
    p.add_argument('--bs', type=int, default=50, help='batch size (FAR: 50)')
    p.add_argument('--steps', type=int, default=3, help='timed steps per method, after one warm-up step')
    p.add_argument('--natural-steps', type=int, default=20, help='timed natural steps')
    p.add_argument('--unit-rows', type=int, default=10, help='rows per image of the unit-cost batch (an IG pass of 10 points)')
    p.add_argument('--repeats', type=int, default=3, help='timings per unit cost (the fastest is kept)')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    p.add_argument('--clock', choices=('wall', 'cpu'), default='wall',
                   help="'wall' time, or this process's 'cpu' time (steadier when other jobs share the CPU; use with --threads 1)")
    p.add_argument('--out', default=None, help='results name (default: train_speed, or train_speed_<methods> for a subset)')
    p.add_argument('--markdown-only', action='store_true', help="rewrite the .md from the results' .json without timing anything")
    a = p.parse_args(argv)
    if a.markdown_only:
        path = RESULTS/f"{a.out or 'train_speed'}.json"
        return (path.with_suffix('.md')).write_text(markdown(json.loads(path.read_text())))
    if a.threads: torch.set_num_threads(a.threads)
    clock = time.perf_counter if a.clock=='wall' else time.process_time
    methods = [m for m in a.methods if m != 'natural']
    env = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
               load_before=os.getloadavg(), bs=a.bs, steps=a.steps, unit_rows=a.unit_rows, clock=a.clock, data=batches(a.bs, 1)[1])
    print(f"torch {env['torch']}, {env['threads']} threads, load {env['load_before']}", flush=True)

    units = measure_units(a.bs, a.unit_rows, a.repeats, clock)
    rel = relative_units(units)
    print(f"unit costs (forwards of the ReLU model, {units['relu'].forward*1e6:.0f} µs per forward row):",
          {k: tuple(round(v, 2) for v in astuple(u)) for k, u in rel.items()}, flush=True)
    nat_before, nat_counted = time_method('natural', a.bs, a.natural_steps, clock)
    print(f'natural: {statistics.median(nat_before)*1000:.1f} ms/step (median of {len(nat_before)})', flush=True)
    timed = {}
    for m in methods:
        timed[m] = time_method(m, a.bs, a.steps, clock)
        print(f"{m:12s} {statistics.median(timed[m][0])*1000:9.1f} ms/step, passes run {fmt(timed[m][1][-1])} "
              f"vs {fmt(total_passes(step_passes(m)))} derived", flush=True)
    nat_after, _ = time_method('natural', a.bs, a.natural_steps, clock)
    print(f'natural again: {statistics.median(nat_after)*1000:.1f} ms/step (median)', flush=True)
    env['load_after'] = os.getloadavg()

    nat_times = nat_before + nat_after  # the natural step timed before and after the methods, pooled against drift
    t_nat = statistics.median(nat_times)
    overhead = max(t_nat / a.bs - step_cost(step_passes('natural'), units), 0.)
    rows = [method_row(m, *timed[m], t_nat, min(nat_times), units, overhead) for m in methods]
    for r in rows: print(f"{r['method']:12s} ×{r['ratio']:7.2f} (min ×{r['ratio_min']:7.2f})  bound ×{r['bound']:7.2f}  "
                         f"measured / bound {r['over_bound']:.2f} ({r['over_bound_min']:.2f})")
    out = dict(env=env, units_relative={k: astuple(u) for k, u in rel.items()}, us_per_forward_row=units['relu'].forward*1e6,
               natural=dict(ms_per_step=round(1000*t_nat, 1), ms_before=round(1000*statistics.median(nat_before), 1),
                            ms_after=round(1000*statistics.median(nat_after), 1), min_ms=round(1000*min(nat_times), 1),
                            overhead_ms=round(1000*overhead*a.bs, 1), counted=astuple(nat_counted[-1])),
               methods=rows, target=TARGET)
    name = a.out or ('train_speed' if set(methods) >= set(METHODS) - {'natural'} else 'train_speed_' + '_'.join(methods))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS/f'{name}.json').write_text(json.dumps(out, indent=1))
    (RESULTS/f'{name}.md').write_text(markdown(out))
    print(f'wrote {RESULTS/name}.md and .json')


def method_row(m, times, counted, t_nat, min_nat, units, overhead):
    "One method's results: times relative to a natural step, its pass-count bound, derived and counted passes."
    passes, tot = step_passes(m), total_passes(step_passes(m))
    bound, pure = pass_bound(passes, units, overhead), pass_bound(passes, units)
    ratio, ratio_min = statistics.median(times) / t_nat, min(times) / min_nat
    reuse = 1 - step_cost(step_passes(m, reuse_endpoint=True), units) / step_cost(passes, units)
    return dict(method=m, ms_per_step=round(1000*statistics.median(times), 1), ratio=round(ratio, 2), ratio_min=round(ratio_min, 2),
                bound=round(bound, 2), pass_ratio=round(pure, 2), over_bound=round(ratio / bound, 2),
                over_bound_min=round(ratio_min / bound, 2), forward=tot.forward, backward=tot.backward,
                double_backward=tot.double_backward, counted=astuple(counted[-1]), reuse_endpoint_saving=round(reuse, 4),
                passes={net: astuple(q) for net, q in passes.items()}, times_ms=[round(1000*t, 1) for t in times])


def fmt(p): return ' / '.join(f'{v:g}' for v in astuple(p))


def markdown(out):
    e, u = out['env'], out['units_relative']
    lines = [f"# Training step time relative to a natural step (`bench/train_speed.py`)", "",
             f"SmallCNN, batch {e['bs']}, 28×28 {e['data']}, each method's preset defaults; torch {e['torch']}, "
             f"{e['threads']} threads, {e['clock']} time, load average {tuple(round(l, 2) for l in e['load_before'])} before and "
             f"{tuple(round(l, 2) for l in e['load_after'])} after; {e['steps']} timed step(s) per method after a warm-up.", "",
             f"Unit costs per row (`unit_costs`, on {e['bs']}×{e['unit_rows']} rows, the size of an IG pass), in forwards of the "
             f"ReLU model ({out['us_per_forward_row']:.0f} µs per forward row):", "",
             "| network | forward | backward | double-backward |", "|---|---|---|---|"]
    lines += [f"| {k} | {v[0]:.2f} | {v[1]:.2f} | {v[2]:.2f} |" for k, v in u.items()]
    lines += ["", f"Natural step: {out['natural']['ms_per_step']} ms (median of the steps timed before the methods, "
              f"{out['natural']['ms_before']} ms, and after them, {out['natural']['ms_after']} ms), {out['natural']['min_ms']} ms fastest; "
              f"{out['natural']['overhead_ms']} ms of it is outside the passes (optimizer step, fastai's loop) and is added to every "
              "method's bound as the same overhead.", "",
              "Passes per training image (forward / backward / double-backward, all networks) as derived (`step_passes`) and as "
              "counted in the last timed step (`CountPasses`; the extra 0.02 forward is the one row each attack call uses to "
              "check the labels, PGD's extra 2 forwards its scoring; AAT's IFIA stops attacking an image whose prediction "
              "flips, so it may run fewer), the bound they give, and the "
              "measured step time (median; fastest in parentheses), both relative to a natural step. "
              f"Target: measured / bound ≤ {out['target']}.", "",
              "'passes alone' is the bound without the overhead; 'α=1 reuse' is the share of the passes' time that reading "
              "forwards off the IG passes' last rows would save (`step_passes(..., reuse_endpoint=True)`, not implemented).", "",
              "| method | passes F / B / DB | passes run | passes alone | bound | measured | measured / bound | α=1 reuse |",
              "|---|---|---|---|---|---|---|---|"]
    for r in out['methods']:
        lines.append(f"| {r['method']} | {r['forward']:g} / {r['backward']:g} / {r['double_backward']:g} | {' / '.join(f'{v:g}' for v in r['counted'])} | "
                     f"×{r['pass_ratio']:.1f} | ×{r['bound']:.1f} | ×{r['ratio']:.1f} (×{r['ratio_min']:.1f}) | "
                     f"{r['over_bound']:.2f} ({r['over_bound_min']:.2f}) | {r['reuse_endpoint_saving']:.1%} |")
    return '\n'.join(lines) + '\n'


if __name__ == '__main__': main()
