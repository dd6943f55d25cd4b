"""CIFAR-10-C's corruptions (`art_evals`) against the libraries the original generator calls, where they are this
library's dependencies too: scipy (skimage's Gaussian, `clipped_zoom`'s zoom, elastic's `map_coordinates`), PIL (BOX
resampling, JPEG) and matplotlib's HSV (the same convention as skimage's). OpenCV, scikit-image and ImageMagick are
compared by `bench/corruptions_vs_original.py`, which runs the original file itself.
"""
import numpy as np, pytest, torch
import scipy.ndimage as ndi
from PIL import Image
from robust_attr import art_evals as ae

def images(n=4, c=3, size=32, seed=0):
    "Smooth random colour images on the 8-bit grid: blurred noise, so that blurs and warps have something to move."
    g = torch.Generator().manual_seed(seed)
    x = ae._gaussian(torch.rand(n, c, size, size, generator=g), 1.5)
    x = (x - x.amin((2, 3), keepdim=True)) / (x.amax((2, 3), keepdim=True) - x.amin((2, 3), keepdim=True))
    return (x * 255).round() / 255

def test_images_are_not_trivial():
    x = images()
    assert (x.std((2, 3)) > 0.1).all() and (x[:, 0] - x[:, 1]).abs().mean() > 0.05

@pytest.mark.parametrize('mode', ['nearest', 'reflect', 'mirror'])
@pytest.mark.parametrize('sigma,truncate', [(0.25, 4.), (0.4, 4.), (1.92, 3.), (6.4, 3.), (12., 3.)])
def test_gaussian_is_scipys(mode, sigma, truncate):
    x = images(2).double()
    ref = ndi.gaussian_filter(x.numpy(), (0, 0, sigma, sigma), mode=mode, truncate=truncate)
    assert np.abs(ae._gaussian(x, sigma, mode, truncate).numpy() - ref).max() < 1e-12  # radius 36 > 32: the border wraps as scipy's

@pytest.mark.parametrize('zoom', sorted({float(z) for c in ae.CORRUPTIONS['zoom_blur'][1] for z in np.arange(*c)} | {1.75, 2.25, 1.25}))
def test_clipped_zoom_is_scipys_zoom(zoom):
    x = images(2)
    a = x.permute(0, 2, 3, 1).double().numpy()
    ch = int(np.ceil(32 / zoom)); top = (32 - ch) // 2  # make_cifar_c.clipped_zoom
    z = ndi.zoom(a[:, top:top + ch, top:top + ch], (1, zoom, zoom, 1), order=1)
    t = (z.shape[1] - 32) // 2
    ref = torch.tensor(z[:, t:t + 32, t:t + 32]).permute(0, 3, 1, 2)
    assert (ae._clipped_zoom(x.double(), zoom) - ref).abs().max() < 1e-9

def test_zoom_blur_averages_the_image_with_every_zoom():
    x = images(2)
    c = ae.CORRUPTIONS['zoom_blur'][1][0]
    ref = (x + sum(ae._clipped_zoom(x, z) for z in np.arange(*c))) / 8  # 1.00 … 1.06: seven zooms and the image
    assert (ae.zoom_blur(x, c) - ref).abs().max() < 1e-6 and (ae.zoom_blur(x, c) - x).abs().mean() > 1e-3

@pytest.mark.parametrize('severity', [2, 3, 4, 5])
def test_elastic_field_is_map_coordinates(severity):
    x = images(2).double()
    c = ae.CORRUPTIONS['elastic_transform'][1][severity - 1]
    g = torch.Generator().manual_seed(severity)
    ux, uy = torch.rand(2, 2, 1, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    ours = ae._elastic(x, c, torch.zeros(2, 3, 2), ux, uy)  # no affine jitter: the field alone
    for i in range(2):
        dx = ndi.gaussian_filter(ux[i, 0].numpy(), c[1], mode='reflect', truncate=3) * c[0]
        dy = ndi.gaussian_filter(uy[i, 0].numpy(), c[1], mode='reflect', truncate=3) * c[0]
        yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing='ij')
        for ch in range(3):
            ref = ndi.map_coordinates(x[i, ch].numpy(), (yy + dy, xx + dx), order=1, mode='reflect')
            assert np.abs(ours[i, ch].numpy() - ref).max() < 1e-5
    assert (ours - x).abs().mean() > 1e-3  # the field moved the image

@pytest.mark.parametrize('c', ae.CORRUPTIONS['pixelate'][1])
def test_pixelate_is_pils_box(c):
    x = images(2)
    for i in range(2):
        for ch in range(3):  # PIL's float mode: its BOX weights without 8-bit rounding
            im = Image.fromarray(x[i, ch].numpy().astype(np.float32), mode='F')
            ref = np.asarray(im.resize((int(32 * c),) * 2, Image.BOX).resize((32, 32), Image.BOX))
            assert np.abs(ae.pixelate(x[i:i + 1], c)[0, ch].numpy() - ref).max() < 1e-5
    u8 = np.asarray(Image.fromarray((x[0].permute(1, 2, 0) * 255).byte().numpy()).resize((int(32 * c),) * 2, Image.BOX).resize((32, 32), Image.BOX))
    assert np.abs(ae.pixelate(x[:1], c)[0].permute(1, 2, 0).numpy() * 255 - u8).max() <= 1  # RGB: PIL rounds to 8 bits
    assert (ae.pixelate(x, c) - x).abs().mean() > 1e-3

@pytest.mark.parametrize('quality', ae.CORRUPTIONS['jpeg_compression'][1])
def test_jpeg_is_pils(quality):
    import io
    x = images(2)
    for i in range(2):
        buf = io.BytesIO()
        Image.fromarray((x[i].permute(1, 2, 0) * 255).round().byte().numpy()).save(buf, 'JPEG', quality=quality)
        ref = torch.tensor(np.asarray(Image.open(buf), dtype=np.float64)).permute(2, 0, 1) / 255
        ours = ae.jpeg_compression(x[i:i + 1], quality)[0].double()
        assert (ours - ref).abs().mean() < 0.5 / 255  # the same codec settings (libjpeg builds may differ by a level here and there)
        assert (ours - x[i]).abs().mean() > 1 / 255

def test_brightness_is_an_hsv_round_trip():
    from matplotlib.colors import rgb_to_hsv, hsv_to_rgb  # V = max, S = (max − min)/max: skimage's convention
    x = images(3).permute(0, 2, 3, 1).double().numpy()
    x[0, :4, :4] = 0  # black pixels: S = 0, they become grey c
    for c in ae.CORRUPTIONS['brightness'][1]:
        hsv = rgb_to_hsv(x); hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        ref = torch.tensor(hsv_to_rgb(hsv)).permute(0, 3, 1, 2)
        assert (ae.brightness(torch.tensor(x).permute(0, 3, 1, 2), c) - ref).abs().max() < 1e-9

def test_defocus_is_filter2d_with_the_antialiased_disk():
    x = images(2).double()
    for radius, alias in ae.CORRUPTIONS['defocus_blur'][1]:
        L = np.arange(-8, 9); X, Y = np.meshgrid(L, L)
        disk = (X**2 + Y**2 <= radius**2).astype(np.float64); disk /= disk.sum()
        g = np.exp(-np.arange(-1, 2.)**2 / (2 * alias**2)); g /= g.sum()
        k = ndi.correlate(disk, np.outer(g, g), mode='mirror')  # cv2.GaussianBlur((3, 3), alias): reflect-101 border
        assert np.abs(ae._disk(radius, alias).numpy() - k).max() < 1e-12
        ref = ndi.correlate(x.numpy(), k[None, None], mode='mirror')  # cv2.filter2D: correlation, reflect-101
        assert np.abs(ae.defocus_blur(x, (radius, alias)).numpy() - ref).max() < 1e-12

def test_glass_blur_copies_from_up_and_left_only():
    x = images(2)
    c = ae.CORRUPTIONS['glass_blur'][1][0]  # σ = 0.05: scipy's radius 0, no blur; what moves is the shuffle alone
    g = torch.Generator().manual_seed(0)
    out = ae.glass_blur(x, c, g)
    assert (out[..., :2, :] == x[..., :2, :]).all() and (out[..., :, :2] == x[..., :, :2]).all()  # rows, columns 0 and 1 kept
    cands = torch.stack([x[..., 1:-1, 1:-1], x[..., 1:-1, 2:], x[..., 2:, 1:-1], x[..., 2:, 2:]])  # (h−1, w−1), (h−1, w), (h, w−1), (h, w)
    assert ((cands - out[..., 2:, 2:]).abs().amin(0) < 1e-6).all()
    assert (out != x).float().mean() > 0.3  # three of four pixels read a neighbour

def test_corruptions_are_batched_per_image():
    x = images(4)
    for name in ae.CORRUPTIONS:  # the same seed gives each image its own draws, independent of the batch it is in
        batch = ae.corrupt(x, name, 5, torch.Generator().manual_seed(0))
        assert batch.shape == x.shape
        if name in ('brightness', 'contrast', 'defocus_blur', 'zoom_blur', 'pixelate', 'jpeg_compression'):
            one = torch.cat([ae.corrupt(x[i:i + 1], name, 5) for i in range(4)])
            assert (one - batch).abs().max() < 1e-6, name  # deterministic ones: per image, whatever the batch

def _devices():
    yield 'cpu'
    yield pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU'))

@pytest.mark.parametrize('device', list(_devices()))
def test_corruptions_on_the_device(device):
    x = images(2).to(device)
    for name in list(ae.CORRUPTIONS) + list(ae.EXTRA_CORRUPTIONS):
        out = ae.corrupt(x, name, 3, torch.Generator(device).manual_seed(0))
        assert out.device == x.device and out.dtype == x.dtype and (out - x).abs().mean() > 1e-3, name
        if device != 'cpu':
            ref = ae.corrupt(x.cpu(), name, 3, torch.Generator().manual_seed(0))
            if name in ('brightness', 'contrast', 'defocus_blur', 'zoom_blur', 'pixelate', 'jpeg_compression'):
                assert (out.cpu() - ref).abs().max() < 1e-4, name
