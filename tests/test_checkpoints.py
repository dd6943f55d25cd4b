"""Checkpoints that cannot hurt (issue 16, item 2): every bad file `load_model` meets is refused with one
`ValueError` line naming the file, a changed byte never loads as changed weights, and a checkpoint's own
`arch_kwargs` cannot make the loader allocate more than the tensors it holds."""
import random, time, zipfile
from pathlib import Path
import pytest, torch
from robust_attr.models import SmallCNN, MadryResNet, LinearModel, save_model, load_model

V1 = 'robust_attr.model/1'

def one_line_error(path, *contains):
    "Load `path`, expect a one-line `ValueError` naming it and holding each of `contains`; return the message."
    with pytest.raises(ValueError) as e: load_model(path)
    msg = str(e.value)
    assert str(path) in msg and '\n' not in msg, msg
    for c in contains: assert c in msg, msg
    return msg

@pytest.fixture
def ckpt(tmp_path):
    "A small saved SmallCNN (about 3 MB, like the committed bench models but smaller)."
    torch.manual_seed(0)
    return save_model(SmallCNN(img_size=12, mean=[0.5], std=[0.25]), tmp_path/'m.pth', method='aat', epochs=2)

def test_an_empty_file_is_a_one_line_error_not_a_bare_eoferror(tmp_path):
    p = tmp_path/'empty.pth'; p.write_bytes(b'')
    one_line_error(p, 'is empty')

def test_the_first_half_of_a_checkpoint_is_called_truncated(ckpt, tmp_path):
    b = ckpt.read_bytes()
    p = tmp_path/'half.pth'; p.write_bytes(b[:len(b)//2])
    one_line_error(p, 'truncated')

def test_random_bytes_are_not_a_checkpoint_rather_than_a_refused_pickle(tmp_path):
    p = tmp_path/'rand.pth'; p.write_bytes(random.Random(0).randbytes(1024))
    msg = one_line_error(p, 'not a robust_attr checkpoint')
    assert 'other than tensors' not in msg

def test_a_bare_state_dict_saved_with_torch_is_a_foreign_file(tmp_path):
    p = tmp_path/'sd.pth'; torch.save(SmallCNN(img_size=12).state_dict(), p)
    one_line_error(p, 'not a robust_attr checkpoint', 'state_dict')

def test_flipped_bytes_never_load_as_changed_weights(ckpt, tmp_path):
    "64 bytes flipped anywhere: either a `ValueError` naming the file, or the very same weights (padding hit)."
    good, b = load_model(ckpt).state_dict(), ckpt.read_bytes()
    for seed in range(8):
        rng, bb = random.Random(seed), bytearray(b)
        for i in rng.sample(range(len(bb)), 64): bb[i] ^= 0xff
        p = tmp_path/f'flip{seed}.pth'; p.write_bytes(bytes(bb))
        try: sd = load_model(p).state_dict()
        except ValueError as e: assert str(p) in str(e); continue
        assert all(torch.equal(sd[k], good[k]) for k in good), f"seed {seed}: changed weights loaded silently"

def find_tensor(b, t):
    "Where the raw bytes of tensor `t` start in the file contents `b`."
    i = bytes(b).find(t.numpy().tobytes())
    assert i > 0
    return i

def test_a_flipped_byte_inside_one_tensor_is_refused(ckpt, tmp_path):
    b = bytearray(ckpt.read_bytes())
    w = load_model(ckpt)[1].weight.detach()
    b[find_tensor(b, w) + 100] ^= 0x01
    p = tmp_path/'flip.pth'; p.write_bytes(bytes(b))
    one_line_error(p, 'corrupted')

def resave(src, dst, edit):
    "Read the checkpoint `src` as a dict, `edit` it in place, write it to `dst` with plain `torch.save`."
    d = torch.load(src, weights_only=True); edit(d); torch.save(d, dst); return dst

def test_weights_edited_and_resaved_with_torch_fail_the_hash(ckpt, tmp_path):
    "A re-save writes fresh zip checksums; only the hash stored by `save_model` sees the change."
    def edit(d): d['state_dict']['1.weight'][0,0,0,0] += 1e-3
    one_line_error(resave(ckpt, tmp_path/'w.pth', edit), 'do not match the hash stored at save time',
                   'corrupted or was modified')

def test_lying_arch_kwargs_or_meta_fail_the_hash(ckpt, tmp_path):
    def mean(d): d['arch_kwargs']['mean'] = [0.1]    # same shapes: only the hash can tell
    def meta(d): d['meta']['epochs'] = 200
    one_line_error(resave(ckpt, tmp_path/'a.pth', mean), 'arch_kwargs', 'hash stored at save time')
    one_line_error(resave(ckpt, tmp_path/'b.pth', meta), 'meta', 'hash stored at save time')

def v1_file(model, path, **kw):
    "A checkpoint as format 1 wrote it (no hash); crafted by hand, as an attacker would."
    d = dict(format=V1, arch=None, arch_kwargs=dict(model.arch_kwargs),
             state_dict=model.state_dict(), meta={})
    d.update(kw); torch.save(d, path); return path

def test_a_huge_img_size_fails_fast_naming_it_without_allocating(tmp_path):
    "A small SmallCNN's tensors declared as `img_size=4096` (a 275 GB first linear layer)."
    m = SmallCNN(img_size=8)
    p = v1_file(m, tmp_path/'big.pth', arch='small_cnn', arch_kwargs=dict(m.arch_kwargs, img_size=4096))
    t = time.perf_counter()
    one_line_error(p, 'arch_kwargs', 'img_size')
    assert time.perf_counter() - t < 2

def test_a_huge_unit_count_fails_fast_without_building_it(tmp_path):
    "`units=10**7` would build 6·10⁷ modules before allocating a single weight."
    m = MadryResNet(in_channels=1, filters=(2,2,2,2), units=1)
    p = v1_file(m, tmp_path/'deep.pth', arch='madry_resnet', arch_kwargs=dict(m.arch_kwargs, units=10**7))
    t = time.perf_counter()
    one_line_error(p, 'arch_kwargs')
    assert time.perf_counter() - t < 2

def test_compressed_zip_entries_are_refused(ckpt, tmp_path):
    "`torch.save` stores entries uncompressed; a deflated entry could be a zip bomb."
    p = tmp_path/'deflated.pth'
    with zipfile.ZipFile(ckpt) as src, zipfile.ZipFile(p, 'w', zipfile.ZIP_DEFLATED) as dst:
        for i in src.infolist(): dst.writestr(i.filename, src.read(i))
    one_line_error(p, 'compressed')

def test_format_1_checkpoints_load_without_a_hash(tmp_path):
    m = LinearModel(4, 3)
    m2 = load_model(v1_file(m, tmp_path/'v1.pth', arch='linear', meta=dict(method='natural')))
    assert torch.equal(m2[1].weight, m[1].weight) and m2.meta == dict(method='natural')

def test_a_flipped_byte_in_a_format_1_checkpoint_is_still_caught_by_the_zip_checksums(tmp_path):
    p = v1_file(LinearModel(64, 10), tmp_path/'v1.pth', arch='linear')
    b = bytearray(p.read_bytes()); b[find_tensor(b, load_model(p)[1].weight.detach()) + 100] ^= 0x01
    p.write_bytes(bytes(b))
    one_line_error(p, 'corrupted')

def test_the_committed_bench_models_still_load():
    paths = sorted(Path(__file__).parents[1].glob('bench/models/*/*.pth'))
    if not paths: pytest.skip('no committed bench models in this checkout')
    for p in paths: assert not load_model(p).training
