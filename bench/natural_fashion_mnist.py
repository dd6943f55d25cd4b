"""A natural SmallCNN on Fashion-MNIST under the quick protocol (issue 4): NA, AA, IN, CO vs the papers' natural rows.

    python bench/natural_fashion_mnist.py                  # n=200, AA on the first 1000 test images
    python bench/natural_fashion_mnist.py --quick          # smoke run: n=20, AA on 100 images, 5 IFIA steps
    python bench/natural_fashion_mnist.py --set beta=10    # any protocol setting

The model is `--model` (trained with `robust_attr train --data fashion_mnist --method natural --epochs 3
--bs 50` if the file is missing). Writes bench/results/natural_fashion_mnist.{md,json} (with --quick or
--name, another name), with the command, the protocol, bootstrap intervals and the papers' rows.
"""
from __future__ import annotations
import argparse, warnings
import torch
from robust_attr.cli import parse_settings
from robust_attr.data import get_arrays
from robust_attr.evaluate import evaluate, bootstrap_ci, get_protocol, protocol_attacks, first_correct
from robust_attr.attacks import IFIA
from robust_attr.metrics import kendall_tau, topk_intersection, topk_mask
from robust_attr.smooth import softplus_surrogate
from _env import env_info, load, write, set_threads, fashion_mnist_model, DEFAULT_MODEL, TRAIN_COMMAND, with_notes, model_parser

PAPERS = [('FAR Table 1, Nat (k=50, full protocol)', 91.5, 11.0, 0.43, 0.20),
          ('teacher-alignment Table 1, Nat (full protocol)', 90.86, 0.01, 0.390, 0.461)]

def tau_a(a, b):
    "Kendall's tau-a of each pair of rows (ties count as neither concordant nor discordant, divided by all pairs)."
    n0 = a.shape[1] * (a.shape[1] - 1) / 2
    def tied(t): return torch.tensor([(c * (c - 1) / 2).sum().item() for c in (torch.unique(row, return_counts=True)[1].double() for row in t)])
    return kendall_tau(a, b).double() * ((n0 - tied(a)) * (n0 - tied(b))).sqrt() / n0

def co_variants(model, x, y, p, n:int) -> dict:
    "Run the protocol's IFIA on the first `n` images and measure CO (mean Kendall) under several map and metric variants."
    _, ifia = protocol_attacks(p, seed=0, internal_batch_size=256)
    xa = ifia(model, x[:n], y[:n])
    signed = IFIA(p.eps, p.ifia_step_size, 1, k=p.attack_k, ig_steps=p.ig_steps, abs=False)
    clean, adv = ifia.measure_map(model, x[:n], y[:n]), ifia.measure_map(model, xa, y[:n])
    sc, sa = signed.measure_map(model, x[:n], y[:n]), signed.measure_map(model, xa, y[:n])
    with softplus_surrogate(model, p.beta):
        pc, pa = ifia.measure_map(model, x[:n], y[:n]), ifia.measure_map(model, xa, y[:n])
    flat_c, flat_a = clean.flatten(1), adv.flatten(1)
    top = topk_mask(clean, p.k)
    obj = x[:n].flatten(1) > 0
    def masked(m):  # Kendall restricted to the pixels of a per-sample mask (a loop over samples: a bench, not a hot path)
        return torch.stack([kendall_tau(flat_c[i][m[i]][None], flat_a[i][m[i]][None])[0] for i in range(n)])
    zero = (flat_c == 0).double().mean().item()
    v = {'protocol: tau-b of |IG| (channel sum) over all pixels': kendall_tau(clean, adv),
         'tau-a of the same maps (ties counted as neither)': tau_a(flat_c, flat_a),
         'tau-b of signed IG': kendall_tau(sc, sa),
         f'tau-b over the clean top-{p.k} pixels only': masked(top),
         'tau-b over the object pixels only (x > 0)': masked(obj),
         f'tau-b of |IG| measured on the softplus(β={p.beta}) surrogate': kendall_tau(pc, pa),
         f'top-{p.k} intersection (IN), for reference': topk_intersection(clean, adv, p.k)}
    return dict(n=n, zero_pixel_share_of_clean_maps=zero, variants={k: t.double().mean().item() for k,t in v.items()})

def markdown(r):
    e, p, v = r['env'], r['result']['protocol'], r['result']
    ci = r['ci']
    lines = [f"# Natural SmallCNN on Fashion-MNIST, {p['variant']} protocol", '',
             f"Command: `{e['command']}` — {e['date']}", '',
             f"Model: `{r['model']}` ({r['model_meta']}); trained with `{TRAIN_COMMAND.format(path=r['model'])}`.", '',
             f"torch {e['torch']}, {e['threads']} threads; load average before {r['load_before']}, after {r['load_after']}; "
             f"wall time {v['seconds']:.0f} s.", '',
             f"Protocol (`evaluate(model, x, y, protocol='fashion_mnist', variant='{p['variant']}', n={p['n']}, aa_n={r['aa_n']}"
             f"{r['overrides_text']})`): ε={p['eps']}, IFIA step {p['ifia_step_size']} × {p['ifia_steps']} iterations, "
             f"attack k={p['attack_k']}, IN k={p['k']}, {p['ig_steps']} IG points measured, {p['attack_ig_steps']} attacked, "
             f"softplus β={p['beta']} ({p['smooth']}), restarts {p['restarts']}; PGD {p['pgd_steps']} steps of {p['pgd_step_size']:.4g}.", '',
             f"NA on all 10,000 test images; **AA on the first {r['aa_n'] or 10000} test images only** (to save time); IN/CO/Spearman "
             f"on the first {v['n']} correctly classified test images ({v['tried']} tried, {v['skipped_misclassified']} skipped as "
             f"misclassified, {v['never_moved']} never moved by the attack).", '',
             '| source | NA | AA | IN | CO | Spearman |', '|---|---|---|---|---|---|',
             f"| **this run** ({p['variant']}, k={p['k']}) | {100*v['NA']:.2f} | {100*v['AA']:.2f} | {v['IN']:.3f} "
             f"[{ci['IN'][0]:.3f}, {ci['IN'][1]:.3f}] | {v['CO']:.3f} [{ci['CO'][0]:.3f}, {ci['CO'][1]:.3f}] | {v['spearman']:.3f} |"]
    for name, na, aa, inn, co in PAPERS: lines.append(f"| {name} | {na} | {aa} | {inn} | {co} | |")
    lines += ['', 'Brackets: 95% percentile bootstrap intervals over the evaluated images.', '']
    return with_notes(lines, r)

def main(argv=None):
    ap = model_parser(__doc__)
    ap.add_argument('--n', type=int, help='correctly classified images for IN/CO (default: the protocol, 200; quick 20)')
    ap.add_argument('--aa-n', type=int, help='AA on the first aa_n test images (default 1000; quick 100)')
    ap.add_argument('--variant', default='quick', choices=('quick', 'full'))
    ap.add_argument('--bs', type=int, default=100, help='attack batch size')
    ap.add_argument('--set', action='append', metavar='KEY=VALUE', help='override a protocol setting')
    ap.add_argument('--quick', action='store_true', help='smoke run')
    ap.add_argument('--co-variants', type=int, metavar='N', help='only: attack the first N correct images, report CO under map/metric variants')
    ap.add_argument('--name', help='results file name (default natural_fashion_mnist[_quick])')
    ap.add_argument('--note', action='append', help='a note for the results file')
    ap.add_argument('--out', default=None, help='results directory (default bench/results)')
    a = ap.parse_args(argv)
    set_threads(a.threads)
    overrides = parse_settings(a.set)
    if a.quick: overrides.setdefault('ifia_steps', 5)
    n, aa_n = a.n or (20 if a.quick else None), a.aa_n or (100 if a.quick else 1000)
    model = fashion_mnist_model(a.model)
    x, y = get_arrays('fashion_mnist', 'test')
    r = dict(env=env_info(), load_before=load(), model=a.model, model_meta=getattr(model, 'meta', {}), aa_n=aa_n,
             overrides=overrides, overrides_text=''.join(f', {k}={v!r}' for k,v in overrides.items()), notes=a.note or [])
    if a.co_variants:
        p = get_protocol('fashion_mnist', a.variant, **overrides)
        idx, _ = first_correct(model, x, y, a.co_variants)
        r.update(protocol={k: getattr(p, k) for k in p.__dataclass_fields__}, co_variants=co_variants(model, x[idx], y[idx], p, len(idx)),
                 load_after=load())
        c = r['co_variants']
        md = '\n'.join([f"# CO of the natural Fashion-MNIST SmallCNN under map and metric variants", '',
                         f"Command: `{r['env']['command']}` — {r['env']['date']}", '',
                         f"The protocol's IFIA ({p.variant}: ε={p.eps}, {p.ifia_steps} × {p.ifia_step_size:.4g}, k={p.attack_k}, "
                         f"{p.ig_steps} IG points measured, β={p.beta}) on the first {c['n']} correctly classified test images; the "
                         f"same attacked images, measured in different ways. {100*c['zero_pixel_share_of_clean_maps']:.0f}% of the clean "
                         "maps' pixels are exactly 0 (zero pixels of the image have IG 0 with a zero baseline).", '',
                         '| measure | mean |', '|---|---|', *[f'| {k} | {v:.3f} |' for k,v in c['variants'].items()], '',
                         *(['## Notes', '', *r['notes'], ''] if r['notes'] else [])])
        paths = write(a.name or 'natural_fashion_mnist_co_variants', r, md, **({} if a.out is None else dict(out=a.out)))
        print(md); print('wrote', *paths)
        return
    res = evaluate(model, x, y, 'fashion_mnist', variant=a.variant, n=n, aa_n=aa_n, bs=a.bs, progress=False, **overrides)
    r.update(load_after=load(), result=res, ci={k: bootstrap_ci(res['per_sample'][k]) for k in ('IN', 'CO', 'spearman')})
    md = markdown(r)
    name = a.name or ('natural_fashion_mnist' + ('_quick' if a.quick else ''))
    paths = write(name, r, md, **({} if a.out is None else dict(out=a.out)))
    print(md); print('wrote', *paths)

if __name__ == '__main__':
    warnings.filterwarnings('ignore', category=FutureWarning)
    main()
