"""Issue 28, item 7: kill `robust_attr evaluate` with SIGKILL at random moments, resume it, and check that the final
result equals an uninterrupted run's, image by image.

    flock /tmp/bench.lock python bench/fault_soak_evaluate.py --trials 4 --kills 3      # ≥ 10 kills, ~10 min on 2 cores
    python bench/fault_soak_evaluate.py --smoke                                         # 1 trial, 1 kill, ~1 min
    python bench/fault_soak_evaluate.py --procs 2 --trials 2 --kills 2                  # the two-worker path (`--procs 2`)

Each trial starts the command and kills it (its whole process group, so nothing can clean up) at a random moment:
a quarter of the kills after a delay uniform in [0, the uninterrupted run's wall time] (so also while Python
starts), the others once the run has saved a random number of new batches, a random part of a batch later (so while
a batch runs, while its line is written, or while the result is). Then it runs the same command with `--resume`, kills that
too, and so on until `--kills` kills have landed or a run ended first; the last run goes to the end. Trials are
added (up to 3× `--trials`) until `--min-kills` kills have landed. With `--procs N` the kill hits the
launcher only: its workers, told by the kernel that their parent died (`shards.stop_with_parent`), finish their
batch and stop, and the next run starts once they are gone. The result is compared with the reference on every
field but `seconds`. Written: `bench/results/fault_soak_evaluate[_procsN][_smoke].{md,json}` with the trials, the
kills (and how many batches the state held at each), the resumed runs and the mismatches (target: 0).

The model is a SmallCNN fitted to the bundled digits for a few seconds (`fit_digits_model`), the protocol the digits'
quick one shrunk so that a run takes seconds of work (`SETTINGS`); `tests/test_shards.py` uses both.
"""
from __future__ import annotations
import argparse, json, os, random, signal, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import env_info, load, write

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ['--n', '16', '--bs', '2', '--set', 'aa_n=16', '--set', 'ifia_steps=4', '--set', 'ig_steps=8',
            '--set', 'attack_ig_steps=2', '--set', 'pgd_steps=3', '--no-progress']  # 8 IFIA and ~7 PGD batches of 2 digits
PARENT_VAR = 'ROBUST_ATTR_LAUNCHER'  # `shards.WORKER_PARENT` (read here without importing torch)


def state_of(out): return Path(out).with_suffix('.state.jsonl')   # `cli.state_path`


def fit_digits_model(path, steps:int=60, seed:int=0):
    "A SmallCNN fitted to the bundled digits for `steps` Adam steps (seconds), saved as a checkpoint of the digits at ε = 0.1."
    import torch, torch.nn.functional as F
    from robust_attr.core import ThreatModel
    from robust_attr.data import get_arrays
    from robust_attr.models import SmallCNN, save_model
    torch.manual_seed(seed)
    x, y = get_arrays('digits', 'train')
    m, g = SmallCNN(10, 1, 28), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    for _ in range(steps):
        j = torch.randint(len(x), (64,), generator=g)
        opt.zero_grad(); F.cross_entropy(m(x[j]), y[j]).backward(); opt.step()
    return save_model(m.eval(), path, data='digits', threat=ThreatModel(0.1), method='natural')


def environment():
    "The environment of every run: this checkout first on the path, one thread."
    return os.environ | dict(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep),
                             OMP_NUM_THREADS='1')


def command(model, out, *extra):
    "`robust_attr evaluate` on `model` with `SETTINGS`, its result in `out`."
    return [sys.executable, '-m', 'robust_attr.cli', 'evaluate', '--model', str(model), *SETTINGS, '--out', str(out), *extra]


def without_seconds(result:dict): return {k: v for k,v in result.items() if k != 'seconds'}


def workers_of(pid:int):
    "Process ids of the live workers a launcher with process id `pid` started (Linux: read from /proc)."
    mine = f'{PARENT_VAR}={pid}'.encode()
    found = []
    for p in Path('/proc').iterdir():
        if not p.name.isdigit(): continue
        try:
            if mine in (p/'environ').read_bytes().split(b'\0') and b'Z' not in (p/'stat').read_bytes().split(b') ')[-1][:1]: found.append(int(p.name))
        except OSError: pass
    return found


def wait_gone(pid:int, timeout:float=600):
    "Wait until no worker of launcher `pid` is alive; return the seconds waited."
    start = time.time()
    while workers_of(pid):
        if time.time() - start > timeout: raise TimeoutError(f"workers of {pid} still alive after {timeout} s: {workers_of(pid)}")
        time.sleep(0.2)
    return time.time() - start


def saved_batches(state:Path):
    "Batch lines in a state file (0 when there is none)."
    try: return max(len(state.read_bytes().split(b'\n')) - 2, 0)
    except FileNotFoundError: return 0


def run_to_end(cmd, timeout:float=1800):
    "Run `cmd` to its end; its wall time. A non-zero exit is an error with its messages."
    start = time.time()
    p = subprocess.run(cmd, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout)
    if p.returncode: raise RuntimeError(f"{' '.join(map(str, cmd[2:6]))} ... exited with {p.returncode}:\n{p.stderr[-3000:]}")
    return time.time() - start


def kill_moment(rng:random.Random, window:float, batches:int):
    "When to kill: `(new batches, then seconds)`. A quarter of the time after a delay uniform in [0, `window`] (Python starting included), else once the run has saved a random number of new batches, a random part of a batch later."
    if rng.random() < 0.25: return 0, rng.uniform(0, window)
    return rng.randrange(batches), rng.uniform(0, window / batches)


def _wait_for(p, state:Path, batches:int, delay:float, before:int):
    "Wait until the run has added `batches` batches to the `before` in `state`, then `delay` seconds: `(still running, batches it added)`."
    since, added = None, 0
    while p.poll() is None:
        n = saved_batches(state)
        added = max(added, n - before)
        if since is None and n - before >= batches: since = time.time()
        if since is not None and time.time() - since >= delay: return True, added
        time.sleep(0.01)
    return False, added


def killed_run(cmd, out:Path, kills:int, window:float, rng:random.Random, procs:int=1, batches:int=16):
    "Run `cmd` (then with `--resume`) until `kills` SIGKILLs have landed and a run ended; the kills, as `(seconds, batches saved)`."
    state, landed, runs = state_of(out), [], 0
    while True:
        p = subprocess.Popen(cmd + (['--resume'] if runs else []) + (['--procs', str(procs)] if procs > 1 else []), env=environment(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        runs, start, before = runs + 1, time.time(), saved_batches(state)
        alive, added = _wait_for(p, state, *kill_moment(rng, window, batches), before) if len(landed) < kills else (False, 0)
        if alive:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            after, saved = time.time() - start, saved_batches(state)
            phase = 'after the work' if not state.exists() and (added or before) else 'working' if saved > before else 'before its first batch'
            waited = wait_gone(p.pid) if procs > 1 else 0.
            landed.append(dict(after=round(after, 2), saved=saved, phase=phase, workers_stopped_in=round(waited, 1)))
            continue
        _, err = p.communicate()
        if p.returncode: raise RuntimeError(f"run {runs} exited with {p.returncode}:\n{err[-3000:]}")
        return dict(runs=runs, kills=landed)


def soak(model, work:Path, trials:int, kills:int, seed:int=0, procs:int=1, min_kills:int=0):
    "The reference run, then `trials` killed-and-resumed runs compared with it (more, up to 3× as many, until `min_kills` kills landed)."
    work.mkdir(parents=True, exist_ok=True)
    ref_out = work/'reference.json'
    ref_out.unlink(missing_ok=True)
    ref_seconds = run_to_end(command(model, ref_out))
    reference = without_seconds(json.loads(ref_out.read_text()))
    rng, rows = random.Random(seed), []
    t = 0
    while t < trials or (sum(len(r['kills']) for r in rows) < min_kills and t < 3*trials):
        out = work/f'trial{t}.json'
        for f in (out, state_of(out)): f.unlink(missing_ok=True)
        r = killed_run(command(model, out), out, kills, ref_seconds, rng, procs)
        result = without_seconds(json.loads(out.read_text()))
        r.update(trial=t, equal=result == reference, differing=sorted(k for k in reference if result.get(k) != reference[k]),
                 leftover_state=state_of(out).exists())
        rows.append(r)
        print(f"trial {t}: {len(r['kills'])} kills, {r['runs']} runs, equal={r['equal']}", flush=True)
        t += 1
    return dict(reference_seconds=round(ref_seconds, 1), n=reference['n'], trials=rows, n_trials=len(rows),
                n_kills=sum(len(r['kills']) for r in rows), mismatches=sum(not r['equal'] for r in rows),
                kills_by_phase={ph: sum(k['phase'] == ph for r in rows for k in r['kills']) for ph in ('before its first batch', 'working', 'after the work')})


def markdown(res:dict, args):
    lines = [f"# Fault soak: `robust_attr evaluate` killed with SIGKILL and resumed{' (' + str(args.procs) + ' workers)' if args.procs > 1 else ''}", '',
             f"Command: `{res['env']['command']}`; {res['env']['date']}; load before {res['load_before']}, after {res['load_after']}.", '',
             f"**{res['n_trials']} trials, {res['n_kills']} kills, {res['mismatches']} mismatches** with the uninterrupted run "
             f"(every field but `seconds`, {res['n']} attacked digits and their AA images). Kills by phase of the killed run: "
             f"{res['kills_by_phase']['before its first batch']} before it saved a batch (Python starting, the first batch running), "
             f"{res['kills_by_phase']['working']} after it saved some (a batch running or being saved), {res['kills_by_phase']['after the work']} "
             "after its state was removed (the result being written, the process ending).", '',
             f"The uninterrupted run took {res['reference_seconds']} s (most of it Python starting). A quarter of the kills came after a delay "
             "uniform in [0, that]; the others once the run had saved a random number of new batches, a random part of a batch later.", '',
             '| trial | runs | kills: seconds after the start (batches saved, phase) | equal |', '|---|---|---|---|']
    for r in res['trials']:
        kills = ', '.join(f"{k['after']} ({k['saved']}, {k['phase']})" for k in r['kills'])
        lines.append(f"| {r['trial']} | {r['runs']} | {kills} | {r['equal']} |")
    return '\n'.join(lines) + '\n'


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--trials', type=int, default=4)
    ap.add_argument('--kills', type=int, default=3, help='kills per trial (fewer land when a run ends before its kill)')
    ap.add_argument('--min-kills', type=int, default=10, help='add trials (up to 3× --trials) until this many kills landed')
    ap.add_argument('--procs', type=int, default=1, help='workers of each run (--procs of the command)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--work', default='/tmp/robust_attr_fault_soak')
    ap.add_argument('--smoke', action='store_true', help='1 trial, 1 kill')
    args = ap.parse_args()
    if args.smoke: args.trials, args.kills, args.min_kills = 1, 1, 0
    work = Path(args.work)
    model = work/'digits_small_cnn.pth'
    if not model.exists(): fit_digits_model(model)
    before = load()
    res = soak(model, work/'runs', args.trials, args.kills, args.seed, args.procs, args.min_kills)
    res.update(env=env_info(), load_before=before, load_after=load(), settings=SETTINGS, procs=args.procs)
    name = 'fault_soak_evaluate' + (f'_procs{args.procs}' if args.procs > 1 else '') + ('_smoke' if args.smoke else '')
    for p in write(name, res, markdown(res, args)): print(p)
    return 1 if res['mismatches'] else 0


if __name__ == '__main__': sys.exit(main())
