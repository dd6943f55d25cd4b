"""How close the ensemble attack gets to Sparsified SmoothGrad's certificate on the digits.

    python bench/certify_attack.py            # 8 digits, k' = 1, 5, 10, 15 of k = 20: about 12 min on 2 busy cores
    python bench/certify_attack.py --kp 10 15 # only these certified overlaps

The small digits classifier of the audit notebook (`audit.digits_probe`), the first 8 of every 37th validation digit. The
certificate: N = 2000 draws, σ = 0.25, τ = 3 %, k = 20, 99 % confidence. For each k′ the ensemble (all members: every kind
at every surrogate β, 8 steps of R/4) attacks every image inside the ℓ2 ball of its radius R(k′), climbing `certify.abs_smoothgrad`; the
attacked map is measured with Sparsified SmoothGrad (1000 fresh draws). Writes bench/results/certify_attack.{md,json}:
per k′ the certified overlap, the measured overlap (mean and minimum), violations (measured < certified) and the margin.
"""
import argparse, time, torch
from robust_attr.audit import digits_probe, ENSEMBLE, ENSEMBLE_BETAS, ENSEMBLE_RESTARTS
from robust_attr.data import get_arrays
from robust_attr.certify import sparsified_counts, certify, certified_attack
from _env import env_info, load, write, set_threads

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--kp', type=int, nargs='+', default=[1, 5, 10, 15], help="certified overlaps k' (of k = 20) whose radii bound the attack")
    a = ap.parse_args(argv)
    set_threads(1)
    start, load_start = time.time(), load()
    net = digits_probe()
    x, _ = get_arrays('digits', 'valid')
    x = x[::37][:8]
    with torch.no_grad(): y = net(x).argmax(1)
    N, k, tau, sigma = 2000, 20, 0.03, 0.25
    cert = certify(sparsified_counts(net, x, y, N, sigma, tau, generator=torch.Generator().manual_seed(1)), N, k, sigma, 0.99)
    rows = {}
    for kp in a.kp:
        t = time.time()
        m, c = certified_attack(net, x, y, cert, kp, steps=8, n_measure=1000, tau=tau)
        ok = c > 0
        rows[kp] = dict(radius=cert.radius[:, kp-1].tolist(), certified=c.tolist(), measured=m.tolist(), images=int(ok.sum()),
                        violations=int((m[ok] < c[ok]).sum()), min_margin=(m[ok] - c[ok]).min().item() if ok.any() else None,
                        seconds=time.time() - t)
        print(kp, rows[kp], flush=True)
    out = dict(env=env_info(), load_start=load_start, settings=dict(N=N, k=k, tau=tau, sigma=sigma, confidence=0.99, steps=8, n_measure=1000),
               rows=rows, load_end=load(), minutes=(time.time() - start)/60)
    L = ['# The ensemble attack inside Sparsified SmoothGrad\'s certified radius (digits)', '',
         f"Command: `{out['env']['command']}`; load average {load_start} at the start, {out['load_end']} at the end; {out['minutes']:.1f} min.", '',
         f"Certificate: N = {N} draws, σ = {sigma}, τ = {tau:.0%}, top-{k}, 99 % confidence (Clopper–Pearson, Bonferroni over the 784 pixels). "
         f"Attack: `audit.EnsembleAttack` ({', '.join(ENSEMBLE)}, each at softplus β = 1 and {', '.join(f'{b:g}' for b in ENSEMBLE_BETAS)}, "
         f"{ENSEMBLE_RESTARTS} run(s) each, 8 steps of R/4) inside the ℓ2 ball of each image's R(k′), climbing "
         "|∇| averaged over 16 Gaussian copies; measured with Sparsified SmoothGrad from 1000 fresh draws.", '',
         '| k′ (certified overlap) | mean radius R(k′) | images with R > 0 | measured overlap: mean | min | violations | smallest margin (measured − certified) |',
         '|---|---|---|---|---|---|---|']
    for kp, r in rows.items():
        ok = [i for i,c in enumerate(r['certified']) if c > 0]
        meas = [r['measured'][i] for i in ok]
        L.append(f"| {kp}/{k} | {sum(r['radius'])/len(r['radius']):.3f} | {r['images']} | {sum(meas)/max(len(meas),1):.3f} | "
                 f"{min(meas) if meas else float('nan'):.3f} | {r['violations']} | {r['min_margin'] if r['min_margin'] is not None else float('nan'):.3f} |")
    L += ['', 'A violation would be an attacked map whose measured top-k overlap with the clean map falls below the certified share.', '']
    write('certify_attack', out, '\n'.join(L))
    print('\n'.join(L))

if __name__ == '__main__': main()
