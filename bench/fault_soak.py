"""Fault soak (issue 28, item 7): kill a job with SIGKILL at random moments, resume it until it finishes, and check
that what it wrote equals what an uninterrupted run writes.

    python bench/fault_soak.py                   # 12 trials of the training jobs (>= 10 kills): results/fault_soak.{md,json}
    python bench/fault_soak.py --trials 12 --jobs train-adv
    python bench/fault_soak.py --smoke           # one short trial (well under a minute of work): results/fault_soak_smoke.*

A *job* (`Job`) is a `robust_attr` command that writes one output, keeps a state it can resume from, and takes
`--resume`; `JOBS` holds them by name (the training jobs here; an evaluation job is one more entry with its own
`same`). For each job the soak first runs the command once, uninterrupted: the reference, and its working time W
(from the command's first line of output, printed once its inputs are loaded and its work starts, to its last, which
says the output is written: the interpreter's exit after it is left out).
A trial then runs the same command afresh in a new directory and, in every attempt, kills its whole process group
with SIGKILL at a moment drawn uniformly from [0, W) after its first line, then starts it again with `--resume`,
until an attempt finishes by itself. A moment after the attempt has written its output (its `done` line) is no kill:
the interpreter's exit is not the job's work. The trial then
compares the outputs (`Job.same`).

Counted per job: trials, attempts, kills, kills after which a saved state was there to resume from (the others
restart from the beginning), the saved positions the resumes started from, temporaries left beside the outputs
(a kill during an atomic write leaves its `.part` file, never a half output), failures (an attempt that ended with
an error by itself, e.g. a state it could not read) and mismatches. Timings are not the point and are not reported.
Every process runs in its own session and is killed with its group when a trial ends or times out.
"""
from __future__ import annotations
import argparse, json, os, random, signal, subprocess, sys, threading, time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = 'import sys; from robust_attr.cli import main; sys.exit(main())'  # the `robust_attr` console script's entry point

@dataclass
class Job:
    "A resumable `robust_attr` command: `args` (without the output), its output `out`, state `state`, the line `done` that says the output is written, and `same(a, b)`."
    name: str
    args: list
    out: str
    state: str|None
    same: object  # (reference output, trial output) -> (equal: bool, detail: str)
    done: str = 'saved '  # the start of the line printed once the output is written (what follows is the interpreter's exit)
    out_option: str = '--out'

    def command(self, workdir:Path, resume:bool=False):
        return [sys.executable, '-c', ENTRY, *self.args, self.out_option, str(workdir/self.out), *(['--resume'] if resume else [])]

def same_weights(a:Path, b:Path):
    "Do two saved models hold the same tensors, bit for bit?"
    import torch
    from robust_attr.models import load_model
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    if sa.keys() != sb.keys(): return False, f"different tensors: {sorted(sa.keys() ^ sb.keys())[:5]}"
    diff = {k: (sa[k].double() - sb[k].double()).abs().max().item() for k in sa if not torch.equal(sa[k], sb[k])}
    return not diff, f"{len(diff)} of {len(sa)} tensors differ, by up to {max(diff.values()):.3g}" if diff else f"all {len(sa)} tensors equal"

def saved_position(state:Path):
    "(epoch, batch) where a training state goes on, or None when there is none."
    if not state.exists(): return None
    from robust_attr.train import read_training_state
    s = read_training_state(state)
    return s['epoch'], s['batch']

def train_job(name, method_args, n_train, epochs, save_every, bs=16, n_valid=32):
    "A `robust_attr train` job on the bundled digits, its state saved every `save_every` batches as well as after each epoch."
    args = ['train', '--data', 'digits', *method_args, '--n-train', str(n_train), '--n-valid', str(n_valid), '--bs', str(bs),
            '--epochs', str(epochs), '--save-every', str(save_every), '--seed', '0', '--no-progress']
    return Job(name, args, 'model.pth', 'model.state.pth', same_weights)

def train_jobs(smoke=False):
    "Natural training, and Madry's adversarial training (PGD from random starts, drawn from torch's generator)."
    n, e = (96, 2) if smoke else (160, 3)
    return {'train-natural': train_job('train-natural', ['--method', 'natural'], n, e, 2),
            'train-adv': train_job('train-adv', ['--method', 'adv', '--set', 'steps=3'], n, e, 3)}

JOBS = train_jobs  # name -> Job; an evaluation job joins here

# %% running one attempt

def _descendants(pid:int):
    "The processes started by `pid`, and theirs (from /proc; none where there is no /proc)."
    children = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try: ppid = int(stat.read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError): continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop(); out.append(p); todo += children.get(p, [])
    return out

class Attempt:
    "One run of a command in its own session, its output read by threads (so a full pipe never blocks it); `finished` once it prints `done` or ends."
    def __init__(self, cmd, cwd:Path, done:str|None=None):
        env = os.environ | dict(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])), OMP_NUM_THREADS='1')
        self.p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out, self.err, self.times, self.done = [], [], [], done
        self.started, self.finished, self.done_at = threading.Event(), threading.Event(), None
        self.readers = [threading.Thread(target=self._read, args=(self.p.stdout, self.out, True), daemon=True),
                        threading.Thread(target=self._read, args=(self.p.stderr, self.err, False), daemon=True)]
        for t in self.readers: t.start()

    def _read(self, stream, lines, first):
        for line in stream:
            lines.append(line)
            if not first: continue
            self.times.append(time.monotonic()); self.started.set()
            if self.done and line.startswith(self.done): self.done_at = self.times[-1]; self.finished.set()
        if first: self.started.set(); self.finished.set()  # the output ended: nothing more to wait for

    def kill(self, sig=signal.SIGKILL):
        "Send `sig` to the attempt's process group; SIGKILL also to every descendant (torchrun starts its workers in sessions of their own)."
        pids = _descendants(self.p.pid) if sig == signal.SIGKILL else []
        for pid in pids:
            try: os.kill(pid, sig)
            except ProcessLookupError: pass
        try: os.killpg(self.p.pid, sig)
        except ProcessLookupError: pass

    def wait(self, timeout:float):
        "The exit status; on timeout the group is killed and `TimeoutError` raised."
        try: rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(); self.p.wait()
            raise TimeoutError(f"no exit after {timeout:.0f} s:\n{''.join(self.out[-5:])}{''.join(self.err[-10:])}") from None
        for t in self.readers: t.join(5)
        return rc

    def __enter__(self): return self
    def __exit__(self, *exc):
        self.kill()  # the leader may be gone while a worker it started is not
        if self.p.poll() is None: self.p.wait()

def run_once(cmd, cwd:Path, timeout:float, done:str|None=None):
    "Run `cmd` to its end: (exit status, its working time: seconds from its first line of output to the `done` line (else its last), stdout, stderr)."
    with Attempt(cmd, cwd, done) as a:
        if not a.started.wait(timeout): raise TimeoutError(f"no output after {timeout:.0f} s: {' '.join(map(str, cmd[3:8]))} ...")
        rc = a.wait(timeout)
        end = a.done_at or (a.times[-1] if a.times else None)
        return rc, (end - a.times[0]) if a.times else 0., ''.join(a.out), ''.join(a.err)

# %% one trial

def trial(job:Job, workdir:Path, reference:Path, work:float, rng:random.Random, timeout:float=600, max_attempts:int=40,
          window:float=1.0, max_kills:int|None=None):
    "Run `job` in `workdir`, killing each attempt at a random moment of [0, `window`·`work`) after its first line (at most `max_kills` times), until one finishes."
    workdir.mkdir(parents=True, exist_ok=True)
    rec = dict(attempts=0, kills=0, kills_after_state=0, resumed_from=[], kill_fractions=[], failures=[])
    for attempt in range(max_attempts):
        rec['attempts'] += 1
        at = rng.random() * window if max_kills is None or rec['kills'] < max_kills else None
        with Attempt(job.command(workdir, resume=attempt > 0), workdir, job.done) as a:
            if not a.started.wait(timeout): raise TimeoutError(f"{job.name}: no output after {timeout:.0f} s")
            if at is not None and not a.finished.wait(at * work):  # still working: kill it now
                a.kill(); a.p.wait()
                rec['kills'] += 1; rec['kill_fractions'].append(round(at, 3))
                pos = saved_position(workdir/job.state) if job.state else None
                if pos is not None: rec['kills_after_state'] += 1; rec['resumed_from'].append(list(pos))
                continue
            rc = a.wait(timeout)
            if rc == 0: break
            rec['failures'].append(f"attempt {attempt+1} exited {rc}: {''.join(a.err)[-500:]}")
            break
    else: rec['failures'].append(f"not finished after {max_attempts} attempts")
    out = workdir/job.out
    rec['temporaries_left'] = sorted(p.name for p in workdir.iterdir() if p.name.endswith('.part'))
    rec['equal'], rec['detail'] = same_weights_or_missing(job, reference, out)
    return rec

def same_weights_or_missing(job, reference, out):
    if not out.exists(): return False, f"no output {out.name}"
    return job.same(reference, out)

# %% the soak

def soak(jobs:dict, trials:int, seed:int, root:Path, timeout:float=600, log=print):
    "Run `trials` trials, cycling through `jobs`; return the per-job totals and every trial's record."
    rng = random.Random(seed)
    refs, report = {}, {name: dict(trials=0, attempts=0, kills=0, kills_after_state=0, mismatches=0, failures=0,
                                   temporaries_left=0, command=' '.join(['robust_attr', *j.args]), records=[])
                        for name, j in jobs.items()}
    names = list(jobs)
    for i in range(trials):
        job = jobs[names[i % len(names)]]
        if job.name not in refs:
            d = root/job.name/'reference'; d.mkdir(parents=True, exist_ok=True)
            rc, work, out, err = run_once(job.command(d), d, timeout, job.done)
            if rc: raise RuntimeError(f"{job.name}: the uninterrupted reference run failed ({rc}):\n{err[-2000:]}")
            refs[job.name] = d/job.out, work
            log(f"{job.name}: reference done")
        reference, work = refs[job.name]
        rec = trial(job, root/job.name/f'trial{i}', reference, work, rng, timeout)
        r = report[job.name]
        r['records'].append(rec)
        r['trials'] += 1
        for k in ('attempts', 'kills', 'kills_after_state'): r[k] += rec[k]
        r['mismatches'] += not rec['equal']; r['failures'] += len(rec['failures']); r['temporaries_left'] += len(rec['temporaries_left'])
        log(f"{job.name} trial {i}: {rec['kills']} kills ({rec['kills_after_state']} after a saved state), "
            f"{'equal' if rec['equal'] else 'MISMATCH'}: {rec['detail']}" + (f"; failures: {rec['failures']}" if rec['failures'] else ''))
    return report

def totals(report:dict):
    return {k: sum(r[k] for r in report.values()) for k in ('trials', 'attempts', 'kills', 'kills_after_state', 'mismatches', 'failures', 'temporaries_left')}

def markdown(report:dict, info:dict, args) -> str:
    rows = ['| job | trials | attempts | kills | kills after a saved state | mismatches | failures | temporaries left |',
            '|---|---|---|---|---|---|---|---|']
    for name, r in report.items():
        rows.append(f"| {name} | {r['trials']} | {r['attempts']} | {r['kills']} | {r['kills_after_state']} | {r['mismatches']} | {r['failures']} | {r['temporaries_left']} |")
    t = totals(report)
    rows.append(f"| **all** | {t['trials']} | {t['attempts']} | {t['kills']} | {t['kills_after_state']} | {t['mismatches']} | {t['failures']} | {t['temporaries_left']} |")
    commands = '\n'.join(f"* `{name}`: `{r['command']} --out model.pth [--resume]`" for name, r in report.items())
    positions = '\n'.join(f"* `{name}`: " + ', '.join(f"({e}, {b})" for rec in r['records'] for e, b in rec['resumed_from'])
                          for name, r in report.items())
    return f"""# Fault soak: SIGKILL at random moments, then `--resume`

`{info['command']}` (seed {args.seed}); {info['date']}; torch {info['torch']}, fastai {info.get('fastai')}, python {info['python']},
OMP_NUM_THREADS={info['omp_num_threads']}, load average {info['load']}.

Each trial runs the job afresh and kills its process group with SIGKILL at a moment drawn uniformly from the
uninterrupted run's working time (from its first line of output to its last), resumes with `--resume`, and repeats until an
attempt finishes by itself; then it compares the output with the uninterrupted run's (the weights, bit for bit).

{chr(10).join(rows)}

Commands (each trial in its own directory):

{commands}

Where the resumed attempts went on from (epoch, batch done in it; 0 = the epoch's start):

{positions}

"kills after a saved state": the kill found a training state to resume from (the others started again from the
beginning). "temporaries left": `.part` files of atomic writes a kill interrupted (never a half file under a final
name); a later save replaces the state, not the temporary.
"""

def main(argv=None):
    from _env import env_info, load, write
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--trials', type=int, default=12, help='trials, cycling through the jobs (default 12: about 14 kills, one per trial and a bit)')
    p.add_argument('--jobs', nargs='*', default=None, help='job names (default: all)')
    p.add_argument('--seed', type=int, default=0, help='seed of the kill moments')
    p.add_argument('--smoke', action='store_true', help='one short trial of the natural training job, written as fault_soak_smoke.*')
    p.add_argument('--workdir', default=None, help='directory for the trials (default: a temporary one, removed)')
    p.add_argument('--timeout', type=float, default=600, help='seconds one attempt may take')
    args = p.parse_args(argv)
    jobs = JOBS(smoke=args.smoke)
    if args.smoke: args.trials, args.jobs = 1, args.jobs or ['train-natural']
    if args.jobs:
        unknown = set(args.jobs) - set(jobs)
        if unknown: p.error(f"unknown jobs {sorted(unknown)}; jobs: {sorted(jobs)}")
        jobs = {k: jobs[k] for k in args.jobs}
    import tempfile
    with tempfile.TemporaryDirectory(prefix='fault_soak_') as tmp:
        report = soak(jobs, args.trials, args.seed, Path(args.workdir or tmp), args.timeout)
    info = env_info() | dict(load=load())
    name = 'fault_soak_smoke' if args.smoke else 'fault_soak'
    result = dict(env=info, seed=args.seed, totals=totals(report), jobs=report)
    write(name, result, markdown(report, info, args))
    print(json.dumps(totals(report)))
    return 1 if totals(report)['mismatches'] or totals(report)['failures'] else 0

if __name__ == '__main__':
    sys.exit(main())
