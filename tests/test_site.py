"""The documentation site without Quarto (`tools/site.py`): built offline from the notebooks, every page opened in
headless Chromium, every link followed to a page (and its anchor) or a file that exists, every image decoded."""
import importlib.util, os, re, shutil, subprocess, sys
from pathlib import Path
from urllib.parse import urlparse, unquote
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = shutil.which('chromium') or '/usr/bin/chromium', shutil.which('chromedriver') or '/usr/bin/chromedriver'


def _tool():
    "tools/site.py as a module (not as `site`, which is Python's own)."
    spec = importlib.util.spec_from_file_location('robust_attr_site_tool', ROOT/'tools'/'site.py')
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    return m


def test_without_the_dev_extras_it_says_what_to_install(capsys):
    t = _tool()
    t.NEEDS = dict(t.NEEDS, no_such_module_here='a-package-for-the-test')
    assert t.main(['--out', 'unused']) == 2
    err = capsys.readouterr().err
    assert 'pip install -e ".[dev]"' in err and 'a-package-for-the-test' in err


def test_every_tutorial_has_its_place_in_the_learning_order():
    t = _tool()
    assert sorted(t.TUTORIAL_ORDER) == sorted(p.stem for p in (ROOT/'nbs'/'tutorials').glob('*.ipynb'))
    keys = [t.nav_order(f'tutorials/{n}.html', f'{n}.ipynb') for n in sorted(t.TUTORIAL_ORDER)]
    assert [k[2] for k in sorted(keys)] == t.TUTORIAL_ORDER   # not alphabetical
    assert t.nav_order('index.html', 'index.ipynb') < min(keys) < max(keys) < t.nav_order('core.html', '00_core.ipynb')
    assert t.nav_order('core.html', '00_core.ipynb') < t.nav_order('attribution.html', '02_attribution.ipynb')


def _code(src, outputs=()): return dict(cell_type='code', source=src, outputs=list(outputs))


def test_a_slow_switch_is_one_block():
    t = _tool()
    quick, full = _code('epochs, n = 3, 10'), _code('#| slow\nepochs, n = 8, 100')
    cells = [dict(cell_type='markdown', source='# A'), quick, full, _code('fit(epochs)')]
    assert t.switch_pairs(cells) == [1]
    html = t._cells(cells)
    assert html.count('class="switch"') == 1 and html.count('<pre class="code') == 3   # the switch's two sides, fit(...)
    assert 'quick run' in html and 'full run' in html and html.index('3</span>') < html.index('8</span>')
    bare = [dict(c, source=c['source'].replace('#| slow\n', '')) for c in cells]    # as nbdev's processing leaves them
    assert t._cells(bare, t.switch_sources(cells)) == html and t._cells(bare).count('class="switch"') == 0
    assert t.switch_pairs([quick, _code('#| slow\nfit(epochs)')]) == []            # a slow cell that does the work
    assert t.switch_pairs([quick, _code('#| slow\nlr = 1')]) == []                  # other settings
    assert t.switch_pairs([_code('epochs = 3', [dict(output_type='stream', text='x')]), full]) == []
    assert t.switch_pairs([dict(cell_type='markdown', source='epochs = 3'), full]) == []


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "The site, built by `python tools/site.py` into a temporary folder; `(folder, exit status, stderr)`."
    pytest.importorskip('nbdev', reason='tools/site.py needs the dev extras (nbdev)')
    out = tmp_path_factory.mktemp('site')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'site.py'), '--out', str(out)], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=900)
    assert (out/'index.html').exists(), r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.returncode, r.stderr


def test_nbdev_processes_every_notebook(site):
    "nbdev's documentation processing (the step nbdev_docs runs before Quarto) succeeds on every notebook."
    out, rc, err = site
    assert rc == 0, err[err.find("nbdev's documentation processing"):][-3000:]


def test_site_has_every_page(site):
    site = site[0]
    pages = {p.relative_to(site).as_posix() for p in site.rglob('*.html')}
    assert 'index.html' in pages and 'widgets.html' in pages and 'explore_app.html' in pages
    tutorials = {f'tutorials/{p.stem}.html' for p in (ROOT/'nbs'/'tutorials').glob('*.ipynb')}
    assert tutorials <= pages, tutorials - pages
    assert 'id="saliencyexplorer"' in (site/'widgets.html').read_text()  # show_doc output, with its anchor
    assert (site/'tutorials'/'fragile.html').read_text().count('<img alt="figure"') >= 2  # the committed figures


def test_sidebar_and_switches(site):
    "The sidebar lists the tutorials in learning order; each tutorial's quick/full settings show as one switch."
    site, t = site[0], _tool()
    nav = re.search(r'<nav>(.*?)</nav>', (site/'index.html').read_text(), re.S)[1]
    listed = re.findall(r'href="tutorials/([a-z_]+)\.html"', nav)
    assert listed == t.TUTORIAL_ORDER, listed
    page = (site/'tutorials'/'fragile.html').read_text()
    assert page.count('class="switch"') == 1 and 'full run' in page


COLLECT = """
const ids = [...document.querySelectorAll('[id]')].map(e => e.id);
const links = [...document.querySelectorAll('a[href]')].map(a => a.href);
const imgs = [...document.querySelectorAll('img')].map(i => [i.getAttribute('src').slice(0, 80), i.complete && i.naturalWidth > 0]);
return [ids, links, imgs, document.querySelectorAll('nav a').length];
"""


def test_no_broken_links_or_missing_images(site):
    site = site[0] if isinstance(site, tuple) else site
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()): pytest.skip("apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip('selenium.webdriver')
    o = webdriver.ChromeOptions()
    for a in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--allow-file-access-from-files'): o.add_argument(a)
    o.binary_location = CHROMIUM
    d = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=o)
    pages, seen = sorted(site.rglob('*.html')), {}
    try:
        for p in pages:
            d.get(p.as_uri())
            seen[p] = d.execute_script(COLLECT)
    finally: d.quit()
    broken, missing, external = [], [], set()
    for p, (ids, links, imgs, nav) in seen.items():
        assert nav == len(pages), f"{p.name}: the sidebar links {nav} pages of {len(pages)}"
        missing += [f"{p.relative_to(site)}: {src}" for src, ok in imgs if not ok]
        for url in links:
            u = urlparse(url)
            if u.scheme in ('http', 'https'): external.add(u.netloc); continue
            if u.scheme != 'file': continue
            target = Path(unquote(u.path))
            if not target.exists(): broken.append(f"{p.relative_to(site)} → {url}")
            elif u.fragment and target.suffix == '.html' and target in seen and unquote(u.fragment) not in seen[target][0]:
                broken.append(f"{p.relative_to(site)} → {url} (no such anchor)")
    assert not missing, missing
    assert not broken, '\n'.join(broken[:40])
    assert 'robust-attr.github.io' not in external  # the doc host's links are relative on the offline site
