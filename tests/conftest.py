"Shared pytest fixtures, and the check that no test leaves a process behind."
import os, signal, time, uuid
from pathlib import Path

import pytest

from robust_attr.data import fashion_mnist_path

@pytest.fixture(scope='session')
def fashion_mnist():
    "Directory with the four Fashion-MNIST IDX files; skips the test when none is installed."
    path = fashion_mnist_path()
    if path is None:
        pytest.skip("Fashion-MNIST not found: install it with `apt-get install dataset-fashion-mnist` "
                    "or pass its directory with `path=`")
    return path


# Every process a test starts inherits this run's mark in its environment (tests pass `dict(os.environ, ...)` on), also
# one whose parent has died and that the system has adopted: at the end of the session none may still run.
RUN_MARK = 'ROBUST_ATTR_TEST_RUN'
os.environ[RUN_MARK] = f'{os.getpid()}-{uuid.uuid4().hex[:12]}'
GRACE_S = 15  # for processes that are on their way out (a browser's helpers, a kernel polling for its parent)


def _state(pid):
    "The process's state letter from /proc ('Z': exited, not yet reaped), None if it is gone."
    try: return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError): return None


def marked_processes():
    "`{pid: command line}` of the running processes, other than this one, that carry this run's mark."
    mark, out = f'{RUN_MARK}={os.environ[RUN_MARK]}'.encode(), {}
    for d in Path('/proc').glob('[0-9]*'):
        pid = int(d.name)
        if pid == os.getpid(): continue
        try:
            if mark not in (d/'environ').read_bytes().split(b'\0'): continue
            cmd = (d/'cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace').strip()
        except OSError: continue
        if _state(pid) not in (None, 'Z'): out[pid] = cmd
    return out


@pytest.fixture(scope='session', autouse=True)
def no_process_left_behind():
    "After the last test: fail, naming them, if processes the tests started still run (and stop them)."
    yield
    if not Path('/proc/self/environ').exists(): return   # lists processes through Linux's /proc
    end = time.time() + GRACE_S
    while (left := marked_processes()) and time.time() < end: time.sleep(0.5)
    if not left: return
    for pid in left:
        try: os.kill(pid, signal.SIGKILL)
        except OSError: pass
    pytest.fail(f"{len(left)} process(es) started by the tests still ran {GRACE_S} s after the last test (now killed):\n" +
                '\n'.join(f'  {pid}: {cmd[:300]}' for pid, cmd in left.items()), pytrace=False)
