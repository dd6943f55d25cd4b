"Shared helpers of the benchmark scripts: the machine's state, timing, and writing results."
from __future__ import annotations
import json, os, platform, statistics, sys, time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent/'results'

def env_info() -> dict:
    "Versions, threads and load: what a timing depends on."
    import torch
    info = dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
                cpu_count=os.cpu_count(), machine=platform.machine(), processor=platform.processor() or None,
                omp_num_threads=os.environ.get('OMP_NUM_THREADS'), command='python ' + ' '.join(sys.argv),
                date=time.strftime('%Y-%m-%d %H:%M:%S %Z'))
    for mod in ('scipy', 'captum', 'fastai', 'numpy'):
        try: info[mod] = __import__(mod).__version__
        except ImportError: pass
    return info

def load() -> list:
    "The 1, 5 and 15 minute load averages."
    return [round(v, 2) for v in os.getloadavg()]

def timed(fn, *args, **kwargs):
    "`(result, seconds)` of one call."
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t

def summary(times:list) -> dict:
    "Median, min and all of a list of timings (seconds)."
    return dict(median=statistics.median(times), min=min(times), all=[round(t, 5) for t in times])

def write(name:str, result:dict, markdown:str, out=RESULTS):
    "Write `name`.json and `name`.md into `out`; return the two paths."
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    (out/f'{name}.json').write_text(json.dumps(result, indent=1))
    (out/f'{name}.md').write_text(markdown)
    return out/f'{name}.json', out/f'{name}.md'

DEFAULT_MODEL = '/tmp/robust_attr_bench/nat_fmnist.pth'
TRAIN_COMMAND = 'robust_attr train --data fashion_mnist --method natural --epochs 3 --bs 50 --out {path}'

def fashion_mnist_model(path=DEFAULT_MODEL):
    "The natural SmallCNN on Fashion-MNIST saved at `path`, trained first (3 epochs, a few minutes) if it is missing."
    from robust_attr.models import load_model
    path = Path(path)
    if not path.exists():
        from robust_attr.cli import train
        print(f"{path} not found: training it ({TRAIN_COMMAND.format(path=path)})", flush=True)
        train('fashion_mnist', 'small_cnn', 'natural', epochs=3, out=path, bs=50, progress=False)
    return load_model(path)

def set_threads(n):
    "Use `n` torch threads (None: keep torch's default); return the number in use."
    import torch
    if n: torch.set_num_threads(n)
    return torch.get_num_threads()

def with_notes(lines:list, r:dict) -> str:
    "The markdown of `lines`, with a Notes section when the result carries notes."
    if r.get('notes'): lines = lines + ['## Notes', '', *r['notes'], '']
    return '\n'.join(lines)

def model_parser(doc:str):
    "The parser of a script that measures the natural Fashion-MNIST SmallCNN: its `--model` and `--threads` options."
    import argparse
    ap = argparse.ArgumentParser(description=doc.split('\n')[0])
    ap.add_argument('--model', default=DEFAULT_MODEL, help='natural Fashion-MNIST SmallCNN (trained if missing)')
    ap.add_argument('--threads', type=int, help='torch threads (default: torch default)')
    return ap
