"""Issue 28: `robust_attr evaluate` in one process with one thread against two worker processes (`--procs 2`, one
thread each) on the same images, runs interleaved; the speed-up and the equality of the results, image by image.

    flock /tmp/bench.lock python bench/shards.py                 # ~10 min on a quiet 2-core machine
    python bench/shards.py --smoke                               # seconds of work: checks the pipeline, not for the record
    python bench/shards.py --torchrun                            # also the documented torchrun line

Both commands are the whole command line, timed from the outside (Python starting, the launcher, loading the model
and the data, NA and AA on the whole test split, IFIA on the first `--n` correctly classified digits, writing the
result). The model is a SmallCNN fitted to the bundled digits (`fault_soak_evaluate.fit_digits_model`, 300 Adam
steps); the protocol is the digits' quick one (IFIA 40 steps, IG 50 / 10 points, PGD 20 steps). `--bs` should make
the number of batches of IFIA (⌈n / bs⌉) and of PGD even, so that two processes get equal shares. The runs
alternate (one, two, two, one, ...) so that a drift of the machine's load hits both alike. Written:
`bench/results/shards[_smoke].{md,json}`.
"""
from __future__ import annotations
import argparse, json, statistics, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import env_info, load, write
import fault_soak_evaluate as F

SMOKE = ['--set', 'ifia_steps=2', '--set', 'ig_steps=4', '--set', 'attack_ig_steps=2', '--set', 'pgd_steps=2', '--set', 'aa_n=16']


def commands(model, out:Path, n:int, bs:int, extra, torchrun:bool):
    "The command line of each mode: one process, `--procs 2`, and (optionally) the documented `torchrun` line."
    args = ['evaluate', '--model', str(model), '--n', str(n), '--bs', str(bs), '--no-progress', *extra]
    py = [sys.executable, '-m', 'robust_attr.cli']
    modes = {'one process': py + args + ['--out', str(out/'one.json')],
             'two processes (--procs 2)': py + args + ['--procs', '2', '--out', str(out/'procs.json')]}
    if torchrun: modes['two processes (torchrun)'] = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                                                      '-m', 'robust_attr.cli', '--', *args, '--out', str(out/'torchrun.json')]
    return modes


def timed_run(cmd):
    "Wall time of `cmd` run to its end (an error if it fails)."
    start = time.perf_counter()
    p = subprocess.run(cmd, env=F.environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode: raise RuntimeError(f"{' '.join(cmd[2:8])} ... exited with {p.returncode}:\n{p.stderr[-3000:]}")
    return time.perf_counter() - start


def out_file(cmd): return Path(cmd[cmd.index('--out') + 1])


def compare(a:dict, b:dict):
    "Fields of two results that differ (`seconds` aside), and the images whose IN or CO differ."
    fields = sorted(k for k in a if k != 'seconds' and a[k] != b.get(k))
    images = sorted({i for k in ('IN', 'CO') for i,(u,v) in enumerate(zip(a['per_sample'][k], b['per_sample'][k])) if u != v})
    return fields, images


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--n', type=int, default=48, help='IFIA on the first n correctly classified test digits')
    ap.add_argument('--bs', type=int, default=12)
    ap.add_argument('--repeats', type=int, default=2, help='runs of each mode')
    ap.add_argument('--torchrun', action='store_true', help='also time the documented torchrun line')
    ap.add_argument('--work', default='/tmp/robust_attr_bench/shards')
    ap.add_argument('--smoke', action='store_true', help='a tiny protocol on 4 digits, once each')
    args = ap.parse_args()
    if args.smoke: args.n, args.bs, args.repeats = 4, 2, 1
    work = Path(args.work); work.mkdir(parents=True, exist_ok=True)
    model = work/'digits_small_cnn_300.pth'
    if not model.exists(): F.fit_digits_model(model, steps=300)
    modes = commands(model, work, args.n, args.bs, SMOKE if args.smoke else [], args.torchrun)
    names, times, equal, before = list(modes), {m: [] for m in modes}, [], load()
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            out_file(modes[name]).unlink(missing_ok=True)
            times[name].append(round(timed_run(modes[name]), 2))
            print(f"repeat {r}: {name}: {times[name][-1]} s", flush=True)
            result = json.loads(out_file(modes[name]).read_text())
            if name == names[0] and r == 0: reference = result
            fields, images = compare(reference, result)
            equal.append(dict(repeat=r, mode=name, differing_fields=fields, differing_images=images))
    one = statistics.median(times[names[0]])
    res = dict(n=reference['n'], bs=args.bs, repeats=args.repeats,
               times=times, median={m: statistics.median(t) for m,t in times.items()},
               speedup={m: round(one / statistics.median(t), 3) for m,t in times.items() if m != names[0]},
               all_equal=all(not e['differing_fields'] for e in equal), comparisons=equal,
               commands={m: ' '.join(c[1:]).replace(str(work), 'WORK') for m,c in modes.items()},
               env=env_info(), load_before=before, load_after=load(), smoke=args.smoke)
    md = [f"# Sharded evaluation: one process against two{' (smoke: not a measurement)' if args.smoke else ''}", '',
          f"Command: `{res['env']['command']}`; {res['env']['date']}; {res['env']['cpu_count']} CPUs; load before {before}, after {res['load_after']}.", '',
          f"`robust_attr evaluate` of a digits SmallCNN, quick protocol{' shrunk (smoke)' if args.smoke else ''}: NA and AA on the whole test split, "
          f"IFIA on the first {res['n']} correctly classified digits, batches of {args.bs}; each command timed whole (Python starting, "
          f"loading, the launcher), {args.repeats} runs each, alternating.", '',
          '| mode | wall time (s), each run | median (s) | speed-up vs one process |', '|---|---|---|---|']
    for m in names:
        speedup = '—' if m == names[0] else f"{res['speedup'][m]:.2f}×"
        md.append(f"| {m} | {', '.join(map(str, times[m]))} | {res['median'][m]:.1f} | {speedup} |")
    md += ['', f"Results equal to the first one-process run on every field but `seconds` (per-image IN, CO, Spearman, AA included): "
               f"**{'yes, every run' if res['all_equal'] else 'NO'}**.", '', 'Commands (WORK: the work directory):', '']
    md += [f"* {m}: `{c}`" for m,c in res['commands'].items()]
    for p in write('shards' + ('_smoke' if args.smoke else ''), res, '\n'.join(md) + '\n'): print(p)
    return 0 if res['all_equal'] else 1


if __name__ == '__main__': sys.exit(main())
