"""Peak memory and time of IG, one IFIA step and one AAT step of a ResNet at 224×224, with the memory bound (`internal_batch_size`) and without.

Memory: every configuration runs in a fresh subprocess (`--worker memory`): it builds the model (torchvision's ResNet, random weights,
10 classes, wrapped in `models.ImageClassifier` with ImageNet's normalization) and the batch, warms the kernels up on a tiny input,
resets the peak counter (on a CPU the kernel's peak resident memory, `/proc/self/clear_refs` "5", so torch's allocations count, after
`malloc_trim` has returned what the allocator kept from earlier work, so the base is the live memory; on a GPU torch's peak allocated
memory), runs the measured step once, and reports the peak above the memory at the reset.

Time: one subprocess per part (`--worker time`) runs the step without and with the bound alternately, `--repeats` pairs, each run on a
fresh copy of the same model and batch, so that a change of load hits both alike; it reports each run's wall and CPU time.

IG is `integrated_gradients` (first order: the bound cuts its passes). An IFIA step is the protocol's IFIA with one step (the clean measured map computed before, as `evaluate` does, and not counted); an AAT
step is `robust_learner(dls, 'aat', ...)`'s `fit(1)` on one batch: the clean map, the inner IFIA, the attacked map, the backward and one
Adam step (validation on one image).
"""
from __future__ import annotations
import argparse, copy, json, os, resource, statistics, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import env_info, load, write

PARTS = ('ig', 'ifia', 'aat')
TIMED = ('ifia', 'aat')  # the parts whose second-order maps are chunked
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

def _status(key):
    "A `/proc/self/status` value in MiB (e.g. 'VmHWM', 'VmRSS', 'VmSize')."
    for l in open('/proc/self/status'):
        if l.startswith(key + ':'): return int(l.split()[1]) / 1024
    raise KeyError(key)

def _release_free_memory():
    "Give the memory the allocator keeps but no tensor uses back to the system, so the resident memory at a reset is what lives."
    import ctypes, gc
    gc.collect()
    try: ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError): pass  # not glibc: the base keeps what the allocator holds

class Peak:
    "The peak memory of what runs between `reset()` and `peak()`, MiB: resident memory on a CPU, torch's allocations on a GPU."
    def __init__(self, device): self.device = device
    def reset(self):
        import torch
        if self.device.type == 'cuda':
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            _release_free_memory()
            with open('/proc/self/clear_refs', 'w') as f: f.write('5')
            self.base = _status('VmRSS')
        return self.base
    def peak(self):
        import torch
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return _status('VmHWM') - self.base

def protocol(a):
    "The RGB preset's quick protocol (cifar10) with one IFIA step, `a.measure_points` IG points measured and `a.points` climbed."
    from robust_attr.evaluate import get_protocol
    return get_protocol('cifar10', 'quick', ifia_steps=1, ig_steps=a.measure_points, attack_ig_steps=a.points)

def chunk_rows(part:str, batch:int, a, ibs:int|None):
    "Rows whose graphs are held at once (what the bound caps): IG's pass; the attack's chunk, and AAT's training chunk (two maps a sample)."
    from robust_attr.attribution import MapSpec
    if part == 'ig': return batch * a.measure_points if ibs is None else min(batch * a.measure_points, ibs)
    spec = MapSpec('ig', a.points, internal_batch_size=ibs)
    size = lambda chunks, maps: max(s.stop - s.start for s in chunks) * maps * a.points
    rows = size(spec.sample_chunks(batch), 1)
    return max(rows, size(spec.sample_chunks(batch, maps=2), 2)) if part == 'aat' else rows

def build(a, batch:int, device):
    "The model (eval mode) and a batch of random images and labels."
    import torch, torchvision
    from robust_attr.models import ImageClassifier
    torch.manual_seed(a.seed)
    model = ImageClassifier(getattr(torchvision.models, a.arch)(num_classes=10), IMAGENET_MEAN, IMAGENET_STD).eval().to(device)
    return model, torch.rand(batch, 3, a.size, a.size, device=device), torch.randint(0, 10, (batch,), device=device)

def make_step(part:str, model, x, y, a, ibs:int|None):
    "A callable running one step of `part` on `model` with the bound `ibs` (None: unbounded)."
    if part == 'ig':
        from robust_attr.attribution import integrated_gradients
        return lambda: integrated_gradients(model, x, y, steps=a.measure_points, internal_batch_size=ibs)
    if part == 'ifia':
        from robust_attr.evaluate import protocol_attacks
        _, ifia = protocol_attacks(protocol(a), a.seed, ibs)
        clean = ifia.measure_map(model, x, y)  # evaluate computes the clean map outside the attack, and so do we
        return lambda: ifia(model, x, y, clean_map=clean)
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from robust_attr.train import robust_learner
    ds = list(zip(x, y))
    dls = DataLoaders(DataLoader(ds, bs=len(x), shuffle=False, drop_last=True), DataLoader(ds[:1], bs=1), device=x.device)
    learn = robust_learner(dls, 'aat', arch=model, lr=1e-4, steps=a.aat_steps, ig_steps=a.points, seed=a.seed, internal_batch_size=ibs,
                           eps=8/255)
    def run():
        with learn.no_logging(), learn.no_bar(): learn.fit(1)
    return run

def warm_up(model, device):
    "Run the kernels once on a tiny input, so their one-time allocations are not measured."
    import torch, scipy.stats  # IFIA's Kendall tau imports scipy on first use: not part of the measure
    from robust_attr.smooth import softplus_surrogate
    xs = torch.rand(1, 3, 32, 32, requires_grad=True, device=device)
    with softplus_surrogate(model, 1., 'second_order'):
        g, = torch.autograd.grad(model(xs)[:, 0].sum(), xs, create_graph=True)
        torch.autograd.grad(g.abs().sum(), xs)

def memory_worker(a, part:str, batch:int, ibs:int|None):
    "Peak memory and time of one step of `part`, in this (fresh) process."
    import torch
    device = torch.device(a.device)
    model, x, y = build(a, batch, device)
    warm_up(model, device)
    run = make_step(part, model, x, y, a, ibs)
    if device.type == 'cpu' and not a.smoke:  # a guard against a wrong guess, not the measure (a smoke run stays in one process)
        resource.setrlimit(resource.RLIMIT_AS, (int((_status('VmSize') + a.cap_gb*1024 + 2048) * 2**20),) * 2)
    peak = Peak(device)
    base = peak.reset()
    t, c = time.perf_counter(), time.process_time()
    try: run(); err = None
    except (RuntimeError, MemoryError) as e: err = f'{type(e).__name__}: {str(e)[:200]}'
    return dict(kind='memory', part=part, batch=batch, ibs=ibs, rows=chunk_rows(part, batch, a, ibs), base_mib=round(base),
                peak_mib=round(peak.peak()), seconds=round(time.perf_counter() - t, 2), cpu_seconds=round(time.process_time() - c, 2),
                error=err, threads=torch.get_num_threads(), load=load())

def time_worker(a, part:str, batch:int, ibs:int):
    "Wall and CPU seconds of one step of `part`, unbounded and bounded by `ibs` alternately, each on a fresh copy of the model."
    import torch
    device = torch.device(a.device)
    model, x, y = build(a, batch, device)
    warm_up(model, device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    runs = {'none': [], 'bound': []}
    for r in range(a.repeats):
        for mode in (('none', 'bound') if r % 2 == 0 else ('bound', 'none')):
            run = make_step(part, copy.deepcopy(model), x, y, a, ibs if mode == 'bound' else None)
            sync(); t, c = time.perf_counter(), time.process_time()
            run(); sync()
            runs[mode].append((round(time.perf_counter() - t, 3), round(time.process_time() - c, 3)))
    med = lambda m, i: statistics.median(v[i] for v in runs[m])
    return dict(kind='time', part=part, batch=batch, ibs=ibs, runs=runs, wall_ratio=round(med('bound', 0) / med('none', 0), 3),
                cpu_ratio=round(med('bound', 1) / med('none', 1), 3), threads=torch.get_num_threads(), load=load())

def subprocess_run(a, argv:list):
    "One worker in a fresh `python` process; its JSON line, or the error."
    cmd = [sys.executable, __file__, *argv, '--arch', a.arch, '--size', str(a.size), '--points', str(a.points),
           '--measure-points', str(a.measure_points), '--aat-steps', str(a.aat_steps), '--repeats', str(a.repeats),
           '--cap-gb', str(a.cap_gb), '--device', a.device, '--seed', str(a.seed)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode: return dict(argv=argv, error=(out.stderr.strip().splitlines() or ['no output'])[-1][:300])
    return json.loads(out.stdout.strip().splitlines()[-1])

def fmt_ibs(ibs): return 'None (one graph)' if ibs is None else f'{ibs} rows'

def markdown(r:dict) -> str:
    a, info = r['args'], r['env']
    lines = [f"# Memory at real image sizes: {a['arch']}, {a['size']}×{a['size']}, {a['device']}", '',
             f"Command: `{r['command']}`", '',
             f"torch {info['torch']} (torchvision {r['torchvision']}), {info['threads']} threads (OMP_NUM_THREADS={info['omp_num_threads']}), "
             f"{info['cpu_count']} CPUs ({r['cpu']}), {r['mem_total']}. Run {info['date']}, {r['minutes']:.1f} min.", '',
             f"`uptime` before: `{r['uptime_before']}`", '', f"`uptime` after: `{r['uptime_after']}`", '',
             f"Model: `ImageClassifier(torchvision.models.{a['arch']}(num_classes=10), ImageNet mean/std)`, random weights, random images "
             f"in [0, 1]. Protocol: `get_protocol('cifar10', 'quick', ifia_steps=1, ig_steps={a['measure_points']}, "
             f"attack_ig_steps={a['points']})` (ε = 8/255, softplus β = 1).", '',
             f"* **ig**: `integrated_gradients(model, x, y, steps={a['measure_points']}, internal_batch_size=ibs)`, first order.",
             f"* **ifia**: `protocol_attacks(p, 0, ibs)`'s IFIA, one step: the smoothed map ({a['points']} points) differentiated twice, the label "
             f"check and the measured map ({a['measure_points']} points) of the candidate; the clean map is computed before and not counted.",
             f"* **aat**: `robust_learner(dls, 'aat', arch=model, steps={a['aat_steps']}, ig_steps={a['points']}, internal_batch_size=ibs)`, "
             f"`fit(1)` on one batch: the clean map, {a['aat_steps']} inner IFIA step(s), the attacked map, the backward through both, one "
             "Adam step (validation on one image).", '',
             "*rows held* = samples × IG points whose graphs are held at once, what the bound caps: IG's largest pass; the largest chunk of "
             "maps built to be differentiated again for IFIA and AAT (AAT's training chunk holds two maps a sample). *peak* = the step's peak memory above the process's memory once the model and batch were "
             "built, MiB (" + ("torch's peak allocated GPU memory" if a['device'] == 'cuda' else "VmHWM after releasing the allocator's free "
             "memory (`malloc_trim`) and resetting it, so torch's allocations count") + "). One run per configuration, each in a fresh process.", '',
             '## Peak memory', '',
             '| part | batch | internal_batch_size | rows held | peak MiB | seconds | load (1 min) | note |', '|---|---|---|---|---|---|---|---|']
    for x in r['memory']:
        ok = not x.get('error')
        lines.append(f"| {x.get('part', '?')} | {x.get('batch', '?')} | {fmt_ibs(x.get('ibs'))} | {x.get('rows', '—')} | "
                     f"{x['peak_mib'] if ok else '—'} | {x.get('seconds', '—')} | {x.get('load', ['—'])[0]} | {x.get('error') or ''} |")
    lines += ['', '## Time: bounded against one graph, interleaved', '',
              '| part | batch | internal_batch_size | runs | wall s, one graph | wall s, bounded | wall ratio | CPU ratio | load (1 min) |',
              '|---|---|---|---|---|---|---|---|---|']
    for x in r['time']:
        if x.get('error'): lines.append(f"| {x['argv']} | | | | | | | | {x['error']} |"); continue
        w = lambda m: ', '.join(f'{v[0]:.1f}' for v in x['runs'][m])
        lines.append(f"| {x['part']} | {x['batch']} | {x['ibs']} rows | {len(x['runs']['none'])} pairs | {w('none')} | {w('bound')} | "
                     f"{x['wall_ratio']:.3f} | {x['cpu_ratio']:.3f} | {x['load'][0]} |")
    lines += ['', '## Checks', '', *[f'* {c}' for c in r['checks']], '', '## Reading', '', *[f'* {c}' for c in reading(r)], '']
    return '\n'.join(lines)

def reading(r:dict) -> list:
    "What the tables say, in numbers computed from them, and what a GPU run should show."
    a, out = r['args'], []
    ok = lambda x: not x.get('error') and 'peak_mib' in x
    one = {x['part']: x for x in sorted((x for x in r['memory'] if ok(x) and x['ibs'] is None), key=lambda x: x['batch'])}
    per = {p: x['peak_mib'] / x['rows'] for p, x in one.items()}
    if per: out.append('Held in one graph, the peak follows the rows: ' + ', '.join(
        f"{p} {v:.0f} MiB per row (batch {one[p]['batch']}, {one[p]['rows']} rows)" for p, v in per.items())
        + ". IG's first-order rows are freed pass by pass; IFIA's and AAT's maps are kept for the outer backward.")
    if 'aat' in per:
        rows = 32 * 10 * 2
        out.append(f"So AAT at batch 32 with the protocol's 10 points ({rows} rows, two maps a sample) would hold about "
                   f"{per['aat'] * rows / 1024:.0f} GiB in one graph on this model; with `internal_batch_size=20` a chunk holds one sample's "
                   f"20 rows, about {per['aat'] * 20 / 1024:.1f} GiB, whatever the batch (plus the batch's own forward for the loss).")
    out.append("With the bound the peak is the largest chunk's, not the batch's: what still grows with the batch is not a map (the "
               "batch's train-mode forward for the classification loss, which fastai builds after the chunks are freed; IFIA's Kendall "
               "scoring, the label checks' forwards; the attack's per-sample state). One run per configuration.")
    from robust_attr.passes import step_passes, step_cost, Passes
    nominal = {n: Passes(1., 2., 2.) for n in ('relu', 'softplus', 'second_order')}  # a backward and a double backward: twice a forward
    cost = lambda steps, chunked: step_cost(step_passes('aat', chunked=chunked, steps=steps, ig_steps=a['points']), nominal)
    out.append("Time: chunks run the same rows (the same forward, backward and double-backward passes), except AAT's clean map, computed "
               "first-order once more for the attack (`passes.step_passes('aat', chunked=True)`; with a backward and a double backward "
               f"each costing two forwards, {cost(a['aat_steps'], True)/cost(a['aat_steps'], False):.3f}× at {a['aat_steps']} inner "
               f"step(s), {cost(7, True)/cost(7, False):.3f}× at the preset's 7). On a CPU smaller passes also stay in cache, which can "
               "more than pay for it.")
    out.append("A GPU run (`--device cuda`, torch's peak allocated memory) should show the same flat bounded peaks, the one-graph peaks "
               "at the same MiB per row (the activations are the same tensors), and a time ratio near the pass-count ratio as long as a "
               "chunk fills the device; a chunk of a few rows leaves a large GPU idle between kernel launches, so choose the largest bound "
               "that fits (its rows × the MiB per row above).")
    return out

def checks(memory:list, times:list, a) -> list:
    "The issue's criteria on what was measured: AAT's bounded peak at the largest batch against the smallest, the time ratio."
    out, ok = [], lambda x: not x.get('error') and 'peak_mib' in x
    for part in PARTS:
        bounded = sorted((x for x in memory if ok(x) and x['part'] == part and x['ibs'] is not None), key=lambda x: x['batch'])
        free = {x['batch']: x['peak_mib'] for x in memory if ok(x) and x['part'] == part and x['ibs'] is None}
        if len(bounded) >= 2:
            lo, hi = bounded[0], bounded[-1]
            ratio = hi['peak_mib'] / lo['peak_mib']
            line = (f"{part}: bounded peak at batch {hi['batch']} is {ratio:.2f}× batch {lo['batch']}'s ({hi['peak_mib']} vs {lo['peak_mib']} MiB)"
                    + (f"; in one graph batch {hi['batch']} peaked at {free[hi['batch']]} MiB" if hi['batch'] in free else ''))
            if part == 'aat': line += f" — {'within' if ratio <= 1.25 else 'NOT within'} the issue's 25%"
            out.append(line)
    for x in times:
        if x.get('error'): continue
        line = f"{x['part']} at batch {x['batch']}: bounded / one graph = {x['wall_ratio']:.3f} (wall), {x['cpu_ratio']:.3f} (CPU), medians"
        if x['part'] == 'aat': line += f" — {'within' if x['cpu_ratio'] <= 1.15 else 'NOT within'} the issue's 1.15× (CPU time)"
        out.append(line)
    return out

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--worker', nargs=4, metavar=('KIND', 'PART', 'BATCH', 'IBS'), help=argparse.SUPPRESS)
    ap.add_argument('--arch', default='resnet18', help="a torchvision ResNet ('resnet18', 'resnet50', ...)")
    ap.add_argument('--size', type=int, default=224, help='image side')
    ap.add_argument('--batches', type=int, nargs='+', default=[2, 8], help='batch sizes of the memory runs')
    ap.add_argument('--ibs', type=int, default=4, help='the bound: internal_batch_size, in rows')
    ap.add_argument('--points', type=int, default=2, help="IG points of the climbed map and of AAT's maps (the protocol's: 10)")
    ap.add_argument('--measure-points', type=int, default=4, help="IG points of IFIA's measured map (the protocol's: 50)")
    ap.add_argument('--aat-steps', type=int, default=2, help="AAT's inner IFIA steps (the preset's: 7)")
    ap.add_argument('--parts', nargs='+', default=list(PARTS), choices=PARTS)
    ap.add_argument('--unbounded', type=int, nargs='*', default=None,
                    help='batches also measured in one graph (default: every batch; none: no argument)')
    ap.add_argument('--time-batch', type=int, default=None, help='batch of the timing pairs (default: the largest)')
    ap.add_argument('--repeats', type=int, default=2, help='timed pairs per part (0: no timing)')
    ap.add_argument('--cap-gb', type=float, default=12., help='address-space guard of a CPU worker, GiB above its start')
    ap.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--max-minutes', type=float, default=None, help='skip the remaining runs once this much time has passed')
    ap.add_argument('--name', default='memory')
    ap.add_argument('--rewrite', action='store_true', help="only rewrite NAME.md from NAME.json (after a change to the text)")
    ap.add_argument('--smoke', action='store_true',
                    help='checks the script in seconds: 64×64, batches 1 and 2, one point, one pair, in this process (memory not comparable), as NAME_smoke')
    a = ap.parse_args()
    if a.worker:
        kind, part, b, ibs = a.worker
        fn = memory_worker if kind == 'memory' else time_worker
        print(json.dumps(fn(a, part, int(b), int(ibs) or None)))
        return
    if a.rewrite:
        from _env import RESULTS
        r = json.loads((RESULTS/f'{a.name}.json').read_text())
        print(write(a.name, r, markdown(r)))
        return
    if a.smoke:
        a.size, a.batches, a.points, a.measure_points, a.aat_steps, a.ibs, a.repeats, a.name = 64, [1, 2], 1, 2, 1, 1, 1, a.name + '_smoke'
        a.unbounded = []
    unbounded = a.batches if a.unbounded is None else a.unbounded
    tb = a.time_batch or max(a.batches)
    import torch, torchvision
    up = lambda: subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    start, before, memory, times = time.time(), up(), [], []
    late = lambda: a.max_minutes and time.time() - start > 60 * a.max_minutes
    plan = [('memory', p, b, ibs) for p in a.parts for b in a.batches for ibs in [a.ibs] + ([None] if b in unbounded else [])]
    plan += [('time', p, tb, a.ibs) for p in a.parts if a.repeats and p in TIMED]
    for kind, part, b, ibs in plan:
        if late(): res = dict(kind=kind, part=part, batch=b, ibs=ibs, error='not run: out of time')
        elif a.smoke: res = (memory_worker if kind == 'memory' else time_worker)(a, part, b, ibs)  # in this process: the code, not the numbers
        else: res = subprocess_run(a, ['--worker', kind, part, str(b), str(ibs or 0)])
        res.setdefault('part', part); res.setdefault('batch', b); res.setdefault('ibs', ibs)
        (memory if kind == 'memory' else times).append(res)
        print(json.dumps(res), flush=True)
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), 'unknown CPU')
    mem = next(l.split(':', 1)[1].strip() for l in open('/proc/meminfo') if l.startswith('MemTotal'))
    r = dict(args=vars(a), env=env_info(), torchvision=torchvision.__version__, cpu=cpu, mem_total=f'MemTotal {mem}',
             command=f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} PYTHONPATH=. flock /tmp/bench.lock python " + ' '.join(sys.argv),
             uptime_before=before, uptime_after=up(), minutes=(time.time() - start) / 60, memory=memory, time=times,
             checks=checks(memory, times, a))
    print(write(a.name, r, markdown(r)))

if __name__ == '__main__': main()
