"""Do `torch.compile`d first-order maps pay on this CPU? IG maps of the same model eager and compiled, interleaved.

    python bench/compile_maps.py                      # ResNet-18 32×32 and SmallCNN 28×28, inductor, 7 interleaved pairs
    python bench/compile_maps.py --smoke              # SmallCNN, aot_eager, 2 pairs: checks the pipeline (well under a minute)
    python bench/compile_maps.py --arch resnet18 --batch 16 --ig-steps 50 --reps 11

The library runs second-order passes (climbed maps, training maps) on the module's own eager forward
(`smooth.twice_differentiable`: `torch.compiler.set_stance('force_eager')`), and lets first-order ones — the
measured IG maps of `evaluate` and of IFIA's scores, PGD — run the compiled graph. This script measures what
that buys: `integrated_gradients(model, x, y, steps=S)` (S·B rows, one forward and one backward pass, eval mode)
on the eager module and on `torch.compile(module)`, each timed call paired with the other in alternating order,
after warm-up calls that compile (their time is reported apart: it is paid once per input shape and mode). The
maps must agree (max abs difference reported). Random weights and inputs: the time does not depend on them.
Writes bench/results/compile_maps.{md,json} (--smoke: compile_maps_smoke.*).
"""
from __future__ import annotations
import argparse, statistics, time, warnings
import torch
import torch.nn as nn
import torchvision
from robust_attr.attribution import integrated_gradients
from robust_attr.models import SmallCNN
from _env import env_info, load, set_threads, summary, write, with_notes

ARCHS = {'resnet18': lambda: (torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
         'small_cnn': lambda: (SmallCNN(10), (1, 28, 28))}


def ig_seconds(model, x, y, steps:int):
    "Seconds of one IG map of `x` (and the map)."
    t = time.perf_counter()
    a = integrated_gradients(model, x, y, steps=steps)
    return time.perf_counter() - t, a


def measure(arch:str, batch:int, steps:int, reps:int, backend:str, warmup:int=2):
    "Compile time, interleaved eager/compiled IG times and the maps' agreement for one architecture."
    torch.manual_seed(0)
    model, shape = ARCHS[arch]()
    model.eval()
    x, y = torch.rand(batch, *shape), torch.randint(0, 10, (batch,))
    compiled = torch.compile(model, backend=backend)
    first = [ig_seconds(compiled, x, y, steps)[0] for _ in range(warmup)]   # compiles (and recompiles for the IG row count)
    eager_t, comp_t, diff = [], [], 0.
    for r in range(reps):
        order = ((model, eager_t), (compiled, comp_t)) if r % 2 == 0 else ((compiled, comp_t), (model, eager_t))
        maps = []
        for m, times in order:
            s, a = ig_seconds(m, x, y, steps)
            times.append(s); maps.append(a)
        diff = max(diff, (maps[0] - maps[1]).abs().max().item())
    scale = maps[0].abs().max().item()
    return dict(arch=arch, batch=batch, ig_steps=steps, rows=batch*steps, backend=backend, warmup_seconds=[round(t, 3) for t in first],
                eager=summary(eager_t), compiled=summary(comp_t),
                speedup=statistics.median(eager_t)/statistics.median(comp_t), max_abs_diff=diff, map_scale=scale)


def markdown(r:dict) -> str:
    lines = ['# Compiled vs eager first-order IG maps', '', f"`{r['env']['command']}` — torch {r['env']['torch']}, "
             f"{r['env']['threads']} threads, load before/after {r['load_before']} / {r['load_after']}", '',
             '| model | batch × IG points | backend | compile (warm-up calls, s) | eager median (s) | compiled median (s) | speed-up | max abs diff / map max |',
             '|---|---|---|---|---|---|---|---|']
    for m in r['runs']:
        lines.append(f"| {m['arch']} | {m['batch']} × {m['ig_steps']} | {m['backend']} | {m['warmup_seconds']} | {m['eager']['median']:.4f} | "
                     f"{m['compiled']['median']:.4f} | {m['speedup']:.2f}× | {m['max_abs_diff']:.2e} / {m['map_scale']:.2e} |")
    lines += ['', 'Speed-up = eager median / compiled median over interleaved pairs; the warm-up calls (compilation, paid '
              'once per input shape and train/eval mode) are not in it.', '']
    return with_notes(lines, r)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--arch', nargs='+', default=['resnet18', 'small_cnn'], choices=list(ARCHS))
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--ig-steps', type=int, default=50)
    ap.add_argument('--reps', type=int, default=7)
    ap.add_argument('--backend', default='inductor', help="torch.compile backend ('inductor', 'aot_eager', ...)")
    ap.add_argument('--threads', type=int, help='torch threads (default: torch default)')
    ap.add_argument('--smoke', action='store_true', help='SmallCNN, batch 2, 4 IG points, 2 pairs, aot_eager: checks the pipeline')
    a = ap.parse_args()
    if a.smoke: a.arch, a.batch, a.ig_steps, a.reps, a.backend = ['small_cnn'], 2, 4, 2, 'aot_eager'
    threads = set_threads(a.threads)
    r = dict(env=env_info(), threads=threads, load_before=load(), runs=[], notes=[])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)
        for arch in a.arch:
            r['runs'].append(measure(arch, a.batch, a.ig_steps, a.reps, a.backend))
            print(r['runs'][-1], flush=True)
    r['load_after'] = load()
    if a.smoke: r['notes'].append('- smoke run: checks the pipeline, the numbers are not meant for the record')
    paths = write('compile_maps_smoke' if a.smoke else 'compile_maps', r, markdown(r))
    print(*paths, sep='\n')


if __name__ == '__main__':
    main()
