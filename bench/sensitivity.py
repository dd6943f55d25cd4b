"""The sensitivity studies of FAR §5 on Fashion-MNIST at CPU scale, plus the budget-scaling sweep.

    python bench/sensitivity.py --study lambda    # FAR Fig. 3: AAT and AdvAAT fine-tuned with λ ∈ {0, 0.25, 0.5, 1, 1.5}
    python bench/sensitivity.py --study beta      # FAR Fig. 5: softplus β of the evaluation IFIA, Nat and AAT models
    python bench/sensitivity.py --study init      # FAR Table 4 / Fig. 4a: seven weight initializations, Nat and AAT
    python bench/sensitivity.py --study scaling   # IN, CO, NA, AA of AAT and Adv against the number of fine-tuning images
    python bench/sensitivity.py --study all --smoke          # pipeline check of all four in minutes
    python bench/sensitivity.py --study all --estimate       # time a few batches, predict each study's run time

Every study uses the budget of `far_table.py` (`--budget quick` by default: the same fine-tuning images,
learning rate, attack strengths and protocol), reuses the natural (and AAT) model that `far_table.py`
saved under bench/models/far_<budget>_seed<seed>/ when it exists (else trains it the same way), and
evaluates each model on `sweep_n` test images that all models of the study classify correctly, with
bootstrap 95% CIs. Writes bench/results/sensitivity_<study>[_smoke|_full].{md,json,png}.
"""
from __future__ import annotations
import argparse, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _repro import *

STUDIES = ('lambda', 'beta', 'init', 'scaling')
METRICS = ('IN', 'CO', 'NA', 'AA')
COLORS = dict(IN='tab:blue', CO='tab:orange', NA='tab:green', AA='tab:red')

def stem(study:str, b:Budget): return f'sensitivity_{study}' + ('' if b.name=='quick' else f'_{b.name}')

# ---------------------------------------------------------------------------------------------------
# Base models: reuse far_table.py's, else train them the same way
# ---------------------------------------------------------------------------------------------------

def base_model(key:str, b:Budget, seed:int, log=print):
    "far_table.py's saved `key` model ('nat' or 'aat') for this budget and seed, trained and saved if missing."
    path = model_dir(b, seed)/f'{key}.pth'
    if path.exists(): log(f'loaded {path}'); return load_model(path)
    nat = base_model('nat', b, seed, log) if key != 'nat' else None
    model, secs, acc = train_natural(b, seed) if key=='nat' else finetune(key, nat, b, seed)
    method, kwargs, _ = method_spec(key, b)
    save(model, path, data=DATA, key=key, method=method, params=kwargs, seed=seed, budget=b.name, seconds=round(secs, 1))
    log(f'trained {key} in {secs:.0f} s (valid acc {acc:.3f}), saved {path}')
    return model

def evaluate_all(models:dict, b:Budget, seed:int, log=print, **protocol):
    "Evaluate every model on the same `b.sweep_n` images all of them classify correctly."
    x, y = test_arrays(b)
    p = protocol_of(b, n=b.sweep_n, **protocol)
    idx = common_correct(models, x, y, p.n)
    res = {}
    for name, m in models.items():
        res[name] = evaluate_model(m, x, y, idx, p, b.aa_n, seed)
        r = res[name]
        log(f"{name:>16}: NA {r['NA']:.3f} AA {r['AA']:.3f} IN {r['IN']:.3f} CO {r['CO']:.3f} ({r['seconds']} s)")
    return res, p, idx

# ---------------------------------------------------------------------------------------------------
# The studies. Each returns (rows, extra) where rows = {label: result of `evaluate_model`}.
# ---------------------------------------------------------------------------------------------------

def study_lambda(b:Budget, seed:int, log=print):
    "FAR Fig. 3: AAT and AdvAAT fine-tuned from Nat with each λ; Nat as the reference row."
    nat = base_model('nat', b, seed, log)
    models, train = {'Nat': nat}, {}
    for key in ('aat', 'adv_aat'):
        for lam in b.lambdas:
            # AAT with λ = 0 is natural fine-tuning (FAR eq. 10 without its term): train it as such (same result, no wasted attack)
            natural = key=='aat' and lam==0
            m, secs, acc = (finetune_natural(nat, b, seed) if natural else finetune(key, nat, b, seed, lam=lam))
            models[f'{NAMES[key]} λ={lam:g}'], train[f'{NAMES[key]} λ={lam:g}'] = m, round(secs, 1)
            log(f'{NAMES[key]} λ={lam:g}: {secs:.0f} s, valid acc {acc:.3f}')
    res, p, idx = evaluate_all(models, b, seed, log)
    return res, dict(protocol=asdict(p), eval_indices=idx.tolist(), train_seconds=train, lambdas=list(b.lambdas))

def finetune_natural(init, b:Budget, seed:int):
    "Natural fine-tuning with the budget's images and learning rate (AAT's λ = 0 point)."
    seed_everything(seed)
    dls = get_dls(DATA, bs=b.bs, n_train=b.ft_images, n_valid=b.n_valid, seed=seed)
    return fit(robust_learner(dls, 'natural', init=copy.deepcopy(init), lr=b.ft_lr), 1)

def study_beta(b:Budget, seed:int, log=print):
    "FAR Fig. 5: the same Nat and AAT models attacked with IFIA on softplus surrogates of each β."
    models = {'Nat': base_model('nat', b, seed, log), 'AAT': base_model('aat', b, seed, log)}
    x, y = test_arrays(b)
    idx = common_correct(models, x, y, b.sweep_n)
    res = {}
    for beta in b.betas:
        p = protocol_of(b, n=b.sweep_n, beta=beta)
        for name, m in models.items():
            r = evaluate(m, x[idx], y[idx], p, aa=False, seed=seed, progress=False)
            res[f'{name} β={beta:g}'] = dict(model=name, beta=beta, IN=r['IN'], IN_ci=ci(r['per_sample']['IN']),
                                              CO=r['CO'], CO_ci=ci(r['per_sample']['CO']), never_moved=r['never_moved'],
                                              n=r['n'], seconds=round(r['seconds'], 1))
            log(f"{name} β={beta:g}: IN {r['IN']:.3f} CO {r['CO']:.3f} ({r['seconds']:.0f} s)")
    return res, dict(eval_indices=idx.tolist(), protocol=asdict(protocol_of(b, n=b.sweep_n)), betas=list(b.betas))

def study_init(b:Budget, seed:int, log=print):
    "FAR Table 4: a natural model from each initialization scheme, and AAT fine-tuned from it."
    models, train = {}, {}
    for scheme in b.inits:
        seed_everything(seed)
        nat, s1, a1 = train_natural(b, seed, arch=init_weights(SmallCNN(), scheme))
        aat, s2, a2 = finetune('aat', nat, b, seed)
        models[f'{scheme} Nat'], models[f'{scheme} AAT'] = nat, aat
        train[f'{scheme} Nat'], train[f'{scheme} AAT'] = round(s1, 1), round(s2, 1)
        log(f'{scheme}: Nat {s1:.0f} s (valid acc {a1:.3f}), AAT {s2:.0f} s (valid acc {a2:.3f})')
    res, p, idx = evaluate_all(models, b, seed, log)
    return res, dict(protocol=asdict(p), eval_indices=idx.tolist(), train_seconds=train, inits=list(b.inits))

def study_scaling(b:Budget, seed:int, log=print):
    "AAT and Adv fine-tuned on up to max(scaling) images, with snapshots after each count of images."
    nat = base_model('nat', b, seed, log)
    models, train = {'Nat 0': nat}, {}
    for key in ('aat', 'adv'):
        snaps = Snapshots(b.scaling)
        final, secs, acc = finetune(key, nat, b, seed, n_images=max(b.scaling), cbs=[snaps])
        for n, state in snaps.states.items(): models[f'{NAMES[key]} {n}'] = with_state(final, state)
        train[key] = round(secs, 1)
        log(f'{NAMES[key]}: {max(b.scaling)} images in {secs:.0f} s, snapshots {sorted(snaps.states)}')
    res, p, idx = evaluate_all(models, b, seed, log)
    return res, dict(protocol=asdict(p), eval_indices=idx.tolist(), train_seconds=train, images=list(b.scaling))

# ---------------------------------------------------------------------------------------------------
# Plots and tables
# ---------------------------------------------------------------------------------------------------

def _errbar(ax, xs, rows, metric, **kw):
    ys = [r[metric] for r in rows]
    err = [[r[metric]-r[f'{metric}_ci'][0] for r in rows], [r[f'{metric}_ci'][1]-r[metric] for r in rows]]
    ax.errorbar(xs, ys, yerr=err, marker='o', capsize=3, label=metric, color=COLORS.get(metric), **kw)

def plot_lines(groups:dict, xlabel:str, path, metrics=METRICS, logx=False, title=''):
    "One panel per group `{title: (xs, rows)}`, each metric a line with its 95% CI."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, len(groups), figsize=(4.6*len(groups), 3.6), squeeze=False)
    for ax, (name, (xs, rows)) in zip(axs[0], groups.items()):
        for m in metrics: _errbar(ax, xs, rows, m)
        ax.set_title(name); ax.set_xlabel(xlabel); ax.set_ylim(-0.05, 1.05); ax.grid(alpha=.3)
        if logx: ax.set_xscale('log')
    axs[0, 0].legend(fontsize=8)
    if title: fig.suptitle(title, fontsize=9)
    fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)

def plot_init(res:dict, inits, path):
    "FAR Fig. 4a: IN and CO per initialization scheme, Nat and AAT side by side, with 95% CIs."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 2, figsize=(10, 3.6))
    w = 0.38
    for ax, metric in zip(axs, ('IN', 'CO')):
        for i, model in enumerate(('Nat', 'AAT')):
            rows = [res[f'{s} {model}'] for s in inits]
            xs = [j + (i-0.5)*w for j in range(len(inits))]
            err = [[r[metric]-r[f'{metric}_ci'][0] for r in rows], [r[f'{metric}_ci'][1]-r[metric] for r in rows]]
            ax.bar(xs, [r[metric] for r in rows], w, yerr=err, capsize=3, label=model)
        ax.set_xticks(range(len(inits)), inits); ax.set_title(metric); ax.set_ylim(0, 1); ax.grid(alpha=.3, axis='y')
    axs[0].legend()
    fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)

def table(res:dict, cols=METRICS):
    "Markdown rows `label | metric [CI] ...`."
    pct = {'NA', 'AA'}
    head = '| model | ' + ' | '.join(f'{c} (%)' if c in pct else c for c in cols) + ' | never moved |'
    lines = [head, '|' + '---|'*(len(cols)+2)]
    for k, r in res.items():
        lines.append(f'| {k} | ' + ' | '.join(fmt(r.get(c), r.get(f'{c}_ci'), pct=c in pct) for c in cols)
                     + f" | {r['never_moved']}/{r['n']} |")
    return lines

# FAR Table 4 (MNIST; the paper has no Fashion-MNIST init study): NA %, AA %, IN, CO
FAR_TABLE4 = {'PTD': {'Nat': (99.1, 0.0, 0.23, 0.20), 'AAT': (98.9, 8.7, 0.39, 0.28)},
              'CUST': {'Nat': (98.8, 0.0, 0.09, 0.03), 'AAT': (98.6, 8.7, 0.30, 0.18)},
              'UNI': {'Nat': (99.2, 0.0, 0.18, 0.13), 'AAT': (98.7, 5.5, 0.33, 0.24)},
              'HU': {'Nat': (99.2, 0.0, 0.13, 0.08), 'AAT': (98.3, 7.2, 0.38, 0.24)},
              'HN': {'Nat': (99.2, 0.0, 0.10, 0.06), 'AAT': (98.5, 4.3, 0.36, 0.24)},
              'GU': {'Nat': (99.2, 0.0, 0.27, 0.19), 'AAT': (98.8, 6.4, 0.38, 0.27)},
              'GN': {'Nat': (99.2, 0.0, 0.26, 0.20), 'AAT': (98.7, 9.1, 0.39, 0.28)}}

def report(study:str, b:Budget, seed:int, res:dict, extra:dict, seconds:float, env:dict, out_dir:Path):
    "Write the study's JSON, markdown table and plot."
    s = stem(study, b)
    png = out_dir/f'{s}.png'
    if study=='lambda':
        groups = {NAMES[k]: (list(b.lambdas), [res[f'{NAMES[k]} λ={l:g}'] for l in b.lambdas]) for k in ('aat', 'adv_aat')}
        plot_lines(groups, 'λ', png, title='FAR Fig. 3 at CPU scale (Fashion-MNIST)')
        rows = table(res)
    elif study=='beta':
        groups = {m: (list(b.betas), [res[f'{m} β={x:g}'] for x in b.betas]) for m in ('Nat', 'AAT')}
        plot_lines(groups, 'softplus β of the evaluation IFIA', png, metrics=('IN', 'CO'), logx=True,
                   title='FAR Fig. 5 at CPU scale (Fashion-MNIST, IG maps)')
        rows = table(res, ('IN', 'CO'))
    elif study=='init':
        plot_init(res, b.inits, png)
        rows = table(res) + ['', "FAR Table 4 (MNIST, not Fashion-MNIST; the paper's only init study):", '',
                             '| model | NA (%) | AA (%) | IN | CO |', '|---|---|---|---|---|']
        rows += [f'| {s} {m} | ' + ' | '.join(str(v) for v in FAR_TABLE4[s][m]) + ' |' for s in b.inits for m in ('Nat', 'AAT')]
    else:
        nat = res['Nat 0']
        groups = {NAMES[k]: ([0] + list(b.scaling), [nat] + [res[f'{NAMES[k]} {n}'] for n in b.scaling]) for k in ('aat', 'adv')}
        plot_lines(groups, 'fine-tuning images (0 = Nat)', png, title='Budget scaling (Fashion-MNIST)')
        rows = table(res)
    p = extra['protocol']
    md = [f'# Sensitivity study `{study}` (budget `{b.name}`, seed {seed})', '']
    if b.name=='smoke': md += ['**Smoke run: sizes far too small for the numbers to mean anything.**', '']
    acc = '' if study=='beta' else (f"; NA on {res[next(iter(res))]['n_test']} test images, AA under PGD "
                                     f"({p['pgd_steps']} steps) on the first {b.aa_n or 10000}")
    md += [f"Mean [bootstrap 95% CI]. IN (top-{p['k']}) / CO on the same {p['n']} test images for every model "
           f"(the first all of them classify correctly){acc}. IFIA: {p['ifia_steps']} steps of "
           f"{p['ifia_step_size']}, IG {p['ig_steps']} points measured / {p['attack_ig_steps']} attacked, "
           f"softplus β={p['beta']}{' (varied)' if study=='beta' else ''}. Fine-tuning: {b.ft_images} images, "
           f"Adam lr {b.ft_lr}, presets as in far_table.py.", ''] + rows
    md += ['', f"![{study}]({png.name})", '',
           f"Wall time {hms(seconds)}, {env['threads']} thread(s), load at start {env['load_start']}, at end {load_now()}. "
           f"Command: `{env['command']}`", '']
    if study=='lambda': md.insert(4, 'AAT with λ = 0 is trained as natural fine-tuning (the same objective, FAR eq. 10 without its term).\n')
    write_json(out_dir/f'{s}.json', dict(study=study, budget=asdict(b), seed=seed, env=env, seconds=round(seconds, 1),
                                         results=res, **extra))
    (out_dir/f'{s}.md').write_text('\n'.join(md))
    return out_dir/f'{s}.md'

# ---------------------------------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------------------------------

def estimate(studies, b:Budget, seed:int, log=print):
    "Predicted wall time of each study from measured per-image costs (base models assumed present)."
    log(f'measuring per-image costs (load {load_now()}) ...')
    c = measure_costs(b, seed, log=log)
    n, nl = b.sweep_n, len(b.lambdas)
    ev = lambda k, aa=True: k*eval_seconds(c, b, n, aa=aa)
    t = dict(
        **{'lambda': (nl-1)*(c['aat']+c['adv_aat'])*b.ft_images + c['adv_aat']*b.ft_images + c['nat']*b.ft_images + ev(2*nl+1)},
        beta=ev(2*len(b.betas), aa=False),
        init=len(b.inits)*(c['nat']*60000*b.init_nat_epochs + c['aat']*b.ft_images) + ev(2*len(b.inits)),
        scaling=(c['aat']+c['adv'])*max(b.scaling) + ev(2*len(b.scaling)+1))
    for s in studies: log(f'{s:>8}: predicted {hms(t[s])}')
    log(f"total {hms(sum(t[s] for s in studies))} at load {load_now()} with {torch.get_num_threads()} thread(s)")
    return t

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--study', default='all', choices=STUDIES + ('all',))
    ap.add_argument('--budget', default='quick', choices=('quick', 'full'))
    ap.add_argument('--smoke', action='store_true', help='tiny sizes: checks the pipeline in minutes')
    ap.add_argument('--seed', type=int, default=42)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--out', type=Path, default=RESULTS)
    ap.add_argument('--estimate', action='store_true', help='only time a few batches and predict the run time')
    a = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress reaches the log at once under nohup
    b = get_budget('smoke' if a.smoke else a.budget)
    studies = STUDIES if a.study=='all' else (a.study,)
    seed_everything(a.seed, a.threads)
    if a.estimate: estimate(studies, b, a.seed); return 0
    for study in studies:
        start, env = time.time(), env_info()
        res, extra = globals()[f'study_{study}'](b, a.seed)
        print('wrote', report(study, b, a.seed, res, extra, time.time()-start, env, a.out))
    return 0

if __name__ == '__main__': sys.exit(main())
