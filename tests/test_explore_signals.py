"""`robust_attr explore` stops on SIGTERM and SIGINT and takes everything it started with it: Voilà, the kernel of an
opened page, and the temporary folder with the served notebook.

The test starts the command as a user would, waits for the address it prints, opens the page once (so that Voilà starts
a kernel and runs the explorer in it), lists the processes below the command, sends the signal, and then checks that the
command exited, that none of those processes runs and that the folder is gone. Needs Voilà (the dev or app extras) and
Linux's `/proc`; about 20 s per signal."""
import os, re, signal, subprocess, sys, threading, time, urllib.request
from pathlib import Path

import pytest

pytest.importorskip('voila')
if not Path('/proc/self/stat').exists(): pytest.skip("lists processes through Linux's /proc", allow_module_level=True)

from robust_attr.explore_app import alive, descendants

ROOT = Path(__file__).resolve().parents[1]
START_S = 120  # the command checks its model and starts Voilà; the page starts a kernel that imports torch


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    "A saved SmallCNN for the digits (random weights: the explorer only has to start)."
    import torch
    from robust_attr.evaluate import threat_model_for
    from robust_attr.models import SmallCNN, save_model
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('explore')/'nat.pth'
    save_model(SmallCNN(), path, data='digits', threat=threat_model_for('digits'), method='natural')
    return path


def serve(model):
    "`robust_attr explore` started as a user starts it; the process, its output lines so far, and the address."
    cmd = [sys.executable, '-c', 'import sys; from robust_attr.cli import main; sys.exit(main())', 'explore',
           '--model', str(model), '--n', '8']
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]), OMP_NUM_THREADS='1')
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines = []
    proc.reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    proc.reader.start()
    end = time.time() + START_S
    while not any('http://' in l for l in lines) and proc.poll() is None and time.time() < end: time.sleep(0.2)
    url = next((re.search(r'http://\S+', l).group() for l in lines if 'http://' in l), None)
    if url is None:
        proc.kill(); proc.wait()
        pytest.fail(f"no address printed: {''.join(lines)}")
    return proc, lines, url


def parent(pid):
    "The parent's PID, from /proc."
    return int(Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[1])


def voila_folder(pid):
    "The folder of the notebook Voilà serves, read from its command line."
    args = Path(f'/proc/{pid}/cmdline').read_bytes().split(b'\0')
    nb = next(a.decode() for a in args if a.endswith(b'.ipynb'))
    return Path(nb).parent


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_explore_stops_its_servers_and_removes_its_files_on_a_signal(model, sig):
    proc, lines, url = serve(model)
    try:
        with urllib.request.urlopen(url, timeout=START_S) as r: page = r.read().decode()   # Voilà starts a kernel
        assert r.status == 200, page[:500]
        tree = descendants(proc.pid)
        voila = [p for p in tree if parent(p) == proc.pid]
        kernels = [p for p in tree if b'ipykernel' in Path(f'/proc/{p}/cmdline').read_bytes()]
        assert len(voila) == 1 and kernels, f"expected Voilà and a kernel below the command, found {tree}"
        folder = voila_folder(voila[0])
        assert folder.is_dir() and (folder/'explorer.ipynb').exists()
        assert os.getsid(voila[0]) != os.getsid(proc.pid)   # Voilà in a session of its own

        proc.send_signal(sig)
        assert proc.wait(60) == 0, ''.join(lines)
        proc.reader.join(10)
        end = time.time() + 10   # a kernel polls for its parent once a second
        while [p for p in tree if alive(p)] and time.time() < end: time.sleep(0.2)
        assert not [p for p in tree if alive(p)], f"still running after {sig.name}: {[p for p in tree if alive(p)]}"
        assert not folder.exists(), f"{folder} left behind"
        assert f'the explorer stopped ({sig.name})' in ''.join(lines), ''.join(lines)
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
