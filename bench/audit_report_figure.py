"""The docs' screenshot of an audit report: nbs/images/audit_report.png.

    flock /tmp/bench.lock python bench/audit_report_figure.py    # a few minutes on 2 cores
    python bench/audit_report_figure.py --smoke                    # seconds: tiny budgets, 4 images, the screenshot in /tmp only

Runs `robust_attr audit` on the committed Fashion-MNIST AAT model (bench/models/far_quick_seed42/aat.pth) with the natural
model it was fine-tuned from as the reference, on the first 20 correctly classified test images (classes in turn), with
the certificate, under the quick protocol with smaller budgets (IFIA 10 steps, IG 16 / 4 points); writes the HTML to
/tmp/robust_attr_audit/audit.html and photographs the whole page with headless Chromium.
"""
import argparse, os, re, shutil, signal, subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT, IMAGE = Path('/tmp/robust_attr_audit/audit.html'), ROOT/'nbs/images/audit_report.png'
MODELS = Path('bench/models/far_quick_seed42')  # relative to the repository: the report names the files as given
WIDTH = 1200
HEIGHT = ("<script>window.addEventListener('load', () => "
          "{ document.body.dataset.height = document.documentElement.scrollHeight; });</script>")

def chromium(*args):
    "Run headless Chromium with `args`; its stdout. No Chromium process outlives the call."
    exe = shutil.which('chromium') or shutil.which('google-chrome')
    p = subprocess.Popen([exe, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars', '--virtual-time-budget=10000', *args],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try: return p.communicate(timeout=180)[0]
    finally:
        try: os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError: pass
        p.wait()

def screenshot(page:Path, image:Path):
    "The whole page as a PNG `WIDTH` pixels wide (its height measured in the browser first)."
    probe = page.with_suffix('.height.html')
    probe.write_text(page.read_text().replace('</body>', HEIGHT + '</body>'))
    height = int(re.search(r'data-height="(\d+)"', chromium(f'--window-size={WIDTH},1000', '--dump-dom', probe.resolve().as_uri()))[1])
    chromium(f'--window-size={WIDTH},{height}', f'--screenshot={image}', page.resolve().as_uri())

def main(smoke:bool=False):
    from robust_attr.report import audit_saved
    os.chdir(ROOT)
    sizes = dict(n=4, ifia_steps=2, ig_steps=4, attack_ig_steps=2) if smoke else dict(n=20, ifia_steps=10, ig_steps=16, attack_ig_steps=4)
    audit_saved(MODELS/'aat.pth', reference=MODELS/'nat.pth', out=OUT, certify=not smoke, bs=20, **sizes)
    image = OUT.with_suffix('.png') if smoke else IMAGE
    screenshot(OUT, image)
    print(f'{OUT}\n{image}')

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--smoke', action='store_true', help='tiny budgets, 4 images; the screenshot goes to /tmp, not the docs')
    main(ap.parse_args().smoke)
