"""The README's picture: Integrated Gradients maps of a natural and of two robustly trained digits models, before and
after the same IFIA attack on the same digit. Also writes the numbers behind it.

    OMP_NUM_THREADS=1 python bench/readme_figure.py      # from the repository root; ~10-20 min on 2 CPU cores

Writes nbs/images/fragile_vs_robust.png and bench/results/readme_figure.md."""
import argparse, os, time
from pathlib import Path
import torch

def fit(learn, epochs):
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs)
    return learn.model.eval()

def train_models(seed, nat_epochs, robust_epochs):
    "Nat, and AAT / AdvAAT fine-tuned from it (FAR Table 3's recipe, at the size of `robust_attr demo`)."
    from fastai.torch_core import set_seed
    from robust_attr.data import get_dls
    from robust_attr.train import robust_learner
    set_seed(seed)
    dls = get_dls('digits', bs=64, seed=seed)
    nat = fit(robust_learner(dls, 'natural', lr=1e-3), nat_epochs)
    robust = dict(eps=0.1, steps=3, ig_steps=5)
    aat = fit(robust_learner(dls, 'aat', init=nat, lr=1e-3, lam=1.0, **robust), robust_epochs)
    adv_aat = fit(robust_learner(dls, 'adv_aat', init=nat, lr=1e-3, lam=0.5, **robust), robust_epochs)
    return {'Nat': nat, 'AAT': aat, 'AdvAAT': adv_aat}, robust

def main(png='nbs/images/fragile_vs_robust.png', md='bench/results/readme_figure.md', seed=0, nat_epochs=8,
         robust_epochs=2, n=20):
    import matplotlib; matplotlib.use('Agg')
    from robust_attr.data import get_arrays
    from robust_attr.evaluate import get_protocol, protocol_attacks, correct_by_all
    from robust_attr.widgets import attack_outcome, show_outcomes, outcome_frame
    start = time.time()
    models, robust = train_models(seed, nat_epochs, robust_epochs)
    x, y = get_arrays('digits', 'valid', seed=seed)
    idx = correct_by_all(models, x, y, n)  # the first n validation digits every model classifies correctly, the classes in turn
    p = get_protocol('digits', 'quick')
    _, ifia = protocol_attacks(p, seed)
    outcomes = {name: attack_outcome(m, x[idx], y[idx], ifia, k=p.k) for name,m in models.items()}
    fig = show_outcomes(outcomes, i=0)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    acc = {name: (m(x).argmax(1) == y).float().mean().item() for name,m in models.items()}
    rows = [f"| {name} | {acc[name]:.3f} | {o.IN.mean():.3f} | {o.CO.mean():.3f} | {o.IN[0]:.3f} | {o.CO[0]:.3f} |"
            for name,o in outcomes.items()]
    Path(md).parent.mkdir(parents=True, exist_ok=True)
    Path(md).write_text('\n'.join([
        '# The README picture: fragile vs robust IG maps on digits', '',
        f'Written by `bench/readme_figure.py` (seed {seed}); the picture is `{png}`.', '',
        f'Models: Nat ({nat_epochs} epochs), AAT (λ=1) and AdvAAT (λ=0.5) fine-tuned from it for {robust_epochs} epochs '
        f'with {robust}, on scikit-learn digits (28×28). Attack: IFIA of the `digits` protocol, quick variant ({p}).', '',
        f'The picture shows validation digit {idx[0].item()}: the first one all three models classify correctly. '
        f'Means are over the first {len(idx)} such digits, the classes taken in turn (per class: {torch.bincount(y[idx], minlength=10).tolist()}).', '',
        '| model | validation accuracy | mean IN | mean CO | IN (shown digit) | CO (shown digit) |', '|---|---|---|---|---|---|',
        *rows, '', f'{time.time()-start:.0f} s; load average at the end: {os.getloadavg()[0]:.1f} (2 cores).', '']))
    print(Path(md).read_text())

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--seed', type=int, default=0); ap.add_argument('--n', type=int, default=20)
    ap.add_argument('--nat-epochs', type=int, default=8); ap.add_argument('--robust-epochs', type=int, default=2)
    a = ap.parse_args()
    main(seed=a.seed, nat_epochs=a.nat_epochs, robust_epochs=a.robust_epochs, n=a.n)
