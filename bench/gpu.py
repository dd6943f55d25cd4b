"""The GPU check (issue 18): one command, under 8 minutes on one GPU, one results file.

    python bench/gpu.py                        # on a CUDA machine: writes bench/results/gpu.md
    python bench/gpu.py --smoke --out /tmp/g   # the same code paths, tiny, on the CPU (a CI test runs this)

Five parts, each recorded in the one results file (`gpu.md`, or `gpu_smoke.md`; its last section holds every
number as JSON):

1. **device tests**: `pytest tests/test_device.py` (attacks, `evaluate` and training on every device present, fp32 and
   bf16 inner steps) and the suite's other GPU-only test (`tests/test_localize.py`), with pass / skip / fail counts;
2. **IFIA throughput**: the Fashion-MNIST quick protocol's IFIA (40 steps, 10 IG points attacked, 50 measured)
   on the committed natural SmallCNN (`bench/models/far_quick_seed42/nat.pth`; a random-weight SmallCNN if it
   is missing), batched (all `--n` images in one call) vs one image at a time (the first `--single-n`), in
   images/s with the mean Kendall of both on the images both attacked (target: ≥ 10× at equal mean Kendall);
3. **training step time** of every method's preset: SmallCNN with batch 50 on 1×28×28 and torchvision's ResNet-18
   with batch 128 on 3×32×32 (random images; time does not depend on the values), in three modes: `fp32` (TF32
   off), `tf32` (TF32 matmuls and convolutions, inner steps fp32), `bf16` (inner steps under bf16 autocast, TF32
   off); the median of the timed steps after a warm-up step, and the peak memory (`torch.cuda.max_memory_allocated`);
   an out-of-memory error is recorded, not raised;
4. **determinism**: two seeded runs of IFIA and of an AAT step compared bit for bit, with PyTorch's defaults and
   with `torch.use_deterministic_algorithms(True)` (or the operation that has no deterministic implementation);
5. the machine: GPU name, memory, driver, torch, CUDA.

A time budget (`--budget-s`, default 420 s) skips what would run past it (recorded as skipped), so the
whole command ends in under 8 minutes even on a slower GPU. `--smoke` shrinks every size (4 images, 2 IFIA
steps, batch 4, 8×8 ResNet inputs, 2 methods) and runs on the CPU, where the TF32 mode is fp32 and peak memory
is not measured.
"""
from __future__ import annotations
import argparse, json, os, platform, shlex, statistics, subprocess, sys, time, traceback
from pathlib import Path
os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # lets cuBLAS be deterministic when asked (before CUDA starts)
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from robust_attr.models import SmallCNN, load_model
from robust_attr.attacks import IFIA
from robust_attr.evaluate import get_protocol, protocol_attacks
from robust_attr.metrics import kendall_tau
from robust_attr.train import METHODS, robust_learner

COMMITTED_MODEL = ROOT/'bench'/'models'/'far_quick_seed42'/'nat.pth'
MODES = ('fp32', 'tf32', 'bf16')
SPEEDUP_TARGET = 10.

class Budget:
    "Seconds left of the command's time budget."
    def __init__(self, seconds): self.end = time.perf_counter() + seconds
    def left(self): return self.end - time.perf_counter()

def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)

def set_tf32(on:bool):
    "TF32 for matmuls and cuDNN convolutions on or off (PyTorch's default: matmuls off, convolutions on)."
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on

def machine(device) -> dict:
    info = dict(device=str(device), torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                cpu_threads=torch.get_num_threads(), date=time.strftime('%Y-%m-%d %H:%M:%S %Z'), load=[round(v, 2) for v in os.getloadavg()])
    if device.type == 'cuda':
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f'{p.major}.{p.minor}',
                    bf16_supported=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
        try: info['driver'] = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                             capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception: pass
    return info

# ------------------------------------------------------------------------------------------------------------------
# 1. device tests
# ------------------------------------------------------------------------------------------------------------------

DEVICE_TESTS = ['tests/test_device.py', 'tests/test_localize.py::test_boxes_and_masks_stay_on_the_device']

def device_tests(smoke:bool, timeout:int) -> dict:
    "Run the device tests in a subprocess; pass / skip / fail counts and the summary line."
    args = DEVICE_TESTS + (['-k', 'cpu and ifia and fp32'] if smoke else [])
    cmd = [sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    start = time.perf_counter()
    try: r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired: return dict(command='python ' + shlex.join(cmd[1:]), error=f'timed out after {timeout} s')
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    summary = next((l for l in reversed(lines) if ' in ' in l and ('passed' in l or 'failed' in l or 'skipped' in l)), '')
    count = lambda word: sum(int(t.split()[0]) for t in summary.strip('= ').split(', ') if t.split()[1:2] == [word]) if summary else 0
    return dict(command='python ' + shlex.join(cmd[1:]), returncode=r.returncode, summary=summary, passed=count('passed'),
                skipped=count('skipped'), failed=count('failed') + count('errors') + count('error'), seconds=round(time.perf_counter() - start, 1),
                tail=lines[-15:] if r.returncode else [l for l in lines if l.startswith('SKIPPED')][:10])

# ------------------------------------------------------------------------------------------------------------------
# 2. IFIA throughput
# ------------------------------------------------------------------------------------------------------------------

def eval_images(n:int, device, smoke:bool):
    "The natural Fashion-MNIST SmallCNN and its first `n` correctly classified test images (random ones if no data)."
    from robust_attr.evaluate import first_correct
    note = None
    if COMMITTED_MODEL.exists(): model = load_model(COMMITTED_MODEL)
    else: torch.manual_seed(0); model, note = SmallCNN(10), f'{COMMITTED_MODEL} missing: a random-weight SmallCNN'
    model = model.to(device).eval()
    try:
        from robust_attr.data import get_arrays
        x, y = get_arrays('fashion_mnist', 'test', n=None if not smoke else 200)
    except Exception as e:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(max(4*n, 64), 1, 28, 28, generator=g)
        with torch.no_grad(): y = model(x.to(device)).argmax(1).cpu()
        note = (note + '; ' if note else '') + f'Fashion-MNIST not found ({type(e).__name__}): random images labelled by the model'
    x, y = x.to(device), y.to(device)
    idx, _ = first_correct(model, x, y, n)
    return model, x[idx], y[idx], note

def ifia_throughput(model, x, y, single_n:int, smoke:bool, budget:Budget) -> dict:
    "Images/s of IFIA batched vs one image at a time, and the mean Kendall of both on the images both attacked."
    device = x.device
    p = get_protocol('fashion_mnist', 'quick', **(dict(ifia_steps=2, ig_steps=8, attack_ig_steps=2) if smoke else {}))
    _, ifia = protocol_attacks(p, seed=0)
    def run(xs, ys):
        clean = ifia.measure_map(model, xs, ys)
        xa = ifia(model, xs, ys, clean_map=clean)
        return kendall_tau(ifia.measure_map(model, xa, ys), clean)
    run(x[:2], y[:2]); sync(device)  # warm-up: kernels, allocator
    t = time.perf_counter(); tau_b = run(x, y); sync(device); t_batched = time.perf_counter() - t
    m = min(single_n, len(x))
    t = time.perf_counter(); taus = []
    for i in range(m):
        if budget.left() < 60 and i >= 2: m = i; break
        taus.append(run(x[i:i+1], y[i:i+1]))
    sync(device); t_single = time.perf_counter() - t
    tau_s = torch.cat(taus)
    r = dict(n_batched=len(x), n_single=m, seconds_batched=t_batched, seconds_single=t_single,
             images_per_s_batched=len(x) / t_batched, images_per_s_single=m / t_single,
             mean_kendall_batched_all=tau_b.mean().item(), mean_kendall_batched_common=tau_b[:m].mean().item(),
             mean_kendall_single=tau_s.mean().item(), protocol=dict(steps=p.ifia_steps, attack_ig_steps=p.attack_ig_steps, ig_steps=p.ig_steps))
    r['speedup'] = r['images_per_s_batched'] / r['images_per_s_single']
    r['kendall_difference'] = r['mean_kendall_batched_common'] - r['mean_kendall_single']
    return r

# ------------------------------------------------------------------------------------------------------------------
# 3. training step time per method, architecture and mode
# ------------------------------------------------------------------------------------------------------------------

def resnet18(n_classes:int=10):
    "torchvision's ResNet-18 for 32×32 inputs as the library uses it: [0,1] inputs, its own ReLU modules."
    from torchvision.models import resnet18 as tv_resnet18
    return tv_resnet18(num_classes=n_classes)

def arch_configs(smoke:bool) -> dict:
    "name: (model factory, input shape, batch size)."
    if smoke: return {'small_cnn': (lambda: SmallCNN(10), (1, 28, 28), 4), 'resnet18': (resnet18, (3, 8, 8), 4)}
    return {'small_cnn': (lambda: SmallCNN(10), (1, 28, 28), 50), 'resnet18': (resnet18, (3, 32, 32), 128)}

def step_dls(shape, bs:int, n_batches:int, device, seed:int=0):
    from fastai.data.core import DataLoaders
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(bs*n_batches, *shape, generator=g), torch.randint(0, 10, (bs*n_batches,), generator=g)
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x[:bs], y[:bs])), bs=bs, shuffle=False, device=device, num_workers=0)
    dls.c = 10
    return dls

SMOKE_SETTINGS = {'aat': dict(steps=1, ig_steps=2), 'adv_aat': dict(steps=1, ig_steps=2), 'ig_norm': dict(steps=1, attack_m=2, grad_m=2),
                  'ig_sum_norm': dict(steps=1, attack_m=2, grad_m=2), 'adv': dict(steps=2), 'trades': dict(steps=2), 'art': dict(steps=1)}

def step_time(method, make_model, shape, bs, mode, device, steps:int, smoke:bool) -> dict:
    "Median seconds of `steps` training steps after a warm-up step, and the peak memory, of `method` in `mode`."
    from fastai.callback.core import Callback
    times = []
    class Timer(Callback):
        order, run_valid = -101, False
        def before_batch(self): sync(device); self._t = time.perf_counter()
        def after_batch(self): sync(device); times.append(time.perf_counter() - self._t)
    set_tf32(mode == 'tf32')
    torch.manual_seed(0)
    if device.type == 'cuda': torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)
    try:
        learn = robust_learner(step_dls(shape, bs, steps + 1, device), method, arch=make_model(), metrics=[], eps=8/255,
                               precision='bf16' if mode == 'bf16' else 'fp32', **(SMOKE_SETTINGS.get(method, {}) if smoke else {}))
        with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=Timer())
    except torch.cuda.OutOfMemoryError as e:
        return dict(error='out of memory', detail=str(e).split('\n')[0][:200])
    finally: set_tf32(False)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == 'cuda' else None
    return dict(ms=1000 * statistics.median(times[1:]), ms_all=[round(1000*t, 1) for t in times], peak_mib=peak)

def training_steps(methods, smoke:bool, device, budget:Budget, steps:int) -> list:
    rows = []
    for arch, (make, shape, bs) in arch_configs(smoke).items():
        for m in methods:
            row = dict(arch=arch, method=m, bs=bs, shape=list(shape))
            for mode in MODES:
                if budget.left() < 30: row[mode] = dict(error='skipped: time budget'); continue
                row[mode] = step_time(m, make, shape, bs, mode, device, steps, smoke)
                print(f"  {arch:9s} {m:12s} {mode}: {_fmt_step(row[mode])}", flush=True)
            rows.append(row)
    return rows

# ------------------------------------------------------------------------------------------------------------------
# 4. determinism
# ------------------------------------------------------------------------------------------------------------------

def _seeded_runs(model, x, y, device, smoke:bool):
    "Two seeded IFIA runs and two seeded AAT steps; the largest absolute difference of each pair."
    def ifia_once():
        ifia = IFIA(0.1, 0.01, 2 if smoke else 10, k=100, ig_steps=8 if smoke else 50, attack_ig_steps=2 if smoke else 10, random_start=True, seed=0)
        return ifia(model, x, y)
    def aat_once():
        torch.manual_seed(0)
        learn = robust_learner(step_dls((1, 28, 28), len(x), 1, device), 'aat', arch=SmallCNN(10), metrics=[], eps=0.1, seed=0,
                               **(SMOKE_SETTINGS['aat'] if smoke else {}))
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
        return torch.cat([p.detach().flatten() for p in learn.model.parameters()])
    out = {}
    for name, fn in (('ifia', ifia_once), ('aat_step', aat_once)):
        a, b = fn(), fn()
        out[name] = dict(equal=bool(torch.equal(a, b)), max_abs_diff=(a - b).abs().max().item())
    return out

def determinism(model, x, y, smoke:bool) -> dict:
    device = x.device
    r = dict(default=_seeded_runs(model, x, y, device, smoke))
    torch.use_deterministic_algorithms(True)
    cudnn_det = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try: r['deterministic_algorithms'] = _seeded_runs(model, x, y, device, smoke)
    except RuntimeError as e: r['deterministic_algorithms'] = dict(error=str(e).split('\n')[0][:300])
    finally: torch.use_deterministic_algorithms(False); torch.backends.cudnn.deterministic = cudnn_det
    return r

# ------------------------------------------------------------------------------------------------------------------
# the results file
# ------------------------------------------------------------------------------------------------------------------

def _fmt_step(s):
    if 'error' in s: return s['error']
    return f"{s['ms']:.1f} ms" + ('' if s.get('peak_mib') is None else f", {s['peak_mib']:.0f} MiB")

def markdown(r:dict) -> str:
    m = r['machine']
    lines = [f"# GPU check (`bench/gpu.py`){' — smoke run on the CPU' if r['smoke'] else ''}", "",
             f"Command: `{r['command']}`; {m.get('gpu', m['device'])}" + (f" ({m['gpu_memory_gib']} GiB, capability {m['capability']}, driver {m.get('driver')})" if 'gpu' in m else '')
             + f"; torch {m['torch']}, CUDA {m['cuda']}; {m['date']}; wall time {r['seconds']:.0f} s (budget {r['budget_s']} s)."
             + (f" Load average {m['load']}." if m['device'] == 'cpu' else ''), ""]
    t = r['device_tests']
    lines += ["## 1. Device tests", "", f"`{t['command']}`: " + (t.get('error') or f"{t['passed']} passed, {t['skipped']} skipped, {t['failed']} failed "
              f"(exit status {t['returncode']}, {t['seconds']} s)."), ""]
    if t.get('tail'): lines += ['```', *t['tail'], '```', '']
    f = r['ifia']
    lines += ["## 2. IFIA throughput: batched vs one image at a time", ""]
    if 'error' in f: lines += [f"Error: {f['error']}", ""]
    else:
        ok = f['speedup'] >= SPEEDUP_TARGET and abs(f['kendall_difference']) <= 0.01
        lines += [f"Fashion-MNIST quick protocol's IFIA ({f['protocol']['steps']} steps, {f['protocol']['attack_ig_steps']} IG points attacked, "
                  f"{f['protocol']['ig_steps']} measured), model: {r['model']}.", "",
                  "| run | images | seconds | images/s | mean Kendall (common images) |", "|---|---|---|---|---|",
                  f"| batched | {f['n_batched']} | {f['seconds_batched']:.2f} | {f['images_per_s_batched']:.2f} | {f['mean_kendall_batched_common']:.4f} (all: {f['mean_kendall_batched_all']:.4f}) |",
                  f"| one at a time | {f['n_single']} | {f['seconds_single']:.2f} | {f['images_per_s_single']:.2f} | {f['mean_kendall_single']:.4f} |", "",
                  f"Batched / one at a time: **{f['speedup']:.1f}×** images/s; Kendall difference {f['kendall_difference']:+.4f}. "
                  f"Target ≥ {SPEEDUP_TARGET:g}× at equal mean Kendall (|Δ| ≤ 0.01): **{'met' if ok else 'not met'}**.", ""]
    lines += ["## 3. Training step time (median after a warm-up) and peak memory", "",
              "Each preset's default settings (ε = 8/255); `fp32`: TF32 off; `tf32`: TF32 matmuls and convolutions; `bf16`: the attack's "
              "inner steps under bf16 autocast (TF32 off). Random images.", "",
              "| arch | batch | method | fp32 | tf32 | bf16 | bf16 speed-up |", "|---|---|---|---|---|---|---|"]
    for row in r['training']:
        sp = (f"{row['fp32']['ms'] / row['bf16']['ms']:.2f}×" if 'ms' in row['fp32'] and 'ms' in row['bf16'] else '—')
        lines.append(f"| {row['arch']} {'×'.join(map(str, row['shape']))} | {row['bs']} | {row['method']} | " + ' | '.join(_fmt_step(row[k]) for k in MODES) + f" | {sp} |")
    d = r['determinism']
    lines += ["", "## 4. Determinism: two seeded runs", "", "| setting | IFIA equal (max diff) | AAT step equal (max diff of the weights) |", "|---|---|---|"]
    for k, v in d.items():
        if 'error' in v: lines.append(f"| {k} | {v['error']} | |")
        else: lines.append(f"| {k} | {v['ifia']['equal']} ({v['ifia']['max_abs_diff']:.3g}) | {v['aat_step']['equal']} ({v['aat_step']['max_abs_diff']:.3g}) |")
    if r.get('notes'): lines += ["", "## Notes", "", *[f"* {n}" for n in r['notes']]]
    lines += ["", "## All numbers", "", "```json", json.dumps(r, indent=1, default=str), "```", ""]
    return '\n'.join(lines)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--smoke', action='store_true', help='tiny sizes on the CPU (the CI test)')
    ap.add_argument('--device', default=None, help="device (default: 'cuda' if available; --smoke: 'cpu')")
    ap.add_argument('--out', default=str(ROOT/'bench'/'results'), help='folder of the results file')
    ap.add_argument('--n', type=int, default=100, help='images of the batched IFIA run')
    ap.add_argument('--single-n', type=int, default=20, help='images of the one-at-a-time IFIA run')
    ap.add_argument('--steps', type=int, default=3, help='timed training steps per configuration (after one warm-up)')
    ap.add_argument('--methods', nargs='*', default=[m for m in METHODS if m != 'natural'], help='methods whose step is timed')
    ap.add_argument('--budget-s', type=int, default=420, help='stop starting new measurements after this many seconds')
    a = ap.parse_args(argv)
    start, budget = time.perf_counter(), Budget(a.budget_s)
    device = torch.device(a.device or ('cpu' if a.smoke or not torch.cuda.is_available() else 'cuda'))
    if device.type == 'cpu' and not a.smoke: print("no CUDA device: this runs the full sizes on the CPU (use --smoke for a quick check)", flush=True)
    n, single_n, steps = (4, 2, 1) if a.smoke else (a.n, a.single_n, a.steps)
    methods = ['aat'] if a.smoke else a.methods
    r = dict(smoke=a.smoke, command='python ' + ' '.join([Path(sys.argv[0]).as_posix() if argv is None else 'bench/gpu.py', *(sys.argv[1:] if argv is None else argv)]),
             budget_s=a.budget_s, machine=machine(device), notes=[])
    print(f"device {device}; {r['machine'].get('gpu', '')}", flush=True)
    print("1. device tests", flush=True)
    r['device_tests'] = device_tests(a.smoke, timeout=max(int(budget.left() / 3), 60))
    print(f"   {r['device_tests'].get('summary') or r['device_tests'].get('error')}", flush=True)
    model, x, y, note = eval_images(n, device, a.smoke)
    r['model'] = f'`{COMMITTED_MODEL.relative_to(ROOT)}`' if note is None or 'random-weight' not in note else 'a random-weight SmallCNN'
    if note: r['notes'].append(note)
    print("2. IFIA throughput", flush=True)
    try: r['ifia'] = ifia_throughput(model, x, y, single_n, a.smoke, budget)
    except Exception as e: r['ifia'] = dict(error=f'{type(e).__name__}: {e}'[:300]); traceback.print_exc()
    print(f"   {r['ifia'].get('speedup', r['ifia'].get('error'))}", flush=True)
    print("4. determinism", flush=True)
    r['determinism'] = determinism(model, x[:16], y[:16], a.smoke)
    print(f"   {r['determinism']}", flush=True)
    print("3. training steps", flush=True)
    r['training'] = training_steps(methods, a.smoke, device, budget, steps)
    r['seconds'] = time.perf_counter() - start
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    path = out/('gpu_smoke.md' if a.smoke else 'gpu.md')
    path.write_text(markdown(r))
    print(f"wrote {path} ({r['seconds']:.0f} s)")
    return r

if __name__ == '__main__': main()
