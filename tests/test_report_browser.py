"The audit's HTML report opened in headless Chromium (Debian's `chromium`): every image decodes, no server needed, the verdict and provenance are there, no table cell wraps."
import hashlib, os, re, shutil, signal, subprocess
from pathlib import Path
import pytest

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")

# Marks the body, once the page has loaded, with how many images there are and how many decoded, how many lines the
# tallest table cell holds, how far the page overflows the window sideways, and the page's visible text.
PROBE = ("<script>window.addEventListener('load', () => { const im = [...document.images], b = document.body.dataset;"
         " b.images = im.length; b.loaded = im.filter(i => i.complete && i.naturalWidth > 0).length;"
         " const lines = td => { const s = getComputedStyle(td);"
         "   return (td.clientHeight - parseFloat(s.paddingTop) - parseFloat(s.paddingBottom)) / parseFloat(s.lineHeight); };"
         " b.lines = Math.max(...[...document.querySelectorAll('td')].map(lines)).toFixed(2);"
         " b.overflow = document.documentElement.scrollWidth - window.innerWidth;"
         " const t = document.createElement('pre'); t.id = 'text'; t.textContent = document.body.innerText; document.body.appendChild(t); });</script>")

def dump_dom(page:Path, width:int=1200):
    "The DOM of `page` after load in a `width`-pixel window, as headless Chromium serializes it; no Chromium process outlives the call."
    p = subprocess.Popen([CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--virtual-time-budget=10000', f'--window-size={width},2000',
                          '--dump-dom', page.resolve().as_uri()], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try: return p.communicate(timeout=120)[0]
    finally:
        try: os.killpg(p.pid, signal.SIGKILL)  # Chromium's helpers share its process group
        except ProcessLookupError: pass
        p.wait()

def probe(dom:str):
    "What the probe found: `dict(images, loaded, lines, overflow, text)`."
    m = re.search(r'data-images="(\d+)" data-loaded="(\d+)" data-lines="([\d.]+)" data-overflow="(-?\d+)"', dom)
    assert m, f"the probe did not run: {dom[:300]!r}"
    text = re.search(r'<pre id="text">(.*?)</pre>', dom, re.S)[1]
    return dict(images=int(m[1]), loaded=int(m[2]), lines=float(m[3]), overflow=int(m[4]), text=text)

def probed(html:str, path:Path, **kwargs):
    path.write_text(html.replace('</body>', PROBE + '</body>'))
    return probe(dump_dom(path, **kwargs))

@pytest.fixture(scope='module')
def report(tmp_path_factory):
    "A report on a small digits classifier, compared with a second one; its file named as `audit_saved` names a checkpoint."
    import torch
    from robust_attr.audit import digits_probe
    from robust_attr.data import get_arrays
    from robust_attr.report import audit, audit_html, checkpoint_record
    d = tmp_path_factory.mktemp('report')
    x, y = get_arrays('digits', 'valid')
    net = digits_probe()
    torch.save(net.state_dict(), d/'probe.pt')
    res = audit(net, x[:40], y[:40], 'digits', n=4, reference=digits_probe(seed=1), certify=dict(n_images=2, n_samples=50), bs=4,
                ifia_steps=2, ig_steps=4, attack_ig_steps=2, k=10, attack_k=10)
    res.update(checkpoint=checkpoint_record(d/'probe.pt'), data='digits', split='valid')
    return res, audit_html(res), d

def test_report_images_all_load_in_chromium(report):
    res, html, d = report
    p = probed(html, d/'audit.html')
    assert p['images'] == 3 and p['loaded'] == 3  # histograms, worst examples, certificate: all decoded from the page itself

def test_probe_sees_a_broken_image(report):
    "The check can fail: a truncated data URI is an image that does not load."
    res, html, d = report
    broken = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]{40}", "data:image/png;base64,AAAA", html, count=1)
    p = probed(broken, d/'broken.html')
    assert (p['images'], p['loaded']) == (3, 2)

def test_report_states_verdict_and_provenance(report):
    "The page a reader sees names the file by its hash, the data, the versions, every member, and gives the verdict in words."
    import torch
    res, html, d = report
    text = probed(html, d/'audit.html')['text']
    assert hashlib.sha256((d/'probe.pt').read_bytes()).hexdigest() in text
    assert 'the valid split of digits' in text and f'torch {torch.__version__}' in text
    assert re.search(r'Verdict\. Within the L∞ ball of radius ε = 0\.1 .* below it in CO|cannot be told apart from noise|too weak', text)
    assert 'The reference model' in text and 'Against the reference model' in text
    for m in res['members']: assert re.search(rf'\n{m}\t', text)  # a row per member, the targeted one included
    assert 'targeted' in res['members']
    assert not re.search(r'\b\w*(Error|Warning|Exception)\b', text)

def test_no_table_cell_wraps(report):
    "Every cell of every table is one line, and the page fits a 1200-pixel window without scrolling sideways."
    res, html, d = report
    p = probed(html, d/'audit.html')
    assert p['lines'] < 1.5 and p['overflow'] <= 0

def test_wrap_check_can_fail(report):
    "The check can fail: without `white-space: nowrap` the interval cells wrap in the same window."
    res, html, d = report
    p = probed(html.replace('white-space:nowrap', ''), d/'wrapped.html')
    assert p['lines'] >= 1.5
