"""The docs' screenshot of an audit report: nbs/images/audit_report.png.

    python bench/audit_report_figure.py          # about a minute on 2 cores

Audits the small digits classifier of the audit notebook (`audit.digits_probe`) on 20 validation digits under the digits
protocol with small budgets (IFIA 10 steps, IG 16 / 4 points), with the certificate, writes the HTML to
/tmp/robust_attr_audit/audit.html and photographs it with headless Chromium.
"""
import shutil, subprocess
from pathlib import Path
from robust_attr.audit import digits_probe
from robust_attr.data import get_arrays
from robust_attr.report import audit

OUT, IMAGE = Path('/tmp/robust_attr_audit/audit.html'), Path(__file__).resolve().parents[1]/'nbs/images/audit_report.png'

def main():
    x, y = get_arrays('digits', 'valid')
    audit(digits_probe(), x[::7], y[::7], 'digits', n=20, certify=dict(n_images=10, n_samples=500), out=OUT, bs=20,
          ifia_steps=10, ig_steps=16, attack_ig_steps=4, k=50, attack_k=50)
    chromium = shutil.which('chromium') or shutil.which('google-chrome')
    subprocess.run([chromium, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars', '--virtual-time-budget=10000',
                    '--window-size=1200,2600', f'--screenshot={IMAGE}', OUT.resolve().as_uri()], check=True, capture_output=True)
    print(f'{OUT}\n{IMAGE}')

if __name__ == '__main__': main()
