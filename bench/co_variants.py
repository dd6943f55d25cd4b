"""What caps Kendall's CO: the table's attacked images measured under map and metric variants, for every committed model.

    python -u bench/co_variants.py                          # the committed study: 8 models, the table's first 100 images
    python -u bench/co_variants.py --n 200                  # all 200 images of the table
    python -u bench/co_variants.py --models nat,aat         # a subset of the models
    python -u bench/co_variants.py --smoke                  # pipeline check: 2 models, 4 images, 3 IFIA steps

The models are the quick table's (`bench/models/far_quick_seed42/*.pth`), the images the first `--n` of the
table's 200 (`bench/results/far_table_fashion_mnist_eval_set`), the attack the table's IFIA
(`protocol_of(quick budget)` + `protocol_attacks(p, seed=42)`, batches of 128 as `evaluate` makes them), so the
protocol's IN and CO of every image are the table's — the script checks that against the table's per-image
numbers and writes the largest difference.

On the same attacked images it measures
* CO as the protocol defines it (Kendall's tau-b of the |IG| maps over all 784 pixels), tau-a of the same maps,
  tau-b over the object pixels only (x > 0 in the clean image), tau-b over the union of both maps' top-k,
  tau-b of signed IG (channel-summed, no |·|) and Spearman's rho;
* a decomposition of the protocol's CO by pixel pairs: object–object, object–background and
  background–background pairs' share of tau-b's numerator (the three add up to CO), and the largest
  object–background share (what it would be if no background pixel rose above an object pixel);
* how many pixels of the clean / attacked maps are exactly 0, and the share of background pixels in the
  attacked map's top-k;
and then repeats all of it for the *object-constrained* IFIA: the same attack whose steps are zero on the
clean image's background pixels (x == 0), so the background stays exactly 0 and keeps IG 0.

Every cell is a mean with a percentile bootstrap 95% interval over the images (`bootstrap_ci`); differences
between models (AAT − Nat) are paired over images. Writes bench/results/co_variants.{md,json}
(`--smoke`: co_variants_smoke.*).
"""
from __future__ import annotations
import argparse, copy, json, sys, time
from dataclasses import asdict
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _repro import (RESULTS, MODELS, DATA, NAMES, FINETUNED, PAPER, get_budget, protocol_of, seed_everything,
                    env_info, load_now, ci, fmt, write_json, hms)
from robust_attr.data import get_arrays
from robust_attr.models import load_model
from robust_attr.evaluate import protocol_attacks, bootstrap_ci
from robust_attr.attacks import IFIA
from robust_attr.metrics import kendall_tau, spearman, topk_intersection, topk_mask

ORDER = ('nat',) + FINETUNED
TABLE = RESULTS/'far_table_fashion_mnist.json'
EVAL_SET = RESULTS/'far_table_fashion_mnist_eval_set'
MODEL_DIR = MODELS/'far_quick_seed42'
BS = 128  # `evaluate`'s default batch size: the table attacked its images in these batches

# ---------------------------------------------------------------------------------------------------
# The object-constrained attack
# ---------------------------------------------------------------------------------------------------

class ObjectIFIA(IFIA):
    "IFIA whose perturbation stays 0 on the clean image's background (x == 0): the objective sees `x + m·(x̃ − x)`."
    def prepare(self, model, x, y, **context):
        if self.random_start or self.restarts != 1:
            raise ValueError('ObjectIFIA masks the steps, not random starts: use random_start=False, restarts=1')
        ctx = super().prepare(model, x, y, **context)
        ctx['object'] = (x > 0).to(x.dtype)
        return ctx

    def ascent_objective(self, model, x_adv, y, ctx):
        # the gradient w.r.t. x_adv is exactly 0 on the background, so the sign step leaves it where it started (at x)
        return super().ascent_objective(model, ctx['x'] + ctx['object'] * (x_adv - ctx['x']), y, ctx)

def object_ifia(p, seed:int, internal_batch_size:int|None=256):
    "The protocol's IFIA (`protocol_attacks`), object-constrained: the same attack object, every setting kept."
    _, ifia = protocol_attacks(p, seed, internal_batch_size)
    obj = copy.copy(ifia)
    obj.__class__ = ObjectIFIA
    return obj

# ---------------------------------------------------------------------------------------------------
# Measures on one batch of (clean, attacked) maps
# ---------------------------------------------------------------------------------------------------

VARIANTS = {  # key: label (the rows of the table)
    'CO': 'protocol: tau-b of |IG|, all pixels',
    'tau_a': 'tau-a of the same maps (ties: neither concordant nor discordant, ÷ all pairs)',
    'tau_b_object': 'tau-b over the object pixels only (x > 0)',
    'tau_b_union_topk': 'tau-b over the union of both maps\' top-k',
    'tau_b_signed': 'tau-b of signed IG (channel sum, no |·|)',
    'spearman': 'Spearman\'s rho of |IG|, all pixels',
    'IN': 'IN (top-k intersection), for reference',
}
PARTS = {
    'co_oo': 'CO share from object–object pairs',
    'co_ob': 'CO share from object–background pairs',
    'co_bb': 'CO share from background–background pairs',
    'co_ob_max': 'object–background share if no background pixel rose above an object pixel',
    'zero_clean': 'share of clean-map pixels exactly 0',
    'zero_adv': 'share of attacked-map pixels exactly 0',
    'bg_in_adv_topk': 'share of background pixels in the attacked map\'s top-k',
}

def masked_tau(c, a, mask):
    "Tau-b of each pair of rows restricted to the row's `mask` (a loop over rows: masks differ in size)."
    return torch.stack([kendall_tau(c[i][mask[i]][None], a[i][mask[i]][None])[0] for i in range(len(c))])

def pair_parts(c, a, obj):
    "Per row: tau-b's numerator split by pair kind (object/background), divided by its denominator; and tau-a, tau-b."
    out = {k: [] for k in ('tau_a', 'tau_b', 'co_oo', 'co_ob', 'co_bb', 'co_ob_max')}
    n = c.shape[1]
    n0 = n*(n-1)/2
    for ci_, ai, oi in zip(c.double(), a.double(), obj):
        sc, sa = torch.sign(ci_[:, None] - ci_[None, :]), torch.sign(ai[:, None] - ai[None, :])
        P = sc*sa
        bi = ~oi
        s_oo, s_bb, s_ob = P[oi][:, oi].sum()/2, P[bi][:, bi].sum()/2, P[oi][:, bi].sum()
        n1, n2 = ((sc == 0).sum() - n)/2, ((sa == 0).sum() - n)/2   # tied pairs of each map
        d = ((n0 - n1)*(n0 - n2)).sqrt()
        d = d if d > 0 else torch.tensor(float('inf'), dtype=torch.float64)
        out['tau_a'].append((s_oo + s_bb + s_ob)/n0); out['tau_b'].append((s_oo + s_bb + s_ob)/d)
        out['co_oo'].append(s_oo/d); out['co_bb'].append(s_bb/d); out['co_ob'].append(s_ob/d)
        out['co_ob_max'].append((sc[oi][:, bi] != 0).sum()/d)
    return {k: torch.stack(v) for k, v in out.items()}

def measure(ifia, signed, model, x, xa, y, clean, adv, k:int) -> dict:
    "Every variant and part, per image, for clean images `x` and attacked `xa` with their |IG| maps `clean`, `adv`."
    c, a = clean.flatten(1), adv.flatten(1)
    obj = x.flatten(1) > 0   # single-channel images: a pixel is object where the clean image is not 0
    parts = pair_parts(c, a, obj)
    union = topk_mask(c, k) | topk_mask(a, k)
    sc, sa = signed.measure_map(model, x, y), signed.measure_map(model, xa, y)
    adv_top = topk_mask(a, k)
    r = dict(CO=kendall_tau(clean, adv), tau_a=parts['tau_a'], tau_b_object=masked_tau(c, a, obj),
             tau_b_union_topk=masked_tau(c, a, union), tau_b_signed=kendall_tau(sc, sa), spearman=spearman(clean, adv),
             IN=topk_intersection(clean, adv, k), co_oo=parts['co_oo'], co_ob=parts['co_ob'], co_bb=parts['co_bb'],
             co_ob_max=parts['co_ob_max'], zero_clean=(c == 0).double().mean(1), zero_adv=(a == 0).double().mean(1),
             bg_in_adv_topk=(adv_top & ~obj).double().sum(1)/k, tau_b_check=parts['tau_b'])
    return {key: v.double().cpu() for key, v in r.items()}

def attack_and_measure(attack, signed, model, x, y, p) -> dict:
    "Attack `x` in batches of `BS` (as `evaluate` does) and measure every variant; per-image tensors."
    per, moved, bg_moved = [], [], []
    for i in range(0, len(x), BS):
        xb, yb = x[i:i+BS], y[i:i+BS]
        clean = attack.measure_map(model, xb, yb)
        xa, rec = attack(model, xb, yb, return_record=True, clean_map=clean)
        adv = attack.measure_map(model, xa, yb)
        per.append(measure(attack, signed, model, xb, xa, yb, clean, adv, p.k))
        moved.append(rec.moved)
        bg = (xb == 0)
        bg_moved.append(((xa - xb).abs()*bg).flatten(1).amax(1))
    out = {k: torch.cat([d[k] for d in per]) for k in per[0]}
    out['moved'] = torch.cat(moved).double(); out['bg_max_change'] = torch.cat(bg_moved).double()
    return out

# ---------------------------------------------------------------------------------------------------

def summarize(per:dict) -> dict:
    "Mean and bootstrap 95% CI of every per-image measure (per-image values kept, rounded)."
    return {k: dict(mean=v.mean().item(), ci=ci(v), per_sample=[round(t, 5) for t in v.tolist()]) for k, v in per.items()}

def paired(res:dict, a:str, b:str, key:str):
    "Mean and bootstrap CI of the per-image difference a − b of measure `key`."
    d = torch.tensor(res[a][key]['per_sample']) - torch.tensor(res[b][key]['per_sample'])
    return dict(mean=d.mean().item(), ci=ci(d))

def rank_kendall(u:list, v:list) -> float:
    "Kendall's tau-b between two short lists (the ranking of the methods by two measures)."
    return kendall_tau(torch.tensor([u], dtype=torch.float64), torch.tensor([v], dtype=torch.float64))[0].item()

FAR_KEYS = ('nat', 'adv', 'ig_sum_norm', 'aat', 'adv_aat')  # the models FAR Table 1 has a CO for

def shape(res:dict, key:str) -> dict:
    "How measure `key` compares with FAR's CO column: Nat, AAT, AAT − Nat (paired), share of 1 − Nat closed, ranking."
    out = dict(nat=res['nat'][key]['mean']) if 'nat' in res else {}
    if 'nat' in res and 'aat' in res:
        d = paired(res, 'aat', 'nat', key)
        out.update(aat=res['aat'][key]['mean'], aat_minus_nat=d['mean'], aat_minus_nat_ci=d['ci'],
                   closed=d['mean']/(1 - out['nat']) if out['nat'] < 1 else None)
    out['ranking'] = sorted(res, key=lambda m: -res[m][key]['mean'])
    common = [m for m in FAR_KEYS if m in res]
    if len(common) >= 3:
        out['kendall_with_far'] = rank_kendall([res[m][key]['mean'] for m in common], [PAPER[m]['FAR'][3] for m in common])
        out['far_models'] = list(common)
    return out

FAR_SHAPE = dict(nat=PAPER['nat']['FAR'][3], aat=PAPER['aat']['FAR'][3],
                 aat_minus_nat=PAPER['aat']['FAR'][3] - PAPER['nat']['FAR'][3],
                 closed=(PAPER['aat']['FAR'][3] - PAPER['nat']['FAR'][3])/(1 - PAPER['nat']['FAR'][3]))

def table_check(res:dict, table:dict, n:int) -> dict:
    "The protocol measures of the unconstrained attack against the table's per-image IN/CO (first `n` images)."
    out = {}
    for m, r in res.items():
        t = table['results'].get(m)
        if t is None: continue
        row = {}
        for q in ('IN', 'CO'):
            ours, theirs = torch.tensor(r[q]['per_sample']), torch.tensor(t['per_sample'][q][:n])
            row[f'max_abs_d{q}'] = round((ours - theirs).abs().max().item(), 5)
            row[f'mean_{q}_table_first_n'] = round(theirs.mean().item(), 4)
            row[f'mean_{q}_table_all'] = round(t[q], 4)
        out[m] = row
    return out

# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------

def cell(r, nd=2): return fmt(r['mean'], r['ci'], digits=nd)
def esc(label): return label.replace('|', '\\|')  # |IG| inside a markdown table cell

def rows(res:dict, keys:dict, nd=2):
    models = list(res)
    lines = ['| measure | ' + ' | '.join(NAMES[m] for m in models) + ' |', '|---|' + '---|'*len(models)]
    for k, label in keys.items():
        lines.append(f'| {esc(label)} | ' + ' | '.join(cell(res[m][k], nd) for m in models) + ' |')
    return lines

def markdown(out:dict) -> str:
    e, p = out['env'], out['protocol']
    full, obj = out['results']['full'], out['results']['object']
    lines = ['# What caps Kendall\'s CO: the quick table\'s attacks measured under map and metric variants', '']
    if out['smoke']: lines += ['**Smoke run: sizes far too small for the numbers to mean anything.**', '']
    lines += [f"Command: `{e['command']}` — {e['date']}", '',
              f"Models: `{out['models_dir']}` (the quick table's). Images: the first {out['n']} of the table's "
              f"{out['table_n']} (`{out['eval_set']}`), every one classified correctly by every model. Attack: the table's "
              f"IFIA — the evaluation protocol's (nbs/protocol.ipynb) quick variant, ε={p['eps']}, {p['ifia_steps']} steps of {p['ifia_step_size']}, top-"
              f"{p['attack_k']} attack, IG {p['ig_steps']} points measured / {p['attack_ig_steps']} attacked on softplus(β="
              f"{p['beta']}), lowest-Kendall valid iterate, seed {out['seed']}, batches of {BS}. "
              f"{100*out['object_share']:.0f}% of the images' pixels are object (x > 0); the rest is background (x = 0), "
              'whose IG is exactly 0 with the zero baseline.', '',
              'Mean [percentile bootstrap 95% CI over the images] of each per-image measure; k = '
              f"{p['k']} for every top-k.", '',
              '## 1. The protocol\'s attack, measured in different ways', '',
              *rows(full, VARIANTS), '',
              'Check against the table: the per-image protocol IN/CO above are the table\'s own for the same images '
              f"(largest per-image |ΔIN| {out['check_max']['IN']:.5f}, |ΔCO| {out['check_max']['CO']:.5f} over all models"
              f"{'; smoke settings differ from the table, so this check does not apply' if out['smoke'] else ''}). "
              'The decomposition below adds up to the protocol\'s CO for every image (largest |Σ parts − CO| '
              f"{out['decomposition_max_error']:.1e}).", '',
              '## 2. Where the protocol\'s CO comes from (pixel pairs), and zeros', '',
              *rows(full, PARTS), '',
              '## 3. The object-constrained attack (no change on background pixels)', '',
              f"The same IFIA with every step zero on the clean image's background (largest background change over all "
              f"images and models: {out['object_bg_max_change']:.1g}), so the background keeps IG 0 in the attacked map.", '',
              *rows(obj, VARIANTS), '', *rows(obj, PARTS), '',
              '## 4. Which measure has FAR\'s shape (low Nat, high AAT)?', '',
              f"FAR Table 1 CO: Nat {FAR_SHAPE['nat']:.2f}, AAT {FAR_SHAPE['aat']:.2f}, AAT − Nat "
              f"{FAR_SHAPE['aat_minus_nat']:+.2f}, which closes {100*FAR_SHAPE['closed']:.0f}% of Nat's distance to 1. "
              'Ranking agreement: Kendall\'s tau between our means and FAR\'s CO over the models FAR reports '
              f"({', '.join(NAMES[m] for m in FAR_KEYS)}; FAR ties AAT and AdvAAT).", '',
              '| attack | measure | Nat | AAT | AAT − Nat (paired CI) | share of 1 − Nat closed | ranking (high → low) | tau with FAR\'s ranking |',
              '|---|---|---|---|---|---|---|---|']
    for att, label in (('full', 'protocol'), ('object', 'object-only')):
        for k, s in out['shape'][att].items():
            if 'aat' not in s: continue
            lines.append(f"| {label} | {esc(VARIANTS[k])} | {s['nat']:.2f} | {s['aat']:.2f} | "
                         f"{fmt(s['aat_minus_nat'], s['aat_minus_nat_ci'], digits=3)} | "
                         f"{'—' if s['closed'] is None else format(100*s['closed'], '.0f') + '%'} | "
                         f"{' > '.join(NAMES[m] for m in s['ranking'])} | "
                         f"{'—' if s.get('kendall_with_far') is None else format(s['kendall_with_far'], '.2f')} |")
    lines += ['', '## Run', '',
              f"{e['threads']} torch thread(s) (OMP_NUM_THREADS={e['omp_num_threads']}), torch {e['torch']}; wall time "
              f"{hms(out['seconds'])}; load average before {e['load_start']}, after {out['load_end']}. Per model and attack: "
              + ', '.join(f"{NAMES[m]} {t['full']:.0f}/{t['object']:.0f} s" for m, t in out['seconds_per_model'].items()) + '.', '']
    return '\n'.join(lines)

# ---------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--n', type=int, default=100, help="the first N of the table's 200 images (default: %(default)s)")
    ap.add_argument('--models', help='comma-separated model keys (default: all eight; --smoke: nat,aat)')
    ap.add_argument('--smoke', action='store_true', help='2 models, 4 images, 3 IFIA steps: checks the pipeline in a minute')
    ap.add_argument('--threads', type=int, default=1, help='torch threads (default: %(default)s)')
    ap.add_argument('--seed', type=int, default=42, help="the table's seed (default: %(default)s)")
    ap.add_argument('--out', type=Path, default=RESULTS, help='results directory (default: bench/results)')
    ap.add_argument('--markdown-only', type=Path, metavar='JSON', help='no attack: rewrite the .md beside a finished run\'s JSON')
    a = ap.parse_args(argv)
    if a.markdown_only:
        a.markdown_only.with_suffix('.md').write_text(markdown(json.loads(a.markdown_only.read_text())))
        return 0
    sys.stdout.reconfigure(line_buffering=True)
    seed_everything(a.seed, a.threads)
    start, env = time.time(), env_info()
    models = [m.strip() for m in (a.models or ('nat,aat' if a.smoke else ','.join(ORDER))).split(',') if m.strip()]
    overrides = {}
    if a.smoke: a.n, overrides = 4, dict(ifia_steps=3, ig_steps=10, attack_ig_steps=3)
    unknown = set(models) - set(ORDER)
    if unknown: ap.error(f'unknown models {sorted(unknown)}; models: {list(ORDER)}')
    table = json.loads(TABLE.read_text())
    p = protocol_of(get_budget('quick'), **overrides)
    if asdict(p) != {**table['protocol'], **overrides}: raise RuntimeError(f'protocol differs from the table: {asdict(p)}')
    x, y = get_arrays(DATA, 'test', path=EVAL_SET)
    x, y = x[:a.n], y[:a.n]
    _, ifia = protocol_attacks(p, a.seed, internal_batch_size=256)   # `evaluate`'s internal batch size
    obj_ifia = object_ifia(p, a.seed)
    signed = IFIA(p.eps, p.ifia_step_size, 1, k=p.attack_k, ig_steps=p.ig_steps, reduce=p.reduce, abs=False,
                  internal_batch_size=256)
    print(f'{len(x)} images, models {models}, protocol {asdict(p)}, load {load_now()}')
    res, seconds = {'full': {}, 'object': {}}, {}
    for m in models:
        model = load_model(MODEL_DIR/f'{m}.pth')
        with torch.no_grad(): wrong = (model(x).argmax(1) != y).sum().item()
        if wrong: raise RuntimeError(f'{m} misclassifies {wrong} of the evaluation images')
        seconds[m] = {}
        for att, attack in (('full', ifia), ('object', obj_ifia)):
            t = time.time()
            res[att][m] = summarize(attack_and_measure(attack, signed, model, x, y, p))
            seconds[m][att] = round(time.time() - t, 1)
            r = res[att][m]
            print(f"{NAMES[m]:>20} {att:>6}: CO {r['CO']['mean']:.3f} IN {r['IN']['mean']:.3f} tau-a {r['tau_a']['mean']:.3f} "
                  f"object {r['tau_b_object']['mean']:.3f} union {r['tau_b_union_topk']['mean']:.3f} signed "
                  f"{r['tau_b_signed']['mean']:.3f} spearman {r['spearman']['mean']:.3f} | oo {r['co_oo']['mean']:.3f} "
                  f"ob {r['co_ob']['mean']:.3f}/{r['co_ob_max']['mean']:.3f} bg-in-top-k {r['bg_in_adv_topk']['mean']:.3f} "
                  f"({seconds[m][att]} s, load {load_now()})")
    check = table_check(res['full'], table, a.n)
    dec_err = max(abs(a_ - b_) for att in res.values() for r in att.values()
                  for a_, b_ in zip(r['CO']['per_sample'], r['tau_b_check']['per_sample']))
    rel = lambda q: str(Path(q).resolve().relative_to(RESULTS.parent.parent))
    out = dict(smoke=a.smoke, seed=a.seed, n=len(x), table_n=len(table['eval_indices']), models=models,
               eval_set=rel(EVAL_SET), models_dir=rel(MODEL_DIR), protocol=asdict(p), env=env,
               variants=VARIANTS, parts=PARTS, names=NAMES, far_shape=FAR_SHAPE,
               paper={m: PAPER[m]['FAR'] for m in FAR_KEYS},
               object_share=(x > 0).double().mean().item(), table_check=check,
               check_max={q: max((c[f'max_abs_d{q}'] for c in check.values()), default=float('nan')) for q in ('IN', 'CO')},
               decomposition_max_error=dec_err,
               object_bg_max_change=max(max(r['bg_max_change']['per_sample']) for r in res['object'].values()),
               shape={att: {k: shape(r, k) for k in VARIANTS} for att, r in res.items()},
               results=res, seconds_per_model=seconds, seconds=round(time.time() - start, 1), load_end=load_now())
    stem = 'co_variants' + ('_smoke' if a.smoke else '')
    write_json(a.out/f'{stem}.json', out)
    md = markdown(out)
    (a.out/f'{stem}.md').write_text(md)
    print(md); print('wrote', a.out/f'{stem}.md', a.out/f'{stem}.json')
    return 0

if __name__ == '__main__': sys.exit(main())
