"""`robust_attr explore` as a person meets it: the command serves the explorer, headless Chromium opens the page, and
the test uses its controls (the index box, the map buttons, the steps slider, the model list, Run and Stop) and checks
what the page shows: the figures, IN and CO, Stop ending a long attack, a bad setting as a message, never a traceback.

Needs Chromium and its driver (Debian: `apt-get install chromium chromium-driver`; `.ci/run` installs them), Selenium
and Voilà (the dev requirements); skips without them. `EXPLORER_SCREENSHOT=path.png` saves a screenshot after the
attack (the docs' `nbs/images/explore_app.png` is one)."""
import os, re, shutil, subprocess, sys, threading, time
from pathlib import Path
import pytest

CHROMIUM, DRIVER = shutil.which('chromium') or '/usr/bin/chromium', shutil.which('chromedriver') or '/usr/bin/chromedriver'
if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
    pytest.skip("Chromium and chromedriver are needed: apt-get install chromium chromium-driver", allow_module_level=True)
webdriver = pytest.importorskip('selenium.webdriver')
pytest.importorskip('voila')
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.support.ui import Select, WebDriverWait

ROOT = Path(__file__).resolve().parents[1]
LOAD_S, RUN_S = 120, 90  # page load (a kernel starts, imports torch); one attack run


def _models(d):
    "Two small CNNs fitted for a few steps on 100 digits, saved as `robust_attr train` saves them."
    import torch, torch.nn.functional as F
    from robust_attr.data import get_arrays
    from robust_attr.models import SmallCNN, save_model
    from robust_attr.evaluate import threat_model_for
    x, y = get_arrays('digits', 'train', n=100, seed=0)
    for i, name in enumerate(['nat', 'other']):
        torch.manual_seed(i); m = SmallCNN(); opt = torch.optim.Adam(m.parameters(), 3e-3)
        for _ in range(10): opt.zero_grad(); F.cross_entropy(m(x), y).backward(); opt.step()
        save_model(m.eval(), d/f'{name}.pth', data='digits', threat=threat_model_for('digits'), method='natural')
    return [d/'nat.pth', d/'other.pth']


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    "`robust_attr explore` on two saved models, on 127.0.0.1 and a free port; yields the address it prints."
    a, b = _models(tmp_path_factory.mktemp('models'))
    cmd = [sys.executable, '-c', 'import sys; from robust_attr.cli import main; sys.exit(main())', 'explore',
           '--model', str(a), '--model', str(b), '--n', '16', '--set', 'steps=5', '--set', 'ig_steps=10', '--set', 'attack_ig_steps=3']
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]), OMP_NUM_THREADS='1')
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True); reader.start()
    try:
        end = time.time() + LOAD_S
        while not any('http://' in l for l in lines) and proc.poll() is None and time.time() < end: time.sleep(0.2)
        url = next((re.search(r'http://\S+', l).group() for l in lines if 'http://' in l), None)
        assert url, f"no address printed: {''.join(lines)}"
        assert url.startswith('http://127.0.0.1:')
        yield url
    finally:
        proc.terminate()
        try: proc.wait(15)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()


@pytest.fixture(scope='module')
def page(server):
    "Headless Chromium on the explorer's page, once its Run button is there."
    o = webdriver.ChromeOptions()
    for a in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1000,1500'): o.add_argument(a)
    o.binary_location = CHROMIUM
    d = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=o)
    try:
        d.get(server)
        WebDriverWait(d, LOAD_S).until(lambda d: d.find_elements(By.XPATH, "//button[contains(., 'Run attack')]"))
        yield d
    finally: d.quit()


def button(d, text): return d.find_element(By.XPATH, f"//button[normalize-space(.)='{text}']")
def status(d): return d.find_elements(By.CSS_SELECTOR, '.widget-html-content')[0].text
def table(d): return d.find_elements(By.CSS_SELECTOR, '.widget-html-content')[1].text
def images(d): return d.find_elements(By.CSS_SELECTOR, '.widget-image')
def wait_status(d, pattern, timeout=RUN_S):
    "Wait until the status line matches `pattern`; fail saying what the page shows instead."
    try: WebDriverWait(d, timeout).until(lambda d: re.search(pattern, status(d)))
    except TimeoutException: raise AssertionError(f"after {timeout} s the status line is {status(d)!r}, not /{pattern}/") from None
    return status(d)

def pixels(d, img):
    "The image as the browser decoded it: (width, height, number of distinct colours, data URL)."
    return d.execute_script("""
        const img = arguments[0]; if (!img.complete || !img.naturalWidth) return null;
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const px = g.getImageData(0, 0, c.width, c.height).data, seen = new Set();
        for (let i = 0; i < px.length; i += 4) seen.add((px[i] << 16) | (px[i+1] << 8) | px[i+2]);
        return [c.width, c.height, seen.size, c.toDataURL()];""", img)

def set_text(el, value):
    "Type into a text box as a person does: select what is there, type, press Enter."
    el.click(); el.send_keys(Keys.CONTROL, 'a'); el.send_keys(str(value), Keys.ENTER)

def numbers(text, name):
    "The values of a column of the explorer's table, as shown."
    rows = [l.split() for l in text.splitlines()]
    col = rows[0].index(name) + 1  # the header has no cell above the row names
    return [float(r[col]) for r in rows[1:]]

def no_traceback(d):
    text = d.find_element(By.TAG_NAME, 'body').text
    assert 'Traceback' not in text and 'Error:' not in text.replace('ValueError:', ''), text


def test_page_shows_the_explorer(page):
    assert re.search(r'sample 0 \(label \d\): press Run attack', status(page))
    assert not images(page) and button(page, 'Run attack').is_enabled() and not button(page, 'Stop').is_enabled()
    no_traceback(page)


def test_run_shows_each_models_attacked_map_and_its_numbers(page):
    set_text(page.find_element(By.CSS_SELECTOR, '.widget-text input'), 3)
    wait_status(page, r'sample 3 \(label \d\)', 10)
    button(page, 'Run attack').click()
    wait_status(page, r'sample 3 \(label \d\): done in')
    imgs = images(page)
    assert len(imgs) == 2  # one figure per model
    shown = [pixels(page, i) for i in imgs]
    assert all(s is not None and s[0] > 300 and s[2] > 50 for s in shown), [s and s[:3] for s in shown]  # decoded, not blank
    assert shown[0][3] != shown[1][3]
    t = table(page)
    assert re.search(r'\bIN\b', t) and re.search(r'\bCO\b', t) and 'nat' in t and 'other' in t
    IN, CO = numbers(t, 'IN'), numbers(t, 'CO')
    assert all(0 <= v <= 1 for v in IN) and all(-1 <= v <= 1 for v in CO)
    assert min(IN) < 1 or min(CO) < 1  # the attack moved a map, as the page reports it
    page.first_ig = shown[0][3]

    button(page, 'Saliency').click()  # the other map, same sample
    for i in images(page): page.execute_script("arguments[0].dataset.old = 1", i)  # the last run's figures
    button(page, 'Run attack').click()
    second = WebDriverWait(page, RUN_S, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: 'done in' in status(d) and (imgs := images(d)) and not imgs[0].get_attribute('data-old') and pixels(d, imgs[0]))
    assert second is not None and second[2] > 50 and second[3] != page.first_ig  # the picture changed with the map
    if os.environ.get('EXPLORER_SCREENSHOT'): page.save_screenshot(os.environ['EXPLORER_SCREENSHOT'])
    no_traceback(page)


def test_stop_ends_a_long_run(page):
    readout = page.find_elements(By.CSS_SELECTOR, '.widget-slider .widget-readout')[2]  # sample, ε, steps, top-k
    set_text(readout, 200)
    WebDriverWait(page, 10).until(lambda d: readout.text.strip() == '200')
    button(page, 'Run attack').click()
    wait_status(page, r'attacking nat: step [2-9]', 60)
    assert not button(page, 'Run attack').is_enabled() and button(page, 'Stop').is_enabled()
    t0 = time.time()
    button(page, 'Stop').click()
    s = wait_status(page, r'stopped after', 30)
    steps = int(re.search(r'stopped after (\d+) of 200 steps on nat', s).group(1))
    assert 2 <= steps < 200 and time.time() - t0 < 30
    assert len(images(page)) == 1 and button(page, 'Run attack').is_enabled()
    no_traceback(page)


def test_an_invalid_setting_is_a_message(page):
    models = Select(page.find_element(By.CSS_SELECTOR, '.widget-select-multiple select'))
    models.deselect_all()
    WebDriverWait(page, 5).until(lambda d: not models.all_selected_options)
    time.sleep(1)  # the selection reaches the kernel as its own message: under load the click could overtake it (seen once in CI)
    button(page, 'Run attack').click()
    s = wait_status(page, r'attack failed', 20)
    assert 'select at least one model' in s and not images(page)
    assert button(page, 'Run attack').is_enabled()
    no_traceback(page)
