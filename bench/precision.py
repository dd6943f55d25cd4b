"""fp32 vs bf16 inner steps (issue 18): IFIA evaluation and one training step of every method, interleaved in one run.

    python bench/precision.py                  # 100 images, quick protocol; every method's step (about 30 min at 1 thread)
    python bench/precision.py --quick          # smoke run: 4 images, 2 IFIA steps, the cheap methods (results *_quick)
    python bench/precision.py --only eval      # just the evaluation part (or --only train)

Evaluation: the Fashion-MNIST quick protocol (nbs/protocol.ipynb: ε = 0.1, IFIA 40 steps × 0.01, top-100 mask,
50 IG points measured, 10 attacked, softplus β = 1) on the first `--n` correctly classified test images of the
committed natural SmallCNN (`bench/models/far_quick_seed42/nat.pth`, the natural row of the Fashion-MNIST
table), AA off. The images are split into chunks of `--chunk`; each chunk is evaluated with the attack's
inner steps in fp32 and in bf16 (`IFIA(precision=...)`), the order alternating between chunks, so both
see the same machine load. Time and the per-image IN / CO are pooled over the chunks. Everything that is
measured (clean and attacked maps, IN, CO, the validity check) is fp32 in both runs.

Training: one step of every method's preset (its default settings, `robust_learner(dls, method,
precision=...)`), fine-tuning the committed natural SmallCNN (as FAR does), batch 50, Fashion-MNIST training
images, fp32 and bf16 in alternating order, each after one warm-up step on another batch, from the same
weights and seed; a step is timed from before the method's attack to after the optimizer's step. The regularizer value
(`{term}_reg`, fp32 in both: it is the training map's dissimilarity at the attacked point) and the training
loss are read per step.

Writes bench/results/precision.{md,json} (--quick: precision_quick.*).
"""
from __future__ import annotations
import dataclasses, json, statistics, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import env_info, load, write, set_threads, timed, with_notes, fashion_mnist_model, RESULTS
import robust_attr.evaluate as E
import robust_attr.attacks as A
from robust_attr.data import get_arrays
from robust_attr.evaluate import evaluate, get_protocol, first_correct, Protocol, bootstrap_ci, format_interval
from robust_attr.models import load_model
from robust_attr.train import METHODS, robust_learner

COMMITTED_MODEL = Path(__file__).resolve().parent/'models'/'far_quick_seed42'/'nat.pth'
SPEEDUP_TARGET, CO_TOLERANCE = 1.5, 0.01
PRECISIONS = ('fp32', 'bf16')

def evaluate_in(precision:str, model, x, y, p:Protocol, **kwargs):
    "`evaluate` with the protocol's IFIA (and PGD) in `precision`: a protocol setting if `Protocol` has one, else set on its attacks."
    if 'precision' in {f.name for f in dataclasses.fields(Protocol)}:
        return evaluate(model, x, y, dataclasses.replace(p, precision=precision), **kwargs)
    orig = E.protocol_attacks
    def attacks(*a, **kw):
        pgd, ifia = orig(*a, **kw)
        pgd.precision = ifia.precision = precision
        return pgd, ifia
    E.protocol_attacks = attacks
    try: return evaluate(model, x, y, p, **kwargs)
    finally: E.protocol_attacks = orig

class Phases:
    "Wall seconds spent inside IFIA's ascent (`attacks._ascent_direction`) and its fp32 measured maps (`IFIA.measure_map`)."
    def __init__(self): self.seconds = dict(ascent=0., measured_maps=0.)
    def _wrap(self, owner, name, key):
        f = getattr(owner, name)
        def timed_call(*args, **kwargs):
            t = time.perf_counter()
            try: return f(*args, **kwargs)
            finally: self.seconds[key] += time.perf_counter() - t
        setattr(owner, name, timed_call)
        return f
    def __enter__(self):
        self._orig = [(A, '_ascent_direction', self._wrap(A, '_ascent_direction', 'ascent')),
                      (A.IFIA, 'measure_map', self._wrap(A.IFIA, 'measure_map', 'measured_maps'))]
        return self
    def __exit__(self, *exc):
        for owner, name, f in self._orig: setattr(owner, name, f)

def eval_part(model, n:int, chunk:int, quick:bool, log=print):
    "Interleaved fp32 / bf16 evaluation of the first `n` correct test images: seconds and per-image IN / CO per precision."
    x, y = get_arrays('fashion_mnist', 'test')
    idx, tried = first_correct(model, x, y, n)
    p = get_protocol('fashion_mnist', 'quick', n=None, **(dict(ifia_steps=2, ig_steps=8, attack_ig_steps=2) if quick else {}))
    out = {pr: dict(seconds=0., IN=[], CO=[], never_moved=0, chunk_seconds=[]) for pr in PRECISIONS}
    for c, i in enumerate(range(0, len(idx), chunk)):
        j = idx[i:i+chunk]
        for pr in (PRECISIONS if c % 2 == 0 else PRECISIONS[::-1]):
            c0 = time.process_time()
            with Phases() as ph: res, s = timed(evaluate_in, pr, model, x[j], y[j], p, aa=False, progress=False, seed=0, bs=chunk)
            o = out[pr]
            for k, v in ph.seconds.items(): o[f'{k}_seconds'] = o.get(f'{k}_seconds', 0.) + v
            o['seconds'] += s; o['chunk_seconds'].append(round(s, 2)); o['never_moved'] += res['never_moved']
            o['cpu_seconds'] = o.get('cpu_seconds', 0.) + time.process_time() - c0
            o['IN'] += res['per_sample']['IN']; o['CO'] += res['per_sample']['CO']
            log(f"chunk {c} ({len(j)} images) {pr}: {s:.1f} s, IN {res['IN']:.3f} CO {res['CO']:.3f}  load {load()}")
    for pr, o in out.items():
        o.update(n=len(o['IN']), mean_IN=statistics.fmean(o['IN']), mean_CO=statistics.fmean(o['CO']),
                 ci_IN=bootstrap_ci(o['IN']), ci_CO=bootstrap_ci(o['CO']), images_per_s=len(o['IN']) / o['seconds'])
    d_co = [b - a for a, b in zip(out['fp32']['CO'], out['bf16']['CO'])]
    summary = dict(speedup=out['fp32']['seconds'] / out['bf16']['seconds'], speedup_cpu=out['fp32']['cpu_seconds'] / out['bf16']['cpu_seconds'], delta_CO=statistics.fmean(d_co), ci_delta_CO=bootstrap_ci(d_co),
                   delta_IN=out['bf16']['mean_IN'] - out['fp32']['mean_IN'], protocol=dataclasses.asdict(p), tried=tried)
    f32 = out['fp32']
    if 'ascent_seconds' in f32:  # Amdahl: only the ascent runs in bf16, so even a free ascent leaves the rest of fp32's time
        summary['ascent_speedup'] = f32['ascent_seconds'] / out['bf16']['ascent_seconds']
        summary['bound_free_ascent'] = f32['seconds'] / (f32['seconds'] - f32['ascent_seconds'])
    summary['target_met'] = summary['speedup'] >= SPEEDUP_TARGET and abs(summary['delta_CO']) <= CO_TOLERANCE
    return dict(per_precision=out, **summary)

class StepProbe:
    "Per training step: wall time, the training loss and the method callback's regularizer value."
    def __init__(self): self.times, self.cpu, self.losses, self.regs = [], [], [], []

def train_batches(bs:int, n_batches:int, seed:int=0):
    "DataLoaders of `n_batches` batches of Fashion-MNIST training images (no shuffling: every run sees the same batches)."
    from fastai.data.core import DataLoaders
    x, y = get_arrays('fashion_mnist', 'train', n=bs*n_batches, seed=seed)
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:bs], y[:bs])), bs=bs, shuffle=False, device='cpu', num_workers=0)
    dls.c = 10
    return dls

def train_step(method:str, precision:str, bs:int, n_steps:int=1, seed:int=0, **settings):
    "One warm-up step and `n_steps` timed steps of `method` with its attack's inner steps in `precision`: wall and CPU seconds (medians), loss and reg of the first timed step."
    from fastai.callback.core import Callback
    from robust_attr.models import SmallCNN
    probe = StepProbe()
    class Probe(Callback):
        order, run_valid = -1000, False  # first in every event: the clock starts before the method's attack (its before_batch)
        def before_batch(self): self._t, self._c = time.perf_counter(), time.process_time()
        def after_batch(self):  # after the loss, backward and step; before any other after_batch
            probe.times.append(time.perf_counter() - self._t); probe.cpu.append(time.process_time() - self._c)
            cb = next((c for c in self.learn.cbs if hasattr(c, 'term')), None)
            probe.regs.append(None if cb is None or not cb.lam else float(cb._sums.get(f'{cb.term}_reg', 0.)))
            probe.losses.append(self.learn.loss.item())
    torch.manual_seed(seed)
    start = dict(init=COMMITTED_MODEL) if COMMITTED_MODEL.exists() else dict(arch=SmallCNN(10))  # robust fine-tuning starts from a natural model (FAR)
    learn = robust_learner(train_batches(bs, 1 + n_steps, seed), method, metrics=[], precision=precision, **start, **settings)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=Probe())
    reg = None if probe.regs[1] is None else (probe.regs[1] - probe.regs[0]) / bs  # `_sums` accumulates reg × bs
    return statistics.median(probe.times[1:]), statistics.median(probe.cpu[1:]), probe.losses[1], reg

def train_part(methods, bs:int, steps:int=1, log=print, **settings):
    "Each method's step in fp32 and bf16, the order alternating between methods."
    rows = []
    for k, m in enumerate(methods):
        r = dict(method=m)
        for pr in (PRECISIONS if k % 2 == 0 else PRECISIONS[::-1]):
            s, c, loss, reg = train_step(m, pr, bs, steps, **settings.get(m, {}))
            r[pr] = dict(seconds=s, cpu_seconds=c, loss=loss, reg=reg)
            log(f"{m:12s} {pr}: {s*1000:8.0f} ms ({c*1000:8.0f} ms CPU), loss {loss:.4f}" + ('' if reg is None else f", reg {reg:.4f}") + f"  load {load()}")
        r['speedup'], r['speedup_cpu'] = r['fp32']['seconds'] / r['bf16']['seconds'], r['fp32']['cpu_seconds'] / r['bf16']['cpu_seconds']
        rows.append(r)
    return rows

QUICK_TRAIN = {'ig_norm': dict(steps=2, attack_m=2, grad_m=4), 'ig_sum_norm': dict(steps=2, attack_m=2, grad_m=4),
               'aat': dict(steps=2, ig_steps=3), 'adv_aat': dict(steps=2, ig_steps=3)}

def _opt(d:dict, key:str, fmt:str, missing:str=''):
    "`fmt` filled with `d[key]`, or `missing` when an older run did not record it."
    return fmt.format(d[key]) if key in d else missing

def markdown(r:dict) -> str:
    e = r['env']
    lines = [f"# fp32 vs bf16 inner steps (`bench/precision.py`)", "",
             f"Command: `{e['command']}`; torch {e['torch']}, {e['threads']} thread(s), "
             f"{e['cpu_count']} CPUs ({e['processor'] or e['machine']}); load average {tuple(r['load_before'])} before and "
             f"{tuple(r['load_after'])} after; {e['date']}.", ""]
    if 'eval' in r:
        v, f32, b16 = r['eval'], r['eval']['per_precision']['fp32'], r['eval']['per_precision']['bf16']
        pr = v['protocol']
        lines += ["## IFIA evaluation", "",
                  f"Model: {r['model']}. The first {f32['n']} correctly classified Fashion-MNIST test images (of {v['tried']} looked at), "
                  f"protocol `{pr['name']}` ({pr['variant']}): ε = {pr['eps']}, IFIA {pr['ifia_steps']} steps × {pr['ifia_step_size']}, "
                  f"top-{pr['attack_k']} mask, {pr['ig_steps']} IG points measured, {pr['attack_ig_steps']} attacked, softplus β = {pr['beta']}; "
                  f"AA off. Chunks of {r['chunk']} images, fp32 and bf16 alternating which runs first. Mean [bootstrap 95% CI over images].", "",
                  "| inner steps | wall s | CPU s | images/s | IN | CO | never moved |", "|---|---|---|---|---|---|---|"]
        for name, o in (('fp32', f32), ('bf16', b16)):
            lines.append(f"| {name} | {o['seconds']:.1f} | {_opt(o, 'cpu_seconds', '{:.1f}', '—')} | {o['images_per_s']:.3f} | {format_interval(o['mean_IN'], o['ci_IN'], digits=3)} | "
                         f"{format_interval(o['mean_CO'], o['ci_CO'], digits=3)} | {o['never_moved']}/{o['n']} |")
        met = 'met' if v['target_met'] else 'not met'
        lines += ["", f"bf16 / fp32: **{v['speedup']:.2f}× faster** in wall time{_opt(v, 'speedup_cpu', ' ({:.2f}× in CPU time)')}; mean CO bf16 − fp32 = {v['delta_CO']:+.4f} "
                  f"(paired 95% CI [{v['ci_delta_CO'][0]:+.4f}, {v['ci_delta_CO'][1]:+.4f}]), mean IN {v['delta_IN']:+.4f}. "
                  f"Target (≥ {SPEEDUP_TARGET}× with |ΔCO| ≤ {CO_TOLERANCE}): **{met}**.", "",
                  "Speed-up per chunk (fp32 s / bf16 s, wall): " + ', '.join(f"{a/b:.2f}×" for a, b in zip(f32['chunk_seconds'], b16['chunk_seconds']))
                  + f"; without the first chunk {sum(f32['chunk_seconds'][1:]) / max(sum(b16['chunk_seconds'][1:]), 1e-9):.2f}×.", ""]
        if 'bound_free_ascent' in v:
            lines += ["Where the time goes (wall s; the ascent is the only part that runs in bf16, everything else is fp32 in both runs):", "",
                      "| inner steps | total | ascent (climbed map + its backward) | measured maps (fp32 IG of every scored iterate) | rest (validity, Kendall, bookkeeping) |",
                      "|---|---|---|---|---|"]
            for name, o in (('fp32', f32), ('bf16', b16)):
                rest = o['seconds'] - o['ascent_seconds'] - o['measured_maps_seconds']
                lines.append(f"| {name} | {o['seconds']:.1f} | {o['ascent_seconds']:.1f} ({o['ascent_seconds']/o['seconds']:.0%}) | "
                             f"{o['measured_maps_seconds']:.1f} ({o['measured_maps_seconds']/o['seconds']:.0%}) | {rest:.1f} |")
            lines += ["", f"The ascent itself runs **{v['ascent_speedup']:.2f}×** faster in bf16. Since only the ascent changes, the whole "
                      f"evaluation cannot gain more than fp32's total / (total − ascent) = **{v['bound_free_ascent']:.2f}×**, even if the "
                      "ascent cost nothing.", ""]
    if 'train' in r:
        lines += ["## One training step of every method", "",
                  f"SmallCNN, batch {r['bs']}, Fashion-MNIST training images, each preset's defaults{' (--quick: reduced)' if r['quick'] else ''}; "
                  f"{r.get('train_start', 'random initial weights')}; "
                  "the step after one warm-up step, from the same weights, batches and seed; a step's time starts before the method's attack (the "
                  "callback's `before_batch`) and ends after the optimizer's step. `reg` is the method's regularizer "
                  "(`{term}_reg`, the training map's dissimilarity at the attacked point, computed in fp32 in both runs: higher = "
                  "stronger inner maximization); Madry's `adv` has none (λ = 0), its loss is the CE at the attacked points.", "",
                  f"Times: the median of {r.get('steps', 1)} timed step(s), wall (CPU) ms; the speed-up in CPU time is the steadier one on a shared machine.", "",
                  "| method | fp32 ms | bf16 ms | speed-up wall (CPU) | fp32 loss | bf16 loss | fp32 reg | bf16 reg |", "|---|---|---|---|---|---|---|---|"]
        fmt = lambda v: '—' if v is None else f'{v:.4f}'
        for t in r['train']:
            a, b = t['fp32'], t['bf16']
            cpu = lambda d: '' if 'cpu_seconds' not in d else f" ({d['cpu_seconds']*1000:.0f})"
            lines.append(f"| {t['method']} | {a['seconds']*1000:.0f}{cpu(a)} | {b['seconds']*1000:.0f}{cpu(b)} | {t['speedup']:.2f}×{_opt(t, 'speedup_cpu', ' ({:.2f}×)')} | {a['loss']:.4f} | "
                         f"{b['loss']:.4f} | {fmt(a['reg'])} | {fmt(b['reg'])} |")
        lines.append("")
    return with_notes(lines, r)

def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=100, help='correctly classified test images to evaluate')
    ap.add_argument('--chunk', type=int, default=20, help='images per interleaved chunk (also the attack batch)')
    ap.add_argument('--bs', type=int, default=50, help='training batch size')
    ap.add_argument('--steps', type=int, default=2, help='timed training steps per method and precision (after a warm-up)')
    ap.add_argument('--methods', nargs='*', default=[m for m in METHODS if m != 'natural'], help='methods whose step is timed')
    ap.add_argument('--only', choices=('eval', 'train'), help='run one part only')
    ap.add_argument('--threads', type=int, default=1, help='torch threads (default 1: steadier on a shared machine)')
    ap.add_argument('--quick', action='store_true', help='smoke run (results written as precision_quick.*)')
    ap.add_argument('--out', default=None, help='results folder (default bench/results)')
    ap.add_argument('--note', action='append', default=[], help='a line for the Notes section (e.g. how the machine was shared)')
    ap.add_argument('--markdown-only', action='store_true', help="rewrite the .md from the results' .json (its notes extended by --note)")
    a = ap.parse_args(argv)
    if a.markdown_only:
        name, out = 'precision_quick' if a.quick else 'precision', Path(a.out or RESULTS)
        r = json.loads((out/f'{name}.json').read_text())
        r['notes'] = r.get('notes', []) + [f'* {n}' for n in a.note]
        return write(name, r, markdown(r), out)
    set_threads(a.threads)
    r = dict(quick=a.quick, env=env_info(), load_before=load(), chunk=2 if a.quick else a.chunk, bs=8 if a.quick else a.bs,
             steps=1 if a.quick else a.steps, notes=[f'* {n}' for n in a.note])
    print(f"torch {r['env']['torch']}, {r['env']['threads']} thread(s), load {r['load_before']}", flush=True)
    if a.only != 'train':
        if COMMITTED_MODEL.exists(): model, r['model'] = load_model(COMMITTED_MODEL), f"`{COMMITTED_MODEL.relative_to(COMMITTED_MODEL.parents[3])}` (committed)"
        else:
            model, r['model'] = fashion_mnist_model(), '`/tmp/robust_attr_bench/nat_fmnist.pth` (the committed model was not found)'
            r['notes'].append(f"* {COMMITTED_MODEL} was missing: a natural SmallCNN was trained instead.")
        r['eval'] = eval_part(model.eval(), 4 if a.quick else a.n, 2 if a.quick else a.chunk, a.quick)
    if a.only != 'eval':
        methods = [m for m in a.methods if m in ('adv', 'trades', 'art', 'aat')] if a.quick else a.methods
        r['train_start'] = ('fine-tuning the committed natural model (`bench/models/far_quick_seed42/nat.pth`), as FAR does'
                            if COMMITTED_MODEL.exists() else 'random initial weights (the committed model was not found)')
        r['train'] = train_part(methods, r['bs'], 1 if a.quick else a.steps, **(QUICK_TRAIN if a.quick else {}))
    r['load_after'] = load()
    name, out = 'precision_quick' if a.quick else 'precision', Path(a.out or RESULTS)
    if a.only and (out/f'{name}.json').exists():  # keep the other part of the earlier run, with its own command and load
        old = json.loads((out/f'{name}.json').read_text())
        other = 'train' if a.only == 'eval' else 'eval'
        if other in old:
            r[other] = old[other]
            if 'model' in old: r.setdefault('model', old['model'])
            r['notes'].append(f"* The {other} part is from an earlier run: `{old['env']['command']}`, load {tuple(old['load_before'])} before and "
                              f"{tuple(old['load_after'])} after, {old['env']['date']}; this run (`--only {a.only}`) replaced the {a.only} part.")
    paths = write('precision_quick' if a.quick else 'precision', r, markdown(r), **({} if a.out is None else dict(out=a.out)))
    print(f"wrote {paths[0]} and {paths[1]}")

if __name__ == '__main__': main()
