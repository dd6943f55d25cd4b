"""Peak memory and time of IG, one IFIA step and one AAT step for a ResNet-50 at 224×224, with and without `internal_batch_size`.

Every configuration runs in a fresh subprocess (`--worker`): it builds the model (torchvision's ResNet-50, random weights,
10 classes, wrapped in `models.ImageClassifier` with ImageNet's normalization) and the batch, warms the kernels up on a
tiny input, resets the kernel's peak-RSS counter (`/proc/self/clear_refs`, "5"), runs the measured call once, and
reports `VmHWM − VmRSS at the reset` (the call's peak, torch's allocations included) and its `perf_counter` time.

A configuration whose peak, predicted from the per-row cost measured earlier in the same run, would pass `--cap-gb` is
not run (the table says so and gives the prediction); every worker also runs under an address-space limit, so a wrong
prediction fails that one configuration, not the machine.
"""
from __future__ import annotations
import argparse, json, os, resource, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import env_info, load, write

PARTS = ('ig', 'ifia', 'aat')
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

def _status(key):
    "A `/proc/self/status` value in MiB (e.g. 'VmHWM', 'VmRSS', 'VmSize')."
    for l in open('/proc/self/status'):
        if l.startswith(key + ':'): return int(l.split()[1]) / 1024
    raise KeyError(key)

def _reset_peak():
    "Reset the kernel's peak-RSS counter of this process; return the RSS now (MiB)."
    with open('/proc/self/clear_refs', 'w') as f: f.write('5')
    return _status('VmRSS')

def protocol(points:int, attack_points:int|None=None):
    "The RGB preset's quick protocol (cifar10), one IFIA step, `points` IG points for the measured map (`attack_points` for the climbed one)."
    from robust_attr.evaluate import get_protocol
    return get_protocol('cifar10', 'quick', ifia_steps=1, ig_steps=points, **({} if attack_points is None else dict(attack_ig_steps=attack_points)))

def rows_per_pass(part:str, batch:int, points:int, ibs:int|None, attack_points:int):
    "Rows (samples × IG points) of the largest IG pass of `part`: what `internal_batch_size` caps."
    rows = batch * (points if part=='ig' else attack_points)
    return rows if ibs is None else min(rows, ibs)

def worker(part:str, batch:int, size:int, points:int, attack_points:int|None, ibs:int|None, aat_steps:int, cap_gb:float, seed:int=0):
    "Measure one configuration in this (fresh) process; return a dict."
    import torch, torchvision
    from robust_attr.models import ImageClassifier
    torch.manual_seed(seed)
    model = ImageClassifier(torchvision.models.resnet50(num_classes=10), IMAGENET_MEAN, IMAGENET_STD).eval()
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 10, (batch,))
    p = protocol(points, attack_points)
    attack_points = p.attack_ig_steps
    if part=='ig':
        from robust_attr.attribution import integrated_gradients
        run = lambda: integrated_gradients(model, x, y, steps=points, internal_batch_size=ibs)
    elif part=='ifia':
        from robust_attr.evaluate import protocol_attacks
        _, ifia = protocol_attacks(p, seed, ibs)
        clean = ifia.measure_map(model, x, y)  # evaluate computes the clean map outside the attack, and so do we
        run = lambda: ifia(model, x, y, clean_map=clean)
    else:
        from fastai.data.core import DataLoaders
        from fastai.data.load import DataLoader
        from robust_attr.train import robust_learner
        ds = list(zip(x, y))
        dls = DataLoaders(DataLoader(ds, bs=batch, shuffle=False, drop_last=True), DataLoader(ds[:1], bs=1))
        learn = robust_learner(dls, 'aat', arch=model, lr=1e-4, steps=aat_steps, ig_steps=attack_points, seed=seed,
                               internal_batch_size=ibs)
        def run():
            with learn.no_logging(), learn.no_bar(): learn.fit(1)
    # warm the kernels up on a tiny input, so their one-time allocations are not counted
    import scipy.stats  # IFIA's Kendall tau imports it on first use: not part of the measure
    xs = torch.rand(1, 3, 32, 32, requires_grad=True)
    model.eval(); torch.autograd.grad(model(xs)[:, 0].sum(), xs)
    resource.setrlimit(resource.RLIMIT_AS, (int((_status('VmSize') + cap_gb*1024 + 2048) * 2**20),) * 2)  # a guard, not the measure
    base = _reset_peak()
    t = time.perf_counter()
    try: run(); err = None
    except (RuntimeError, MemoryError) as e: err = f'{type(e).__name__}: {str(e)[:200]}'
    sec = time.perf_counter() - t
    return dict(part=part, batch=batch, size=size, points=points, ibs=ibs, aat_steps=aat_steps if part=='aat' else None,
                attack_points=attack_points, rows=rows_per_pass(part, batch, points, ibs, attack_points),
                base_mib=round(base), peak_mib=round(_status('VmHWM') - base), seconds=round(sec, 2), error=err,
                threads=torch.get_num_threads(), load=load())

def run_config(args, part, batch, ibs):
    "One configuration in a fresh `python` process."
    cmd = [sys.executable, __file__, '--worker', part, str(batch), str(ibs or 0), '--size', str(args.size), '--points', str(args.points),
           '--attack-points', str(args.attack_points or 0), '--aat-steps', str(args.aat_steps), '--cap-gb', str(args.cap_gb)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode: return dict(part=part, batch=batch, ibs=ibs, error=out.stderr.strip().splitlines()[-1][:300])
    return json.loads(out.stdout.strip().splitlines()[-1])

def parse_plan(plan:list):
    "`['ig:2,4,8:none,8', ...]` → `[(part, batch, ibs), ...]` in that order."
    out = []
    for item in plan:
        part, batches, ibss = item.split(':')
        if part not in PARTS: raise SystemExit(f"--plan: unknown part {part!r} in {item!r}; parts: {PARTS}")
        out += [(part, int(b), None if i.lower()=='none' else int(i)) for b in batches.split(',') for i in ibss.split(',')]
    return out

def predict(done:list, part:str, rows:int):
    "Predicted peak (MiB) of `part` at `rows` rows per pass: the largest measured MiB per row of that part × rows."
    per = [r['peak_mib']/r['rows'] for r in done if r['part']==part and 'peak_mib' in r and not r.get('error') and r.get('rows')]
    return max(per) * rows if per else None

def fmt_ibs(ibs): return 'None (all rows)' if ibs is None else f'{ibs} rows'

def markdown(r:dict) -> str:
    a, info, A = r['args'], r['env'], r['attack_points']
    lines = ['# Memory at real image sizes: ResNet-50, 224×224, CPU', '',
             f"Command: `{r['command']}`", '',
             f"torch {info['torch']} (torchvision {r['torchvision']}), {info['threads']} threads (OMP_NUM_THREADS={info['omp_num_threads']}), "
             f"{info['cpu_count']} CPUs ({r['cpu']}), {r['mem_total']}. Run {info['date']}, {r['minutes']:.1f} min.", '',
             f"`uptime` before: `{r['uptime_before']}`", '', f"`uptime` after: `{r['uptime_after']}`", '',
             f"Model: `ImageClassifier(torchvision.models.resnet50(num_classes=10), ImageNet mean/std)`, random weights, "
             f"random images in [0, 1] at {a['size']}×{a['size']}. Protocol: the RGB preset's quick variant, "
             f"`get_protocol('cifar10', 'quick', ifia_steps=1, ig_steps={a['points']}"
             + (f", attack_ig_steps={A})`" if a['attack_points'] else ')`') + " (ε = 8/255, softplus β = 1 smoothing).", '',
             f"* **ig**: `integrated_gradients(model, x, y, steps={a['points']}, internal_batch_size=ibs)`.",
             f"* **ifia**: `protocol_attacks(p, 0, ibs)`'s IFIA, one step: the smoothed map ({A} points) differentiated twice, the "
             f"label check and the measured map ({a['points']} points) of the candidate. The clean map is computed before, as "
             "`evaluate` does, and not counted.",
             f"* **aat**: `robust_learner(dls, 'aat', arch=model, steps={a['aat_steps']}, ig_steps={A}, internal_batch_size=ibs)`, "
             f"`fit(1)` on one batch (one Adam step; validation on 1 image): the clean training map with its graph, "
             f"{a['aat_steps']} inner IFIA step(s), the attacked training map, the backward through both (train mode).", '',
             '*rows per pass* = samples × IG points of the largest single forward/backward pass, what `internal_batch_size` caps. '
             '*peak* = the call\'s peak resident memory above the process\'s memory once the model and batch were built (VmHWM after '
             'resetting it, so torch\'s allocations count), MiB. One run per configuration, each in a fresh process.', '',
             '| part | batch | internal_batch_size | rows per pass | peak MiB | seconds | note |', '|---|---|---|---|---|---|---|']
    for x in r['results']:
        note = x.get('note') or x.get('error') or ''
        peak = x.get('peak_mib', '—') if not x.get('error') else '—'
        lines.append(f"| {x['part']} | {x['batch']} | {fmt_ibs(x['ibs'])} | {x.get('rows', '—')} | {peak} | {x.get('seconds', '—')} | {note} |")
    lines += ['', '## Notes', '', *r['notes'], '']
    return '\n'.join(lines)

DEFAULT_PLAN = ['ig:2,4,8:none,8', 'ifia:2:none,2', 'aat:2:none', 'ifia:4:2', 'aat:2:2']

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--worker', nargs=3, metavar=('PART', 'BATCH', 'IBS'), help=argparse.SUPPRESS)
    ap.add_argument('--plan', nargs='+', default=DEFAULT_PLAN,
                    help="configurations in order, PART:BATCHES:IBS-VALUES, e.g. 'ig:2,4,8:none,16' (none: all rows in one pass)")
    ap.add_argument('--size', type=int, default=224, help='image side')
    ap.add_argument('--points', type=int, default=4, help='IG points of IG and of the measured map (the protocol: 50)')
    ap.add_argument('--attack-points', type=int, default=2, help="IG points of the climbed map and AAT's maps (0: the protocol's, 10)")
    ap.add_argument('--aat-steps', type=int, default=1, help="inner IFIA steps of AAT (the preset's: 7)")
    ap.add_argument('--cap-gb', type=float, default=8., help='do not run a configuration predicted to need more (GiB)')
    ap.add_argument('--max-minutes', type=float, default=None, help='skip the rest of the plan once this much time has passed')
    ap.add_argument('--name', default='memory')
    ap.add_argument('--from-log', help="write the results from a run's printed lines (its log) instead of running")
    ap.add_argument('--quick', action='store_true', help='64×64, 2 points, 1 attack point: a smoke test, written as NAME_quick')
    args = ap.parse_args()
    args.attack_points = args.attack_points or None
    if args.worker:
        part, b, ibs = args.worker
        print(json.dumps(worker(part, int(b), args.size, args.points, args.attack_points, int(ibs) or None, args.aat_steps, args.cap_gb)))
        return
    if args.quick:
        args.size, args.points, args.attack_points, args.aat_steps, args.name = 96, 2, 1, 1, args.name + '_quick'
        args.plan = ['ig:2,4:none,2', 'ifia:2:none,1', 'aat:2:none,1']
    plan = parse_plan(args.plan)
    import torch, torchvision
    up = lambda: subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    start, before, results = time.time(), up(), []
    attack_points = protocol(args.points, args.attack_points).attack_ig_steps
    if args.from_log:
        results = [json.loads(l) for l in open(args.from_log) if l.startswith('{')]
        done = {(r['part'], r['batch'], r['ibs']) for r in results}
        results += [dict(part=part, batch=b, ibs=ibs, rows=rows_per_pass(part, b, args.points, ibs, attack_points), note='not run: out of time')
                    for part, b, ibs in plan if (part, b, ibs) not in done]
        before = f'not recorded (written from the log {args.from_log}); the load at each measurement is in the JSON'
    for part, b, ibs in ([] if args.from_log else plan):
        rows = rows_per_pass(part, b, args.points, ibs, attack_points)
        pred = predict(results, part, rows)
        if args.max_minutes and time.time() - start > 60*args.max_minutes:
            results.append(dict(part=part, batch=b, ibs=ibs, rows=rows, note='not run: out of time'))
        elif pred is not None and pred > args.cap_gb * 1024:
            results.append(dict(part=part, batch=b, ibs=ibs, rows=rows, note=f'not run: predicted {pred/1024:.1f} GiB > {args.cap_gb:g} GiB cap'))
        else: results.append(run_config(args, part, b, ibs))
        print(json.dumps(results[-1]), flush=True)
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), 'unknown CPU')
    mem = next(l.split(':', 1)[1].strip() for l in open('/proc/meminfo') if l.startswith('MemTotal'))
    r = dict(args=vars(args), env=env_info(), torchvision=torchvision.__version__, cpu=cpu, mem_total=f'MemTotal {mem}',
             command=f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} PYTHONPATH=. flock /tmp/bench.lock python " + ' '.join(sys.argv),
             attack_points=attack_points, uptime_before=before, uptime_after=up(), minutes=(time.time() - start)/60, results=results,
             notes=[f'* {n}' for n in args_notes(args, results)])
    print(write(args.name, r, markdown(r)))

def args_notes(args, results):
    "Notes: what the measure left out, and each part's peak per sample·point (all rows in one pass), measured."
    A = results[0].get('attack_points') if results else None
    out = [f"IG points: {args.points} for IG and the measured map, {A} for the climbed map and AAT's maps (the protocol: 50 and 10), "
           f"and {args.aat_steps} inner IFIA step(s) for AAT (the preset: 7), to keep the run near 20 minutes on 2 busy cores: at "
           "224×224 one twice-differentiated row (forward, backward with its graph, backward again) takes about half a minute "
           "there. Memory and time grow linearly with the rows, so the table scales: read the protocol's settings as more rows.",
           "`internal_batch_size` splits the B·points rows into passes. A first-order map (IG, the measured map) frees each pass "
           "before the next, so its peak follows the rows of one pass. A map built to be differentiated again (the IFIA step's "
           "climbed map, AAT's training maps, `create_graph=True`) keeps every pass's graph until the outer backward, so its "
           "peak follows all B·points rows whatever `internal_batch_size` is: compare the ifia and aat rows with and without it."]
    for part in PARTS:
        per = [x['peak_mib']/(x['batch']*(x['points'] if part=='ig' else x['attack_points']))
               for x in results if x['part']==part and x.get('ibs') is None and not x.get('error') and x.get('peak_mib') is not None]
        if per: out.append(f'{part}: {min(per):.0f}–{max(per):.0f} MiB of peak per sample·point (batch × IG points), all rows in one pass.')
    return out

if __name__ == '__main__': main()
