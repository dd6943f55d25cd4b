"""FAR Table 1 on Fashion-MNIST at CPU scale: every method trained and evaluated by the same code.

    python bench/far_table.py --budget quick                 # the committed table (< 2 h on 2 idle cores)
    python bench/far_table.py --smoke                        # pipeline check in minutes (meaningless numbers)
    python bench/far_table.py --budget quick --estimate      # time a few batches of each stage, predict the run
    python bench/far_table.py --budget quick --out /tmp/rerun --models /tmp/rerun/models \\
        --compare bench/results/far_table_fashion_mnist.json  # reproducibility check of the committed numbers
    python bench/far_table.py --compare-only /tmp/rerun/far_table_fashion_mnist.json \\
        --compare bench/results/far_table_fashion_mnist.json  # its report, bench/results/..._rerun.md, from a finished re-run

Steps (all through robust_attr's public API):
1. a natural SmallCNN trained on the full Fashion-MNIST training set (Adam, lr 1e-3, batch 50: FAR Table 3);
2. fine-tuned from it, as FAR does, with Adv (PGD), IG-NORM, IG-SUM-NORM, ART, AAT, AdvAAT and
   AAT + SaliencyMatch (the Adv model as teacher) — each on the same seeded subset of training images,
   in the same order, for one pass;
3. every model evaluated with the evaluation protocol's (nbs/protocol.ipynb) Fashion-MNIST quick variant: NA on the test set, AA with
   PGD on its first `aa_n` images, IN/CO/Spearman with IFIA on the first `n` test images that *every*
   model classifies correctly (the same images for all rows, so differences are paired), AA-Top-K /
   AA-Kendall with the Adv model as reference; bootstrap 95% CIs over images;
4. results written to bench/results/far_table_fashion_mnist[_smoke|_full].{md,json} with an attack
   figure, the evaluation images as IDX files (for `robust_attr evaluate --path`), and the models to
   bench/models/far_<budget>_seed<seed>/.
"""
from __future__ import annotations
import argparse, json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _repro import *
from robust_attr.evaluate import protocol_attacks

ORDER = ('nat',) + FINETUNED

def result_stem(b:Budget): return 'far_table_fashion_mnist' + ('' if b.name=='quick' else f'_{b.name}')

# ---------------------------------------------------------------------------------------------------
# Training all rows
# ---------------------------------------------------------------------------------------------------

def train_all(b:Budget, seed:int, mdir:Path, reuse:bool=False, log=print):
    "Train (or, with `reuse`, load) the natural model and every fine-tuned one; return `(models, info)`."
    models, info = {}, {}
    for key in ORDER:
        path = mdir/f'{key}.pth'
        if reuse and path.exists():
            models[key] = load_model(path); info[key] = dict(models[key].meta, reused=True)
            log(f'{NAMES[key]:>20}: loaded {path}'); continue
        if key=='nat': model, secs, acc = train_natural(b, seed)
        else: model, secs, acc = finetune(key, models['nat'], b, seed, teacher=models.get('adv'))
        method, kwargs, _ = method_spec(key, b, models.get('adv'))
        meta = dict(data=DATA, key=key, method=method, params=kwargs, seed=seed,
                    budget=b.name, seconds=round(secs, 1), valid_accuracy=round(acc, 4),
                    images=(b.nat_images or 60000)*b.nat_epochs if key=='nat' else b.ft_images,
                    lr=b.nat_lr if key=='nat' else b.ft_lr, init=None if key=='nat' else 'nat.pth',
                    teacher='adv.pth' if key=='aat_sm' else None, sm_lam=b.sm_lam if key=='aat_sm' else None)
        _, mb = save(model, path, **meta)
        models[key], info[key] = model, dict(meta, size_mb=round(mb, 2))
        log(f'{NAMES[key]:>20}: trained in {secs:7.1f} s, valid acc {acc:.3f}, {mb:.1f} MB, load {load_now()}')
    return models, info

# ---------------------------------------------------------------------------------------------------
# Figure: one test image attacked on every model
# ---------------------------------------------------------------------------------------------------

def attack_figure(models:dict, x, y, protocol, seed:int, path):
    "The first evaluation image attacked under every model, a row per model (`widgets.show_outcomes`)."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from robust_attr.widgets import attack_outcome, show_outcomes
    _, ifia = protocol_attacks(protocol, seed)
    fig = show_outcomes({NAMES[key]: attack_outcome(m, x[:1], y[:1], ifia, k=protocol.k) for key, m in models.items()})
    fig.savefig(path, dpi=100); plt.close(fig)
    return path

# ---------------------------------------------------------------------------------------------------
# Writing the table
# ---------------------------------------------------------------------------------------------------

def _paper_cells(key, src):
    p = PAPER.get(key, {}).get(src)
    return ['—']*4 if p is None else [f'{p[0]:.1f}', f'{p[1]:.1f}', f'{p[2]:.2f}', f'{p[3]:.2f}']

def markdown(out:dict):
    "FAR-Table-1-shaped markdown: our numbers with 95% CIs beside FAR's and Gali et al.'s."
    b, p, res = out['budget'], out['protocol'], out['results']
    lines = [f"# FAR Table 1 on Fashion-MNIST at CPU scale (budget `{b['name']}`, seed {out['seed']})", '']
    if b['name']=='smoke': lines += ['**Smoke run: sizes far too small for the numbers to mean anything.**', '']
    lines += ['Ours: mean [bootstrap 95% CI over images]. NA on the first '
              f"{res['nat']['n_test']} test images, AA under PGD on the first {res['nat']['aa_n']}, "
              f"IN (top-{p['k']}) / CO on the same {p['n']} test images for every model (the first ones all "
              'models classify correctly). Papers: FAR Table 1 (IN with k=50, 50 epochs, full protocol) and '
              'Gali et al. Table 1 (k=100).', '',
              '| Model | NA (%) | AA (%) | IN | CO | FAR NA | FAR AA | FAR IN | FAR CO | Gali NA | Gali AA | Gali IN | Gali CO |',
              '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for key, r in res.items():
        lines.append(f"| {NAMES[key]} | {fmt(r['NA'], r['NA_ci'], pct=True)} | {fmt(r['AA'], r['AA_ci'], pct=True)} | "
                     f"{fmt(r['IN'], r['IN_ci'])} | {fmt(r['CO'], r['CO_ci'])} | "
                     + ' | '.join(_paper_cells(key, 'FAR') + _paper_cells(key, 'Gali')) + ' |')
    lines += ['', '## Differences to Nat on the same images (paired bootstrap 95% CI)', '',
              '| Model | ΔIN | ΔCO | Spearman | AA-Top-K (ref. Adv) | AA-Kendall (ref. Adv) | never moved | train s | eval s |',
              '|---|---|---|---|---|---|---|---|---|']
    for key, r in res.items():
        d = out['paired'].get(key, {})
        lines.append(f"| {NAMES[key]} | {fmt(d.get('dIN'), d.get('dIN_ci'), digits=3)} | {fmt(d.get('dCO'), d.get('dCO_ci'), digits=3)} | "
                     f"{fmt(r['spearman'], r['spearman_ci'])} | {fmt(r.get('AA_topk'), r.get('AA_topk_ci'))} | "
                     f"{fmt(r.get('AA_kendall'), r.get('AA_kendall_ci'))} | {r['never_moved']}/{r['n']} | "
                     f"{out['training'][key].get('seconds', '—')} | {r['seconds']} |")
    notes = '\n'.join(f'* {NAMES[k]}: {v}' for k,v in PAPER_NOTES.items())
    methods = '\n'.join(f"* {NAMES[k]}: `{out['training'][k].get('method')}` {json.dumps(out['training'][k].get('params'))}"
                        + (f", teacher Adv, λ_SM={b['sm_lam']}" if k=='aat_sm' else '') for k in FINETUNED)
    lines += ['', '## Budget', '',
              f"* Natural model: SmallCNN, {b['nat_epochs']} epoch(s) over {b['nat_images'] or 60000} training images, "
              f"Adam lr {b['nat_lr']}, batch {b['bs']} (FAR Table 3: 50 epochs).",
              f"* Fine-tuning: every method starts from the natural model and sees the same {b['ft_images']} training "
              f"images (a seeded subset, same order) once, Adam lr {b['ft_lr']}, batch {b['bs']} "
              '(FAR: 50 epochs over 60k images, lr 1e-4 for AAT/AdvAAT).', methods, '',
              *([f"Budget note: {b['note']}", ''] if b.get('note') else []),
              '## Protocol', '',
              f"Evaluation protocol (nbs/protocol.ipynb), Fashion-MNIST preset, variant `{p['variant']}`: ε={p['eps']}, IFIA top-k attack with "
              f"k={p['attack_k']}, {p['ifia_steps']} steps of {p['ifia_step_size']}, IG with {p['ig_steps']} points "
              f"measured / {p['attack_ig_steps']} attacked on the softplus(β={p['beta']}) surrogate ({p['smooth']}), "
              f"{p['restarts']} restart(s), lowest-Kendall valid iterate; PGD {p['pgd_steps']} steps of "
              f"{p['pgd_step_size']:.4f} with a random start.", '',
              '## Papers\' numbers', '', notes, '',
              '## Run', '',
              f"Seed {out['seed']} (data subset and order, weights, random starts), {out['env']['threads']} torch "
              f"thread(s), torch {out['env']['torch']}, fastai {out['env']['fastai']}. Wall time "
              f"{hms(out['seconds'])} (training {hms(out['train_seconds'])}, evaluation {hms(out['eval_seconds'])}); "
              f"load average at start {out['env']['load_start']}, at end {out['load_end']}.",
              f"Command: `{out['env']['command']}`", '',
              'Evaluation images: `' + out['eval_set'] + '` (IDX). To re-check one model with the CLI:', '',
              f"    {out['cli_check']}", f"    {out['cli_check_accuracy']}", '']
    return '\n'.join(lines)

# ---------------------------------------------------------------------------------------------------
# Reproducibility check
# ---------------------------------------------------------------------------------------------------

def compare(new:dict, old:dict, tol:float=0.03) -> dict:
    "Differences between two runs' results, per model, and whether every IN/CO is within `tol`."
    rows = {}
    for key, r in new['results'].items():
        if key not in old['results']: continue
        o = old['results'][key]
        d = {m: round(r[m] - o[m], 4) for m in ('NA', 'AA', 'IN', 'CO')}
        # the largest change of any single image's IN/CO: 0 means the rerun attacked every image identically
        d['max_image_dIN'] = round(max(abs(a-b) for a,b in zip(r['per_sample']['IN'], o['per_sample']['IN'])), 4)
        d['max_image_dCO'] = round(max(abs(a-b) for a,b in zip(r['per_sample']['CO'], o['per_sample']['CO'])), 4)
        rows[key] = d
    ok = all(abs(d['IN']) <= tol and abs(d['CO']) <= tol for d in rows.values())
    return dict(tol=tol, ok=ok, same_images=new['eval_indices']==old['eval_indices'], rows=rows)

def same_weights(dir_a:Path, dir_b:Path) -> dict:
    "Per saved model: are the two runs' weights bit-identical? (None when a file is missing.)"
    out = {}
    for key in ORDER:
        a, b = Path(dir_a)/f'{key}.pth', Path(dir_b)/f'{key}.pth'
        if not (a.exists() and b.exists()): out[key] = None; continue
        sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
        out[key] = sa.keys()==sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    return out

def rerun_report(new_path:Path, old_path:Path, out_dir:Path, log=print) -> bool:
    "Compare a re-run's JSON with the committed one; write `<stem>_rerun.{md,json}` to `out_dir`; True if within ±0.03."
    new, old = json.loads(Path(new_path).read_text()), json.loads(Path(old_path).read_text())
    c = compare(new, old)
    root = BENCH.parent
    mdir = lambda d: Path(d['models_dir']) if Path(d['models_dir']).is_absolute() else root/d['models_dir']
    c['same_weights'] = same_weights(mdir(new), mdir(old))
    c.update(new=dict(path=str(new_path), seconds=new['seconds'], load_end=new['load_end'], env=new['env']),
             old=dict(path=str(old_path), seconds=old['seconds'], load_end=old['load_end'], env=old['env']))
    lines = [f"# Re-run of `{Path(old_path).name}` with the same seed ({new['seed']})", '',
             f"    {new['env']['command']}", '',
             f"Committed run: {hms(old['seconds'])} wall; re-run: {hms(new['seconds'])} wall "
             f"(load at the end {new['load_end']}, torch {new['env'].get('torch')}, {new['env'].get('threads')} thread(s)).",
             f"Same evaluated images: {c['same_images']}. IN/CO of every model within ±{c['tol']}: **{c['ok']}**.", '',
             '| model | ΔNA | ΔAA | ΔIN | ΔCO | max per-image \\|ΔIN\\| | max per-image \\|ΔCO\\| | weights bit-identical |',
             '|---|---|---|---|---|---|---|---|']
    for key, d in c['rows'].items():
        lines.append(f"| {NAMES[key]} | " + ' | '.join(f"{d[m]:+.4f}" for m in ('NA', 'AA', 'IN', 'CO'))
                     + f" | {d['max_image_dIN']:.4f} | {d['max_image_dCO']:.4f} | {c['same_weights'].get(key)} |")
    stem = Path(old_path).stem
    write_json(Path(out_dir)/f'{stem}_rerun.json', c)
    (Path(out_dir)/f'{stem}_rerun.md').write_text('\n'.join(lines) + '\n')
    log('\n'.join(lines))
    return c['ok']

# ---------------------------------------------------------------------------------------------------
# Time estimate: a few batches of each stage, multiplied out
# ---------------------------------------------------------------------------------------------------

def estimate(b:Budget, seed:int, log=print):
    "Predict the wall time of a full run of budget `b` from measured per-image costs."
    log(f'measuring per-image costs (load {load_now()}) ...')
    c = measure_costs(b, seed, log=log)
    p = protocol_of(b)
    nat = c['nat']*(b.nat_images or 60000)*b.nat_epochs
    ft = {k: c[k]*b.ft_images for k in FINETUNED}
    ev = len(ORDER)*eval_seconds(c, b, p.n)
    total = nat + sum(ft.values()) + ev
    log(f"natural training {hms(nat)}; fine-tuning " + ', '.join(f'{k} {hms(v)}' for k,v in ft.items()))
    log(f"evaluation of {len(ORDER)} models {hms(ev)} (IFIA {c['ifia_step']*1000:.0f} ms per image-step, "
        f"PGD {c['pgd']*1000:.0f} ms per image)")
    log(f"predicted total {hms(total)} at load {load_now()} with {torch.get_num_threads()} thread(s)")
    return dict(costs=c, total=total)

# ---------------------------------------------------------------------------------------------------

def run(b:Budget, seed:int, out_dir:Path, mdir:Path, reuse:bool=False, log=print):
    "Train, evaluate and write the table for budget `b`; return the result dict."
    start, env = time.time(), env_info()
    models, info = train_all(b, seed, mdir, reuse, log)
    train_seconds = time.time() - start
    x, y = test_arrays(b)
    p = protocol_of(b)
    idx = common_correct(models, x, y, p.n)
    stem = result_stem(b)
    eval_set = write_eval_set(x[idx], y[idx], out_dir/f'{stem}_eval_set')
    results, t = {}, time.time()
    for key, m in models.items():
        results[key] = evaluate_model(m, x, y, idx, p, b.aa_n, seed, reference=models['adv'])
        r = results[key]
        log(f"{NAMES[key]:>20}: NA {r['NA']:.3f} AA {r['AA']:.3f} IN {r['IN']:.3f} {r['IN_ci']} CO {r['CO']:.3f} "
            f"{r['CO_ci']} ({r['seconds']} s, load {load_now()})")
    eval_seconds = time.time() - t
    attack_figure(models, x[idx[:1]], y[idx[:1]], p, seed, out_dir/f'{stem}_attacks.png')
    rel = lambda q: str(q.relative_to(BENCH.parent)) if q.is_relative_to(BENCH.parent) else str(q)
    sets = ' '.join(f'--set {k}={v}' for k,v in b.protocol.items() if k != 'n')
    out = dict(budget=asdict(b), seed=seed, protocol=asdict(p), env=env, eval_indices=idx.tolist(), names=NAMES,
               paper={k: {s: list(v) for s,v in d.items()} for k,d in PAPER.items()}, paper_notes=PAPER_NOTES,
               eval_set=rel(eval_set), models_dir=rel(mdir), training=info, results=results,
               paired={k: paired_ci(results, k) for k in results if k != 'nat'},
               seconds=round(time.time()-start, 1), train_seconds=round(train_seconds, 1),
               eval_seconds=round(eval_seconds, 1), load_end=load_now(),
               cli_check=f"robust_attr evaluate --model {rel(mdir)}/aat.pth --data {DATA} --path {rel(eval_set)} "
                         f"--n {p.n} {sets} --set aa=False --set seed={seed}  # gives this table's IN/CO for AAT",
               cli_check_accuracy=f"robust_attr evaluate --model {rel(mdir)}/aat.pth --data {DATA} --n 1 --set ifia_steps=1 "
                                  f"--set pgd_steps={p.pgd_steps} --set aa_n={b.aa_n} --set seed={seed}  # gives AA"
                                  + (" and NA" if b.n_test is None else " (NA: on all 10k test images, the table used "
                                     f"the first {b.n_test})"))
    write_json(out_dir/f'{stem}.json', out)
    (out_dir/f'{stem}.md').write_text(markdown(out))
    log(f"wrote {out_dir/stem}.md/.json in {hms(out['seconds'])}")
    return out

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--budget', default='quick', choices=('quick', 'full'))
    ap.add_argument('--smoke', action='store_true', help='tiny sizes: checks the pipeline in minutes')
    ap.add_argument('--seed', type=int, default=42, help='FAR fixes all seeds to 42 (default: %(default)s)')
    ap.add_argument('--threads', type=int, default=2, help='torch threads (default: %(default)s)')
    ap.add_argument('--out', type=Path, default=RESULTS, help='results directory (default: bench/results)')
    ap.add_argument('--models', type=Path, help='models directory (default: bench/models/far_<budget>_seed<seed>)')
    ap.add_argument('--reuse', action='store_true', help='load models already saved in --models instead of training')
    ap.add_argument('--estimate', action='store_true', help='only time a few batches and predict the run time')
    ap.add_argument('--compare', type=Path, help='a committed JSON to compare the new numbers with (±0.03 IN/CO); '
                    'writes <its stem>_rerun.{md,json} to --out')
    ap.add_argument('--compare-only', type=Path, metavar='NEW_JSON',
                    help='no training: compare this finished run with --compare and write the report to --out')
    a = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress reaches the log at once under nohup
    if a.compare_only:
        if a.compare is None: ap.error('--compare-only needs --compare')
        return 0 if rerun_report(a.compare_only, a.compare, a.out) else 1
    b = get_budget('smoke' if a.smoke else a.budget)
    seed_everything(a.seed, a.threads)
    if a.estimate: estimate(b, a.seed); return 0
    run(b, a.seed, a.out, a.models or model_dir(b, a.seed), a.reuse)
    return 0 if a.compare is None or rerun_report(a.out/f'{result_stem(b)}.json', a.compare, a.out) else 1

if __name__ == '__main__': sys.exit(main())
