"Tests of `robust_attr.data` that need real data, fake files in torchvision's formats, monkeypatching or hypothesis."
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st, example
from PIL import Image

import robust_attr.data as data
from robust_attr.data import (get_dls, get_arrays, get_dataset, fashion_mnist_path, stratified_split, pick,
                              make_synthetic, write_idx, IDX_FILES, RESTRICTED_IMAGENET_RANGES)


# ---------- Fashion-MNIST, the real thing (skipped when not installed) ----------

def test_get_dls_fashion_mnist_finds_installed_copy(fashion_mnist):
    dls = get_dls('fashion_mnist', bs=500)
    assert fashion_mnist_path() == fashion_mnist
    (xt, yt), (xv, yv) = dls.train.dataset.tensors, dls.valid.dataset.tensors
    assert (len(xt), len(xv)) == (60000, 10000)
    assert xt.shape[1:] == (1, 28, 28) and xt.dtype == torch.float32
    assert yt.dtype == torch.long and dls.c == 10
    assert 0 <= xt.min() and xt.max() <= 1 and xt.max() == 1  # scaled by 1/255, not left in 0..255
    assert torch.equal(torch.bincount(yt), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(yv), torch.full((10,), 1000))
    xb, yb = dls.one_batch()
    assert xb.shape == (500, 1, 28, 28) and yb.dtype == torch.long


def test_get_arrays_fashion_mnist_subset_is_seeded(fashion_mnist):
    x, y = get_arrays('fashion_mnist', 'test', n=100, seed=1)
    x2, y2 = get_arrays('fashion_mnist', 'test', n=100, seed=1, size=32)
    assert x.shape == (100, 1, 28, 28) and x2.shape == (100, 1, 32, 32)
    assert torch.equal(y, y2)
    assert not torch.equal(y, get_arrays('fashion_mnist', 'test', n=100, seed=2)[1])


# ---------- MNIST from fake IDX files, and the download path ----------

def fake_idx(d, n=(20, 10), size=28, seed=0):
    rng = np.random.default_rng(seed)
    d = Path(d); d.mkdir(parents=True, exist_ok=True)
    for (split, (fx, fy)), k in zip(IDX_FILES.items(), n):
        write_idx(rng.integers(0, 256, (k, size, size), dtype=np.uint8), d/fx)   # uncompressed this time
        write_idx(np.arange(k, dtype=np.uint8) % 10, d/fy)


def test_mnist_from_path_with_resize_and_subsets(tmp_path):
    fake_idx(tmp_path)
    dls = get_dls('mnist', path=tmp_path, bs=4, n_train=8, n_valid=6, size=14)
    xb, yb = dls.train.one_batch()
    assert xb.shape == (4, 1, 14, 14) and yb.dtype == torch.long
    assert (len(dls.train.dataset), len(dls.valid.dataset)) == (8, 6)
    with pytest.raises(ValueError, match=r'`n_train`=21 is larger than the 20 train images of mnist'):
        get_dls('mnist', path=tmp_path, n_train=21)


def test_missing_mnist_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv('ROBUST_ATTR_DATA', str(tmp_path))
    with pytest.raises(FileNotFoundError) as e: get_dls('mnist')
    msg = str(e.value)
    assert str(tmp_path/'mnist') in msg and str(tmp_path/'mnist'/'MNIST'/'raw') in msg
    assert 'download=True' in msg and 'train-images-idx3-ubyte' in msg


def test_download_goes_through_torchvision_into_data_root(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    calls = []
    class FakeMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((Path(root), train, download))
            fake_idx(Path(root)/'MNIST'/'raw')
    monkeypatch.setattr(tvd, 'MNIST', FakeMNIST)
    monkeypatch.setenv('ROBUST_ATTR_DATA', str(tmp_path))
    x, y = get_arrays('mnist', 'test', download=True)
    assert x.shape == (10, 1, 28, 28)
    assert calls == [(tmp_path/'mnist', True, True), (tmp_path/'mnist', False, True)]
    get_arrays('mnist', 'train')          # now found without downloading
    assert len(calls) == 2


# ---------- torchvision data sets on fake files (their checksums monkeypatched away) ----------

def test_cifar10_from_fake_batches(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tvc
    monkeypatch.setattr(tvc, 'check_integrity', lambda *a, **k: True)
    d = tmp_path/'cifar-10-batches-py'; d.mkdir()
    rng = np.random.default_rng(0)
    names = ['data_batch_1', 'data_batch_2', 'data_batch_3', 'data_batch_4', 'data_batch_5', 'test_batch']
    for i, name in enumerate(names):
        batch = dict(data=rng.integers(0, 256, (3, 3072), dtype=np.uint8), labels=[i, (i+1) % 10, 9])
        (d/name).write_bytes(pickle.dumps(batch))
    (d/'batches.meta').write_bytes(pickle.dumps({'label_names': list(data.CIFAR10_CLASSES)}))
    x, y = get_arrays('cifar10', 'valid', path=tmp_path)
    assert x.shape == (3, 3, 32, 32) and torch.equal(y, torch.tensor([5, 6, 9]))
    raw = pickle.loads((d/'test_batch').read_bytes())['data'][0].reshape(3, 32, 32)
    assert torch.allclose(x[0], torch.from_numpy(raw).float()/255)
    dls = get_dls('cifar10', path=tmp_path, bs=4, size=16)
    assert len(dls.train.dataset) == 15
    xb, yb = dls.train.one_batch()
    assert xb.shape == (4, 3, 16, 16) and yb.dtype == torch.long and 0 <= xb.min() and xb.max() <= 1


def test_svhn_from_fake_mat_maps_label_10_to_0(tmp_path, monkeypatch):
    import scipy.io
    import torchvision.datasets.svhn as tvs
    monkeypatch.setattr(tvs, 'check_integrity', lambda *a, **k: True)
    rng = np.random.default_rng(0)
    for split, labels in [('train', [10, 1, 2, 3]), ('test', [10, 7])]:
        X = rng.integers(0, 256, (32, 32, 3, len(labels)), dtype=np.uint8)
        scipy.io.savemat(tmp_path/f'{split}_32x32.mat', dict(X=X, y=np.array(labels, dtype=np.uint8)[:, None]))
    x, y = get_arrays('svhn', 'test', path=tmp_path)
    assert x.shape == (2, 3, 32, 32) and torch.equal(y, torch.tensor([0, 7]))
    assert len(get_dataset('svhn', 'train', path=tmp_path)) == 4


def test_gtsrb_from_fake_tree_resizes_to_32(tmp_path):
    base = tmp_path/'gtsrb'
    for c in range(43):
        d = base/'GTSRB'/'Training'/f'{c:05d}'; d.mkdir(parents=True)
        Image.fromarray(np.full((40, 35, 3), c, dtype=np.uint8)).save(d/'00000_00000.ppm')
    test = base/'GTSRB'/'Final_Test'/'Images'; test.mkdir(parents=True)
    rows = ['Filename;Width;Height;ClassId']
    for i, c in enumerate([3, 42]):
        Image.fromarray(np.full((50, 61, 3), 100, dtype=np.uint8)).save(test/f'{i:05d}.ppm')
        rows.append(f'{i:05d}.ppm;61;50;{c}')
    (base/'GT-final_test.csv').write_text('\n'.join(rows))
    x, y = get_arrays('gtsrb', 'test', path=tmp_path)
    assert x.shape == (2, 3, 32, 32) and torch.equal(y, torch.tensor([3, 42]))
    assert torch.allclose(x, torch.full_like(x, 100/255), atol=1e-6)
    x, y = get_arrays('gtsrb', 'train', path=tmp_path)
    assert x.shape == (43, 3, 32, 32) and torch.equal(y, torch.arange(43))
    assert torch.allclose(x[:, 0, 0, 0], torch.arange(43)/255)


def test_torchvision_sets_missing_say_where(tmp_path):
    for name in ['cifar10', 'svhn', 'gtsrb']:
        with pytest.raises(FileNotFoundError, match=f'{name} not found. Looked in:\n  - {tmp_path}'):
            get_dls(name, path=tmp_path)


# ---------- image-folder data sets ----------

def png(p, value=0, size=(5, 7)):
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, dtype=np.uint8)).save(p)


def test_restricted_imagenet_maps_class_ranges_to_superclasses(tmp_path):
    wnids = [f'n{i:08d}' for i in range(1000)]
    for w in wnids: (tmp_path/'train'/w).mkdir(parents=True)
    chosen = [29, 30, 151, 268, 269, 397, 398, 319]
    for i in chosen:
        png(tmp_path/'train'/wnids[i]/'a.JPEG', i % 256)
        png(tmp_path/'val'/wnids[i]/'v.JPEG', i % 256)
    x, y = get_arrays('restricted_imagenet', 'train', path=tmp_path, size=8)
    names = list(RESTRICTED_IMAGENET_RANGES)
    assert y.tolist() == [names.index(n) for n in ['frog', 'dog', 'dog', 'insect', 'fish']]
    assert x.shape == (5, 3, 8, 8)
    expected = (torch.tensor([30, 151, 268, 319, 397]) % 256).float()/255   # which file each label came from
    assert torch.allclose(x[:, 0, 0, 0], expected, atol=2/255)                 # (JPEG: nearly exact)
    assert len(get_dataset('restricted_imagenet', 'valid', path=tmp_path)) == 5
    assert get_dataset('restricted_imagenet', 'valid', path=tmp_path)[0][0].shape == (3, 224, 224)


def test_cub200_uses_the_official_split(tmp_path):
    lines, split = [], []
    for c in range(200):
        cls = f'{c+1:03d}.Bird_{c}'
        for j in range(2):
            rel = f'{cls}/img_{j}.jpg'
            png(tmp_path/'images'/rel, c)
            lines.append(f'{len(lines)+1} {rel}'); split.append(f'{len(split)+1} {int(j == 0)}')
    (tmp_path/'images.txt').write_text('\n'.join(lines) + '\n')
    (tmp_path/'train_test_split.txt').write_text('\n'.join(split) + '\n')
    tr, te = (get_dataset('cub200', s, path=tmp_path, size=4) for s in ('train', 'test'))
    assert len(tr) == len(te) == 200
    assert all(f.name == 'img_0.jpg' for f in tr.files) and all(f.name == 'img_1.jpg' for f in te.files)
    assert torch.equal(tr.labels, torch.arange(200))


def test_folder_data_sets_train_through_fastai(tmp_path):
    for c in range(17):
        for j in range(10): png(tmp_path/f'class_{c:02d}'/f'{j}.png', 10*c)
    dls = get_dls('flowers17', path=tmp_path, bs=8, size=24, n_valid=10)
    xb, yb = dls.train.one_batch()
    assert xb.shape == (8, 3, 24, 24) and yb.dtype == torch.long
    assert (len(dls.train.dataset), len(dls.valid.dataset)) == (153, 10)
    vb = torch.cat([b[1] for b in dls.valid])
    assert torch.equal(vb, torch.cat([b[1] for b in dls.valid]))   # valid is not shuffled


# ---------- properties ----------

@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=200), st.floats(0, 1), st.integers(0, 2**31))
def test_stratified_split_partitions_and_holds_out_per_class(labels, pct, seed):
    y = torch.tensor(labels)
    tr, va = stratified_split(y, pct, seed)
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(len(y)))
    counts = torch.bincount(y, minlength=5)
    assert torch.equal(torch.bincount(y[va], minlength=5), (counts*pct).round().long())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**31))
def test_pick_is_a_prefix_stable_sample(total, n, seed):
    if n > total:
        with pytest.raises(ValueError, match='is larger than'): pick(total, n, seed)
        return
    idx = pick(total, n, seed)
    assert len(set(idx.tolist())) == n and idx.max() < total
    assert torch.equal(idx[:max(1, n//2)], pick(total, max(1, n//2), seed))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 24), st.integers(8, 48), st.sampled_from([1, 3]), st.integers(0, 2**31))
@example(8, 8, 1, 3)   # a cross thinner than a pixel once had an empty mask
def test_synthetic_masks_and_boxes_are_consistent(n, size, channels, seed):
    from torchvision.ops import masks_to_boxes
    x, y, m = make_synthetic(n, size, channels, seed)
    assert x.shape == (n, channels, size, size) and m.shape == (n, size, size)
    assert 0 <= x.min() and x.max() <= 1
    assert m.flatten(1).any(1).all()
    counts = torch.bincount(y, minlength=4)
    assert counts.max() - counts.min() <= 1
    b = masks_to_boxes(m).long()
    rows, cols = torch.arange(size).view(1, -1, 1), torch.arange(size).view(1, 1, -1)
    in_box = ((cols >= b[:, 0, None, None]) & (cols <= b[:, 2, None, None]) &
              (rows >= b[:, 1, None, None]) & (rows <= b[:, 3, None, None]))
    assert not (m & ~in_box).any()
    assert (x.mean(1)[m].mean() > x.mean(1)[~m].mean() + 0.3) if (~m).any() else True
