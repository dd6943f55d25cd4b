"The audit's HTML report opened in headless Chromium (Debian's `chromium`): every image decodes, no server needed."
import re, shutil, subprocess
from pathlib import Path
import pytest

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")

# Marks the body, once the page has loaded, with how many images there are and how many decoded.
PROBE = ("<script>window.addEventListener('load', () => { const im = [...document.images];"
         " document.body.dataset.images = im.length;"
         " document.body.dataset.loaded = im.filter(i => i.complete && i.naturalWidth > 0).length; });</script>")

def dump_dom(page:Path):
    "The DOM of `page` after load, as headless Chromium serializes it."
    out = subprocess.run([CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--virtual-time-budget=10000', '--dump-dom',
                          page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    return out.stdout

def counts(dom:str):
    m = re.search(r'data-images="(\d+)" data-loaded="(\d+)"', dom)
    assert m, f"the probe did not run: {dom[:300]!r}"
    return int(m[1]), int(m[2])

def probed(html:str, path:Path):
    path.write_text(html.replace('</body>', PROBE + '</body>'))
    return path

@pytest.fixture(scope='module')
def report(tmp_path_factory):
    from robust_attr.audit import digits_probe
    from robust_attr.data import get_arrays
    from robust_attr.report import audit, audit_html
    x, y = get_arrays('digits', 'valid')
    res = audit(digits_probe(), x[::37][:8], y[::37][:8], 'digits', n=4, certify=dict(n_images=2, n_samples=50), bs=4,
                ifia_steps=2, ig_steps=4, attack_ig_steps=2, k=10, attack_k=10)
    return audit_html(res), tmp_path_factory.mktemp('report')

def test_report_images_all_load_in_chromium(report):
    html, d = report
    images, loaded = counts(dump_dom(probed(html, d/'audit.html')))
    assert images == 3 and loaded == 3  # histograms, worst examples, certificate: all decoded from the page itself

def test_probe_sees_a_broken_image(report):
    "The check can fail: a truncated data URI is an image that does not load."
    html, d = report
    broken = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]{40}", "data:image/png;base64,AAAA", html, count=1)
    assert counts(dump_dom(probed(broken, d/'broken.html'))) == (3, 2)
