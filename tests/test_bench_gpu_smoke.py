"""`bench/gpu.py --smoke` runs every code path of the GPU check on the CPU, so the script is ready when a GPU is lent."""
import json, os, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_gpu_check_smoke(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    r = subprocess.run([sys.executable, 'bench/gpu.py', '--smoke', '--out', str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = (tmp_path/'gpu_smoke.md').read_text()
    for section in ('## 1. Device tests', '## 2. IFIA throughput', '## 3. Training step time', '## 4. Determinism'):
        assert section in text, section
    res = json.loads(re.search(r'```json\n(.*)\n```', text, re.S).group(1))
    t = res['device_tests']
    assert t['returncode'] == 0 and t['passed'] >= 1 and t['failed'] == 0, t
    f = res['ifia']
    assert 'error' not in f and f['n_batched'] == 4 and f['n_single'] == 2 and f['speedup'] > 0, f
    assert 0 < f['mean_kendall_batched_all'] <= 1 and 0 < f['mean_kendall_single'] <= 1
    rows = res['training']
    assert {(row['arch'], row['method']) for row in rows} == {('small_cnn', 'aat'), ('resnet18', 'aat')}
    assert all(row[mode]['ms'] > 0 for row in rows for mode in ('fp32', 'tf32', 'bf16')), rows
    d = res['determinism']['default']   # on a CPU two seeded runs are equal
    assert d['ifia']['equal'] and d['aat_step']['equal'], d
