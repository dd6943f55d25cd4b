"""Issue 26: does the audit's ensemble cover the surrogate's β? Single top-k attacks that differ only in β against the audit at its defaults.

    python -u bench/audit_beta.py            # n=20: about 1 h at 1 thread under load 6 (7.5k attack steps of 20 images)
    python -u bench/audit_beta.py --smoke    # the pipeline on 3 images, 2 steps (bench/results/audit_beta_smoke.*)

For each committed Fashion-MNIST model (bench/models/far_quick_seed42/{nat,aat}.pth) and its own first `n` correctly
classified test images in the set's order (`sample='first'`, as issue 26's table):

* **single attacks**: the quick protocol's IFIA (top-k objective, steps of 0.01, 10 IG points on the climbed map, 50 on
  the measured one, the valid iterate with the lowest Kendall τ) with 50 steps, at softplus β = 1, 10, 100, 1000 and
  nothing else changed;
* **the audit**: `audit.EnsembleAttack` exactly as `robust_attr audit --model M --n 20 --set sample="'first'"` builds it
  (quick protocol, 40 steps, every kind of member at every β of the ensemble, `ENSEMBLE_RESTARTS` runs each).

Writes bench/results/audit_beta.{md,json}: IN and CO of each single attack and of the ensemble with bootstrap
intervals, the per-member table, the worst case restricted to the members at each β (what the ensemble would report
without the others), the protocol's IFIA (β = 1, the ensemble's `ifia` member) against the ensemble per image, and the
cost of each in attack steps (one step: the climbed map's gradient and the measured map of the new iterate) and seconds.
"""
from __future__ import annotations
import argparse, time
import torch
from robust_attr.data import get_arrays
from robust_attr.models import load_model
from robust_attr.evaluate import get_protocol, protocol_attacks, evaluation_sample, bootstrap_ci, format_interval
from robust_attr.audit import (EnsembleAttack, audit_attacks, ensemble_table, format_table, like, map_metrics, ENSEMBLE,
                               ENSEMBLE_BETAS, ENSEMBLE_RESTARTS)
from _env import env_info, load, write, set_threads

MODELS = dict(AAT='bench/models/far_quick_seed42/aat.pth', Nat='bench/models/far_quick_seed42/nat.pth')
BETAS = (1., 10., 100., 1000.)  # the single attacks' surrogate β (issue 26's table)
SINGLE_STEPS = 50  # the single attacks' steps (issue 26's table)

def mean_ci(v):
    "Mean and bootstrap interval of the defined values."
    v = torch.as_tensor(v, dtype=torch.float64)
    v = v[~v.isnan()]
    return dict(mean=v.mean().item(), ci=bootstrap_ci(v))

def singles(model, x, y, ifia, k, steps, betas):
    "The protocol's IFIA with `steps` steps at each β: per-image IN and CO, steps, seconds."
    clean, out = ifia.measure_map(model, x, y), {}
    for b in betas:
        a, start = like(ifia, steps=steps, spec=ifia.spec.replace(beta=b)), time.time()
        xa, rec = a(model, x, y, return_record=True, clean_map=clean)
        m = map_metrics(clean, a.measure_map(model, xa, y), k)
        out[f'{b:g}'] = dict(IN=m['IN'].tolist(), CO=m['CO'].tolist(), steps=int(rec.steps.sum()), seconds=time.time() - start)
        print(f"  single β={b:g}: IN {m['IN'].nanmean():.3f} CO {m['CO'].nanmean():.3f} ({out[f'{b:g}']['seconds']:.0f} s)", flush=True)
    return out

def worst(members:dict, names:list):
    "Per image the lowest IN and CO over `members[names]` (unmoved images count 1, as the ensemble counts them)."
    low = {}
    for k in ('IN', 'CO'):
        v = torch.stack([torch.tensor(members[n][k]).where(torch.tensor(members[n]['moved']), torch.tensor(1.)) for n in names])
        low[k] = v.min(0).values.tolist()
    return low

def audit(model, x, y, p, bs):
    "The audit's ensemble as `robust_attr audit` builds it, on the first len(x) images of (x, y) in order."
    ens = EnsembleAttack(protocol_attacks(p, 0, internal_batch_size=256)[1], attacks=ENSEMBLE, k=p.k, seed=0)
    res = audit_attacks(model, x, y, ens, n=len(x), sample='first', bs=bs)
    r = res['record']
    members = {n: dict(IN=m['IN'].tolist(), CO=m['CO'].tolist(), moved=m['moved'].tolist(), steps=int(m['steps'].sum()),
                       beta=ens.members[n].spec.beta, seconds=r.seconds.get(n)) for n,m in r.members.items()}
    by_beta = {f'{b:g}': worst(members, [n for n,m in members.items() if m['beta'] == b]) for b in ens.betas}
    return dict(rows=ensemble_table(res), members=members, by_beta=by_beta, IN=r.IN.tolist(), CO=r.CO.tolist(), found_by=r.found_by,
                found_by_IN=r.found_by_IN, steps=sum(m['steps'] for m in members.values()), seconds=res['seconds'])

def diff(a, b):
    "Mean of the per-image difference a − b and its paired bootstrap interval."
    d = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    return dict(mean=d.mean().item(), ci=bootstrap_ci(d))

def fmt(d, digits=2): return format_interval(d['mean'], d['ci'], digits=digits)

def markdown(out):
    p, L = out['protocol'], []
    L += ["# Does the audit cover the surrogate's β? (issue 26, Fashion-MNIST)", '',
          f"Command: `{out['env']['command']}` (torch threads {out['env']['threads']}); load average {out['load_start']} at the start, "
          f"{out['load_end']} at the end; {out['minutes']:.1f} min in all.", '',
          f"Images: each model's first {out['n']} correctly classified Fashion-MNIST test images in the set's order (`sample='first'`). "
          f"Protocol: `fashion_mnist`, quick: ε = {p['eps']:g} (L∞), steps of {p['ifia_step_size']:g}, attacked top-{p['attack_k']}, IN's k = {p['k']}, "
          f"IG {p['ig_steps']} points (measured map) / {p['attack_ig_steps']} (climbed map, softplus β = {p['beta']:g} unless stated).", '',
          f"*Single*: the protocol's IFIA with {out['single_steps']} steps, only β changed (issue 26's table). *Audit*: `EnsembleAttack` as "
          f"`robust_attr audit --n {out['n']} --set sample=\"'first'\"` builds it: kinds {', '.join(ENSEMBLE)}, each at β = "
          f"{', '.join(f'{b:g}' for b in out['ensemble_betas'])}, {p['ifia_steps']} steps, {ENSEMBLE_RESTARTS} run(s) each. "
          "*Protocol's IFIA*: its `ifia` member, the quick protocol's attack at β = 1. *Worst at β = b*: the per-image worst case over "
          "the members at that β alone. Steps: attack steps summed over the images (one step = the climbed map's gradient and the "
          "measured map of the new iterate); seconds under the load above.", '',
          'IN / CO: mean [95% bootstrap interval]; lower is a stronger attack.', '']
    for name, r in out['models'].items():
        a = r['audit']
        L += [f'## {name}', '', '| attack | IN | CO | steps | seconds |', '|---|---|---|---|---|']
        for b, s in r['single'].items():
            L.append(f"| single, β = {b} | {fmt(mean_ci(s['IN']))} | {fmt(mean_ci(s['CO']))} | {s['steps']} | {s['seconds']:.0f} |")
        ifia = a['members']['ifia']
        L.append(f"| protocol's IFIA (β = 1, {p['ifia_steps']} steps) | {fmt(mean_ci(ifia['IN']))} | {fmt(mean_ci(ifia['CO']))} | {ifia['steps']} | {ifia['seconds']:.0f} |")
        for b, w in a['by_beta'].items():
            names = [n for n,m in a['members'].items() if f"{m['beta']:g}" == b]
            L.append(f"| audit, worst at β = {b} ({len(names)} members) | {fmt(mean_ci(w['IN']))} | {fmt(mean_ci(w['CO']))} | "
                     f"{sum(a['members'][n]['steps'] for n in names)} | {sum(a['members'][n]['seconds'] for n in names):.0f} |")
        L.append(f"| **audit: the ensemble** | **{fmt(mean_ci(a['IN']))}** | **{fmt(mean_ci(a['CO']))}** | {a['steps']} | {a['seconds']:.0f} |")
        best = {k: min(r['single'], key=lambda b: mean_ci(r['single'][b][k])['mean']) for k in ('IN', 'CO')}
        L += ['', f"Ensemble − best single attack per image: IN {fmt(diff(a['IN'], r['single'][best['IN']]['IN']), 3)} (β = {best['IN']}), "
              f"CO {fmt(diff(a['CO'], r['single'][best['CO']]['CO']), 3)} (β = {best['CO']}). "
              f"Ensemble − protocol's IFIA (β = 1) per image: IN {fmt(r['below_protocol']['IN'], 3)}, CO {fmt(r['below_protocol']['CO'], 3)} "
              f"(paired bootstrap), at {a['steps'] / ifia['steps']:.0f}× its steps.", '',
              'Every member (the ensemble\'s own table):', '', format_table(a['rows']), '']
    return '\n'.join(L)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=20, help='images per model (its first n correct)')
    ap.add_argument('--bs', type=int, default=100, help='images per attack batch')
    ap.add_argument('--threads', type=int, default=1, help='torch threads')
    ap.add_argument('--smoke', action='store_true', help='3 images, 2 steps: the pipeline (audit_beta_smoke.*)')
    a = ap.parse_args(argv)
    set_threads(a.threads)
    n, sizes = (3, dict(ifia_steps=2, ig_steps=4, attack_ig_steps=2)) if a.smoke else (a.n, {})
    steps = 2 if a.smoke else SINGLE_STEPS
    start, load_start = time.time(), load()
    p = get_protocol('fashion_mnist', 'quick', n=n, sample='first', **sizes)
    x_all, y_all = get_arrays('fashion_mnist', 'test')
    out = dict(env=env_info(), load_start=load_start, protocol=p.record(), n=n, single_steps=steps, ensemble_betas=[p.beta, *ENSEMBLE_BETAS], models={})
    for name, path in MODELS.items():
        model = load_model(path)
        idx, _ = evaluation_sample(model, x_all, y_all, n, 'first')
        x, y = x_all[idx], y_all[idx]
        print(f'{name}: images {idx.tolist()}', flush=True)
        single = singles(model, x, y, protocol_attacks(p, 0, internal_batch_size=256)[1], p.k, steps, BETAS)
        aud = audit(model, x, y, p, a.bs)
        print(format_table(aud['rows']), flush=True)
        out['models'][name] = dict(images=idx.tolist(), single=single, audit=aud,
                                   below_protocol={k: diff(aud[k], aud['members']['ifia'][k]) for k in ('IN', 'CO')})
    out.update(load_end=load(), minutes=(time.time() - start)/60)
    md = markdown(out)
    print(md)
    write('audit_beta' + ('_smoke' if a.smoke else ''), out, md)

if __name__ == '__main__': main()
