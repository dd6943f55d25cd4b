"""The ensemble explanation attack against the protocol's IFIA alone, on the committed natural and AAT Fashion-MNIST models.

    python bench/audit_ensemble.py                 # n=100, the sizes below: about 20 min on 2 busy cores
    python bench/audit_ensemble.py --n 10 --quick  # a smoke run (bench/results/audit_ensemble_quick.*)

Both models (bench/models/far_quick_seed42/{nat,aat}.pth, the quick FAR table's) are attacked on the same images: the
first `n` Fashion-MNIST test images both classify correctly. Per model, interleaved: the protocol's IFIA alone
(`evaluate`, no AA), then `audit.EnsembleAttack` (its four kinds of member at the protocol's β and at each of
ENSEMBLE_BETAS, ENSEMBLE_RESTARTS runs each, and the noise baseline).
The protocol is the quick Fashion-MNIST one with smaller sizes so that the whole run fits in ~20 min (stated in the
results): IFIA steps, IG points of the measured and the attacked maps. Every member shares them. Writes
bench/results/audit_ensemble.{md,json}: IN and CO of each attack, of the ensemble and of the noise baseline with
bootstrap intervals, the per-image difference ensemble − IFIA with its paired bootstrap interval, the cost as a
multiple of the single attack's time, and the ordering of the two models under each.
"""
from __future__ import annotations
import argparse, time
import torch
from robust_attr.data import get_arrays
from robust_attr.models import load_model
from robust_attr.evaluate import evaluate, get_protocol, protocol_attacks, correct_by_all, bootstrap_ci, format_interval
from robust_attr.audit import EnsembleAttack, audit_attacks, ensemble_table, format_table, ENSEMBLE, ENSEMBLE_BETAS, ENSEMBLE_RESTARTS, NOISE_DRAWS
from _env import env_info, load, write, set_threads

MODELS = dict(Nat='bench/models/far_quick_seed42/nat.pth', AAT='bench/models/far_quick_seed42/aat.pth')
SIZES = dict(ifia_steps=12, ig_steps=12, attack_ig_steps=4)  # the quick protocol's 40 / 50 / 10, shrunk to fit ~20 min

def diff(a, b):
    "Mean of the per-image difference a − b and its paired bootstrap interval."
    d = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    return dict(mean=d.mean().item(), ci=bootstrap_ci(d))

def run_model(model, x, y, p, bs):
    "IFIA alone, then the ensemble, on the same images; per-image values and times."
    ifia = evaluate(model, x, y, p, aa=False, n=len(x), bs=bs, progress=False)
    ens = EnsembleAttack(protocol_attacks(p, seed=0, internal_batch_size=256)[1], k=p.k)
    res = audit_attacks(model, x, y, ens, n=len(x), bs=bs)
    rows, r = ensemble_table(res), res['record']
    return dict(ifia=dict(IN=ifia['per_sample']['IN'], CO=ifia['per_sample']['CO'], seconds=ifia['seconds'], never_moved=ifia['never_moved']),
                rows=rows, seconds=res['seconds'], found_by=r.found_by,
                per_image=dict(IN=r.IN.tolist(), CO=r.CO.tolist(), **{k: v.tolist() for k,v in r.lens.items()}, **{'noise_'+k: v.tolist() for k,v in r.noise.items()}),
                diff=dict(IN=diff(r.IN.tolist(), ifia['per_sample']['IN']), CO=diff(r.CO.tolist(), ifia['per_sample']['CO'])),
                cost=res['seconds'] / ifia['seconds'])

def markdown(out):
    p, L = out['protocol'], []
    L += ['# Ensemble explanation attack vs the protocol\'s IFIA (Fashion-MNIST)', '',
          f"Command: `{out['env']['command']}` (torch threads {out['env']['threads']}); load average {out['load_start']} at the start, "
          f"{out['load_end']} at the end; {out['minutes']:.1f} min in all.", '',
          f"Models: {', '.join(f'{k} = `{v}`' for k,v in MODELS.items())}. Images: the first {out['n']} Fashion-MNIST test images both "
          "models classify correctly, the same for every attack.", '',
          f"Protocol: `fashion_mnist`, quick variant with smaller sizes: ε = {p['eps']:g} (L∞), IFIA {p['ifia_steps']} steps × {p['ifia_step_size']:g}, "
          f"attacked top-{p['attack_k']}, IN's k = {p['k']}, IG {p['ig_steps']} points (measured map) / {p['attack_ig_steps']} (attacked map, softplus β = {p['beta']:g}). "
          f"Ensemble: kinds {', '.join(ENSEMBLE)}, each at the protocol's β = {p['beta']:g} and at β = {', '.join(f'{b:g}' for b in ENSEMBLE_BETAS)} "
          f"(members `kind_betaB`), every member with these budgets, {ENSEMBLE_RESTARTS} run(s) each (the first from the clean image, any others from a random start); "
          f"`halving` starts at step 2ε and halves on stall (APGD's rule). Noise baseline: the worst of {NOISE_DRAWS} uniform points of the same ε-ball "
          "(label kept), as a Max-Sensitivity-style random measure reports.", '',
          'IN/CO: mean [95% bootstrap interval]; LENS-recall (3×3 window) and LENS-τ: the locality-aware measures of `robust_attr.lens`. *never moved*: images the attack left at the clean input (IN = CO = 1). '
          '*worst IN / CO found*: images on which this member reached the ensemble\'s lowest IN / lowest CO (the ensemble\'s IN and CO are each the lowest any member reached). Seconds: wall time of that attack.', '']
    for name, r in out['models'].items():
        i = r['ifia']
        L += [f'## {name}', '', f"Protocol IFIA alone (`evaluate`): IN {format_interval(sum(i['IN'])/len(i['IN']), bootstrap_ci(i['IN']))}, "
              f"CO {format_interval(sum(i['CO'])/len(i['CO']), bootstrap_ci(i['CO']))}, never moved {i['never_moved']}, {i['seconds']:.0f} s.", '',
              format_table(r['rows']), '',
              f"Ensemble − IFIA per image: IN {format_interval(r['diff']['IN']['mean'], r['diff']['IN']['ci'], digits=3)}, "
              f"CO {format_interval(r['diff']['CO']['mean'], r['diff']['CO']['ci'], digits=3)} (paired bootstrap). "
              f"Cost: {r['cost']:.1f}× the single attack's time ({r['seconds']:.0f} s vs {i['seconds']:.0f} s).", '']
    o = out['ordering']
    L += ['## Ordering of the two models', '', '| attack | IN: AAT − Nat | CO: AAT − Nat |', '|---|---|---|']
    for k, v in o.items():
        L.append(f"| {k} | {format_interval(v['IN']['mean'], v['IN']['ci'], digits=3)} | {format_interval(v['CO']['mean'], v['CO']['ci'], digits=3)} |")
    L += ['', 'Per-image paired differences on the same images, bootstrap intervals. Positive: AAT\'s maps are more robust.', '']
    return '\n'.join(L)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=100, help='images attacked (the first both models classify correctly)')
    ap.add_argument('--bs', type=int, default=100, help='images per attack batch')
    ap.add_argument('--threads', type=int, default=1, help='torch threads')
    ap.add_argument('--quick', action='store_true', help='write audit_ensemble_quick.* (a smoke run)')
    a = ap.parse_args(argv)
    set_threads(a.threads)
    start, load_start = time.time(), load()
    models = {k: load_model(v) for k,v in MODELS.items()}
    x, y = get_arrays('fashion_mnist', 'test')
    idx = correct_by_all(models, x, y, a.n)
    x, y = x[idx], y[idx]
    p = get_protocol('fashion_mnist', 'quick', n=a.n, **SIZES)
    out = dict(env=env_info(), load_start=load_start, protocol=p.record(), n=len(idx), images=idx.tolist(), models={})
    for name, m in models.items():
        print(f'{name} ...', flush=True)
        out['models'][name] = run_model(m, x, y, p, a.bs)
        print(format_table(out['models'][name]['rows']), flush=True)
    nat, aat = out['models']['Nat'], out['models']['AAT']
    out['ordering'] = {'IFIA alone': {k: diff(aat['ifia'][k], nat['ifia'][k]) for k in ('IN', 'CO')},
                       'ensemble': {k: diff(aat['per_image'][k], nat['per_image'][k]) for k in ('IN', 'CO')},
                       'noise': {k: diff(aat['per_image']['noise_'+k], nat['per_image']['noise_'+k]) for k in ('IN', 'CO')}}
    out.update(load_end=load(), minutes=(time.time() - start)/60)
    md = markdown(out)
    print(md)
    write('audit_ensemble' + ('_quick' if a.quick else ''), out, md)

if __name__ == '__main__': main()
