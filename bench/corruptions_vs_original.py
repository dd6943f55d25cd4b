"""CIFAR-10-C's corruptions in `robust_attr.art_evals` against the benchmark's own generator, on the same images and draws.

    python bench/corruptions_vs_original.py --original DIR            # about 1 minute
    python bench/corruptions_vs_original.py --original DIR --smoke    # 3 images, a few seconds
    python bench/corruptions_vs_original.py --original DIR --frost-stats

DIR is `ImageNet-C/create_c/` of hendrycks/robustness (make_cifar_c.py and the frost photographs), e.g.
`git --git-dir=<the fetched repo> archive HEAD ImageNet-C/create_c | tar -x -C /tmp/robustness`.
It needs the original's own dependencies, which the library does not: scikit-image, OpenCV, Wand and ImageMagick's
MagickWand library (Debian: `apt-get install libmagickwand-6.q16-6`; `python -m venv --system-site-packages V &&
V/bin/pip install scikit-image opencv-python-headless Wand`, then run this script with V/bin/python and PYTHONPATH=.).

The original's functions are read from make_cifar_c.py up to its "End Distortions" line and run with the edits
current numpy/scipy/skimage need (COMPAT below), on uint8 PIL images as its main loop gives them. Its numpy draws
are recorded and handed to the library's functions that take their draws (`_glass_blur`, `_motion_blur`, `_snow`,
`_fog` through `_diamond_square`, `_elastic`), so a difference is the algorithm's, not the randomness'. The noise
corruptions (and frost, whose photographs the library replaces by a generated texture) are compared in distribution.
Differences are in 0–255 units on the returned images, before the data set's final np.uint8.

--frost-stats measures the frost photographs as make_cifar_c.frost uses them (cv2.resize by 0.2, every 32×32 crop):
the numbers of `art_evals.FROST_PHOTOS`, with the smooth share and blur σ that give the generated field the photos'
correlations at 1 and 2 pixels, and the same statistics of the library's generated textures.
Writes bench/results/corruptions_vs_original.{md,json} (or frost_texture.{md,json}).
"""
from __future__ import annotations
import argparse, contextlib, math, os, sys
from pathlib import Path
import numpy as np
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import env_info, write

COMPAT = [  # (old, new): what make_cifar_c.py needs to run on current numpy (2), scipy (≥1.14) and scikit-image (≥0.19)
    ('multichannel=True', 'channel_axis=-1'),
    ('np.float_', 'np.float64'),
    ('from scipy.ndimage.interpolation import map_coordinates', 'from scipy.ndimage import map_coordinates'),
    ('np.fromstring(', 'np.frombuffer(')]

def load_original(d:Path) -> dict:
    "The distortion functions of make_cifar_c.py in `d` (the file up to its 'End Distortions' line, with COMPAT)."
    src = (d/'make_cifar_c.py').read_text().split('# /////////////// End Distortions ///////////////')[0]
    for old, new in COMPAT: src = src.replace(old, new)
    ns = {'__name__': 'make_cifar_c'}
    exec(compile(src, str(d/'make_cifar_c.py'), 'exec'), ns)
    return ns

@contextlib.contextmanager
def recording():
    "Record every np.random.uniform/normal/randint/poisson draw, in order, as (name, kwargs-free args, result)."
    log, saved = [], {}
    for name in ('uniform', 'normal', 'randint', 'poisson'):
        fn = saved[name] = getattr(np.random, name)
        def rec(*a, _fn=fn, _name=name, **k):
            out = _fn(*a, **k); log.append((_name, a, k, out)); return out
        setattr(np.random, name, rec)
    try: yield log
    finally:
        for name, fn in saved.items(): setattr(np.random, name, fn)

def tiles(n:int) -> torch.Tensor:
    "The notebook's colour test images: 32×32 textured tiles of scikit-learn's two sample photographs shrunk by 4, on the 8-bit grid."
    from sklearn.datasets import load_sample_images
    ims = torch.nn.functional.avg_pool2d(torch.tensor(np.stack(load_sample_images().images)).permute(0, 3, 1, 2).float() / 255, 4)
    t = ims.unfold(2, 32, 32).unfold(3, 32, 32).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 32, 32)
    t = t[t.std((1, 2, 3)) > 0.12][::2]  # every other: both photographs
    return (t * 255).round()[:n] / 255

def to_pil(x:torch.Tensor):
    from PIL import Image
    return Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy())

def as_tensor(out) -> torch.Tensor:
    "The original's output (array or PIL image, H×W×3, 0–255) as a (1, 3, H, W) float tensor in 0–255."
    return torch.tensor(np.asarray(out, dtype=np.float64)).permute(2, 0, 1)[None]

def replay(name:str, x:torch.Tensor, c, log:list, ae) -> torch.Tensor:
    "The library's corruption `name` of `x` (1, 3, H, W) given the original's recorded draws `log`; None if it draws none."
    d = lambda t: torch.tensor(np.asarray(t, dtype=np.float64))
    H, W = x.shape[-2:]
    if name == 'glass_blur':
        draws = [r for n, *_ , r in log if n == 'randint']  # (dx, dy) per loop step: h = H−1 … 2, w = W−1 … 2, per pass
        off = torch.zeros(c[2], 1, 2, H, W, dtype=torch.long)
        per = (H - 2) * (W - 2)
        for k, (dx, dy) in enumerate(draws):
            it, j = divmod(k, per)
            h, w = H - 1 - j // (W - 2), W - 1 - j % (W - 2)
            off[it, 0, 0, h, w], off[it, 0, 1, h, w] = int(dx), int(dy)
        return ae._glass_blur(x, c, off)
    if name == 'motion_blur':
        return ae._motion_blur(x, c[0], c[1], d([log[0][3]]))
    if name == 'snow':
        flakes = next(r for n, a, k, r in log if n == 'normal')
        angle = next(r for n, a, k, r in log if n == 'uniform')
        return ae._snow(x, c, d(flakes)[None, None].float(), d([angle]))
    if name == 'fog':
        noise = [d(r)[None] / a[1] for n, a, k, r in log if n == 'uniform']  # U(−w, w) / w: U(−1, 1)
        return ae._fog(x, c, ae._diamond_square(noise, c[1]))
    if name == 'elastic_transform':
        u = [d(r) for n, a, k, r in log if n == 'uniform']
        return ae._elastic(x, c, u[0][None].float(), u[1][None, None].float(), u[2][None, None].float())
    if log: raise RuntimeError(f"{name} drew {[n for n, *_ in log]}: no replay written for it")
    return None

DETERMINISTIC = ('defocus_blur', 'zoom_blur', 'brightness', 'contrast', 'pixelate', 'jpeg_compression')
DETERMINISTIC_OR_REPLAYED = ('defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur', 'snow', 'fog', 'brightness', 'contrast',
                             'elastic_transform', 'pixelate', 'jpeg_compression')
IN_DISTRIBUTION = ('gaussian_noise', 'shot_noise', 'impulse_noise', 'frost', 'speckle_noise')

def compare(orig:dict, imgs:torch.Tensor, draws:int, only=None) -> dict:
    "Per corruption and severity: max / mean |ours − original| (0–255) where draws are shared; change statistics of both."
    from robust_attr import art_evals as ae
    table = {**ae.CORRUPTIONS, **ae.EXTRA_CORRUPTIONS}
    out = {}
    for name in only or list(ae.CORRUPTIONS) + list(ae.EXTRA_CORRUPTIONS):
        fn, params = table[name]
        for s in range(1, 6):
            c = params[s - 1]
            theirs, ours = [], []
            for rep in range(1 if name in DETERMINISTIC else draws):
                np.random.seed(1000 * s + rep)
                for i, x in enumerate(imgs):
                    with recording() as log: o = as_tensor(orig[name](to_pil(x), s))
                    theirs.append(o.clamp(0, 255))
                    if name in DETERMINISTIC_OR_REPLAYED:
                        r = replay(name, x[None], c, log, ae)
                        ours.append(((ae.clamp_box(r) if r is not None else ae.corrupt(x[None], name, s)) * 255).double())
                    else:
                        ours.append(ae.corrupt(x[None], name, s, torch.Generator().manual_seed(7919 * rep + i)).double() * 255)
            T, O = torch.cat(theirs), torch.cat(ours)
            X = (imgs.double() * 255).repeat(len(T) // len(imgs), 1, 1, 1)
            row = dict(change_original=float((T - X).abs().mean()), change_ours=float((O - X).abs().mean()),
                       mean_original=float((T - X).mean()), mean_ours=float((O - X).mean()),
                       sd_original=float((T - X).std()), sd_ours=float((O - X).std()))
            if name in DETERMINISTIC_OR_REPLAYED:
                diff = (O - T).abs()
                row.update(max_diff=float(diff.max()), mean_diff=float(diff.mean()), over_1=float((diff > 1).double().mean()))
            out[f'{name}/{s}'] = row
            print(name, s, {k: round(v, 3) for k, v in row.items()}, flush=True)
    return out

def frost_photo_stats(d:Path, crop:int=32) -> list:
    "Per frost photograph of make_cifar_c.frost (frost1 … frost5, cv2.resize by 0.2, RGB), over every 32×32 crop."
    import cv2
    out = []
    for f in ('frost1.png', 'frost2.png', 'frost3.png', 'frost4.jpg', 'frost5.jpg'):
        fr = cv2.resize(cv2.imread(str(d/f)), (0, 0), fx=0.2, fy=0.2)[..., ::-1].astype(np.float64)
        c = torch.tensor(fr.copy()).permute(2, 0, 1)[None]  # (1, 3, h, w)
        c = c.unfold(2, crop, 1).unfold(3, crop, 1)[:, :, :-1, :-1]  # randint(0, h − 32): the last position is never drawn
        c = c.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, crop, crop)
        out.append(dict(photo=f, **texture_stats(c)))
    return out

def texture_stats(t:torch.Tensor) -> dict:
    "Mean colour, within-image sd, sd of image means (0–255), and lag-1/2 correlations of the channel mean, of `(N, 3, h, w)` textures."
    m = t.mean((2, 3))
    l = t.mean(1); l = l - l.mean((1, 2), keepdim=True)
    v = (l**2).mean()
    lag = lambda k: float(((l[:, :, k:] * l[:, :, :-k]).mean() + (l[:, k:] * l[:, :-k]).mean()) / (2 * v))
    return dict(mean=m.mean(0).tolist(), sd=t.std((2, 3)).mean(0).tolist(), between=m.std(0).tolist(), lag1=lag(1), lag2=lag(2))

def fit_field(lag1:float, lag2:float) -> tuple:
    "(smooth share s, blur σ) with s·ρ_σ(1) = lag1 and ρ_σ(2)/ρ_σ(1) = lag2/lag1, ρ_σ the autocorrelation of blurred white noise."
    def rho(sigma, k):
        r = int(4 * sigma + 0.5); t = torch.arange(-r, r + 1, dtype=torch.float64)
        g = torch.exp(-0.5 * t**2 / sigma**2)
        return float((g[k:] * g[:-k]).sum() / (g * g).sum()) if k < len(g) else 0.
    lo, hi = 0.3, 20.
    for _ in range(60):  # ρ(2)/ρ(1) grows with σ
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rho(mid, 2) / rho(mid, 1) < lag2 / lag1 else (lo, mid)
    sigma = (lo + hi) / 2
    return min(1., lag1 / rho(sigma, 1)), sigma

def frost_report(d:Path) -> tuple:
    from robust_attr import art_evals as ae
    photos = frost_photo_stats(d)
    gen = ae.frost_texture(4000, (32, 32), generator=torch.Generator().manual_seed(0)) * 255
    which = torch.randint(len(ae.FROST_PHOTOS), (4000,), generator=torch.Generator().manual_seed(0))
    r = dict(photos=[], env=env_info())
    lines = ['# The frost photographs of make_cifar_c.frost against `art_evals.frost_texture`', '',
             f"`{r['env']['command']}`", '',
             'Per photograph: over every 32×32 crop of it after cv2.resize(fx=0.2) (what make_cifar_c.frost crops), '
             'the mean colour, the mean within-crop standard deviation, the standard deviation of crop means (0–255), and the '
             'correlation of neighbouring pixels (lags 1 and 2, mean of horizontal and vertical, on the channel mean); s and σ '
             'fitted so that the generated field has the photograph\'s lag-1 and lag-2 correlations; then the same statistics '
             'of 4000 generated textures (those that picked the photograph).', '',
             '| photo | source | mean RGB | sd RGB | sd of means RGB | lag 1 | lag 2 | s | σ |', '|---|---|---|---|---|---|---|---|---|']
    f3 = lambda v: ', '.join(f'{a:.1f}' for a in v)
    for k, p in enumerate(photos):
        s, sigma = fit_field(p['lag1'], p['lag2'])
        g = texture_stats(gen[which == k].double())
        r['photos'].append(dict(photo=p, fit=dict(smooth=s, sigma=sigma), generated=g))
        lines.append(f"| {p['photo']} | photo | {f3(p['mean'])} | {f3(p['sd'])} | {f3(p['between'])} | {p['lag1']:.3f} | {p['lag2']:.3f} | {s:.2f} | {sigma:.2f} |")
        lines.append(f"| | generated | {f3(g['mean'])} | {f3(g['sd'])} | {f3(g['between'])} | {g['lag1']:.3f} | {g['lag2']:.3f} | | |")
    lines += ['', 'As `FROST_PHOTOS` rows:', '', '```']
    for e in r['photos']:
        p, f = e['photo'], e['fit']
        lines.append(f"    dict(photo='{p['photo']}', mean=({f3(p['mean'])}), sd=({f3(p['sd'])}), between=({f3(p['between'])}), "
                     f"smooth={f['smooth']:.2f}, sigma={f['sigma']:.2f}),")
    lines += ['```', '']
    return r, '\n'.join(lines)

def markdown(r:dict) -> str:
    e = r['env']
    lines = ['# CIFAR-10-C corruptions: `art_evals` against make_cifar_c.py', '',
             f"`{e['command']}` · {r['n_images']} colour tiles (32×32, scikit-learn's sample photographs) · "
             f"numpy {e.get('numpy')}, scipy {e.get('scipy')}, scikit-image {r['skimage']}, OpenCV {r['cv2']}, {r['imagemagick']}, "
             f"torch {e['torch']} · {e['date']}", '',
             'Differences in 0–255 units. **Same draws**: the original\'s numpy draws handed to the library\'s function '
             '(or none drawn): max and mean |ours − original| and the share of values more than 1 level apart. **In '
             'distribution**: the mean absolute change |corrupted − clean| of each (and the mean and sd of the change), '
             f"{r['draws']} draws per image.", '',
             '| corruption | severity | compared | max diff | mean diff | > 1 level | change (original) | change (ours) |',
             '|---|---|---|---|---|---|---|---|']
    for k, v in r['rows'].items():
        name, s = k.split('/')
        same = 'max_diff' in v
        lines.append(f"| {name} | {s} | {'same draws' if same else 'in distribution'} | "
                     + (f"{v['max_diff']:.2f} | {v['mean_diff']:.3f} | {v['over_1']:.2%} | " if same else '– | – | – | ')
                     + f"{v['change_original']:.2f} | {v['change_ours']:.2f} |")
    lines += ['', '## In distribution: mean and sd of the change', '', '| corruption | severity | mean (original) | mean (ours) | sd (original) | sd (ours) |',
              '|---|---|---|---|---|---|']
    for k, v in r['rows'].items():
        if 'max_diff' in v: continue
        name, s = k.split('/')
        lines.append(f"| {name} | {s} | {v['mean_original']:.2f} | {v['mean_ours']:.2f} | {v['sd_original']:.2f} | {v['sd_ours']:.2f} |")
    lines += ['', '## Notes', '',
              '* Motion blur: ours − original lies in [−0.002, 1) levels: ImageMagick returns 8 bits by truncating (its 16-bit '
              'quantum, rounded, divided by 257 and floored), the last step of that corruption; the saved data set truncates every '
              "other corruption's float output the same way (np.uint8), and the library returns floats for all. Snow reads the "
              'motion-blurred flakes back from that 8-bit PNG, which the library reproduces, hence its exact agreement.',
              "* Pixelate: PIL's 8-bit resampling rounds each BOX average (halves up); the library returns the averages.",
              '* Glass blur: the blurred image is truncated to 8 bits before the shuffle; where float rounding puts a value on the '
              'other side of an integer, one value differs by a level.',
              '* The original runs here with the edits in COMPAT (current numpy, scipy and scikit-image); scikit-image 0.26 draws '
              "impulse noise from its own generator, not numpy's, so impulse noise is compared in distribution."]
    return '\n'.join(lines + [''])

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--original', required=True, type=Path, help="hendrycks/robustness's ImageNet-C/create_c directory")
    ap.add_argument('--smoke', action='store_true', help='3 images, 2 draws (the pipeline; results written as *_smoke)')
    ap.add_argument('--frost-stats', action='store_true', help='measure the frost photographs instead')
    ap.add_argument('--n', type=int, default=12, help='colour tiles')
    ap.add_argument('--draws', type=int, default=5, help='draws per image for the in-distribution comparison')
    ap.add_argument('--only', nargs='*', help='these corruptions only (results written as *_only)')
    a = ap.parse_args(argv)
    d = a.original.resolve()
    if a.frost_stats:
        r, md = frost_report(d)
        print(md)
        return write('frost_texture' + ('_smoke' if a.smoke else ''), r, md)
    try:
        import skimage, cv2, wand.version
    except ImportError as e:
        sys.exit(f"{e}: this script runs the original generator, which needs scikit-image, opencv-python-headless, Wand and "
                 "ImageMagick's MagickWand library (see the docstring)")
    n, draws = (3, 2) if a.smoke else (a.n, a.draws)
    cwd = os.getcwd(); os.chdir(d)  # make_cifar_c.frost reads ./frost*.png
    try:
        orig = load_original(d)
        rows = compare(orig, tiles(n), draws, a.only)
    finally: os.chdir(cwd)
    r = dict(env=env_info(), n_images=n, draws=draws, skimage=skimage.__version__, cv2=cv2.__version__,
             imagemagick=wand.version.MAGICK_VERSION.split(' http')[0], rows=rows)
    return write('corruptions_vs_original' + ('_smoke' if a.smoke else '') + ('_only' if a.only else ''), r, markdown(r))

if __name__ == '__main__': main()
