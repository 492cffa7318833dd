"""The paper's claim, checked: coupled (complementary) masks give a lower-variance estimate of a
middle's log-likelihood than independent random masks, at the same number of forward passes.

For each held-out middle (diffucode.quality's multi-line cases) the estimate is drawn `--draws`
times each way, two forward passes per draw either way:

    coupled      t ~ U(0.2, 0.8); one pass masks a fraction t of the middle, the other exactly the rest;
                 estimate = ( (1/t) sum_{M} log p + (1/(1-t)) sum_{not M} log p ) / 2
    independent  two masks drawn independently, each with its own t ~ U(0.2, 0.8);
                 estimate = mean over the two of (1/t) sum_{M} log p

Both estimate the same quantity (each token is masked with probability t and weighted 1/t).
Reported per middle: the variance of each estimator over the draws; overall: the mean and
median ratio independent / coupled, the share of middles where coupled is lower, and the mean
estimates (they should agree). The code before and after is never masked.

    python benchmarks/coupled_variance.py [--model DIR] [--samples 40] [--draws 24]

Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

import torch

from diffucode import Engine
from diffucode.daemon.engine.coupled import T_RANGE, Pass, complementary, pass_logps
from diffucode.quality import samples


def _estimates(engine, before, middle, after, draws: int, rng: random.Random) -> tuple[list[float], list[float]]:
    tasks = engine.tasks
    ids, start = tasks._layout("infill", before, middle, after)
    n = len(middle)
    passes, plan = [], []
    for _ in range(draws):
        first, second, t = complementary(n, rng)
        passes += [Pass(ids, start, first), Pass(ids, start, second)]
        plan.append(("coupled", (1 / t, 1 / (1 - t))))
        weights = []
        for _ in range(2):
            t = rng.uniform(*T_RANGE)
            k = max(1, min(n - 1, round(t * n)))
            passes.append(Pass(ids, start, sorted(rng.sample(range(n), k))))
            weights.append(n / k)  # 1 / the fraction actually masked
        plan.append(("independent", tuple(weights)))
    cfg = engine.checkpoint.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    sums = []
    for i in range(0, len(passes), 32):  # batches of 32 rows
        with torch.inference_mode():
            sums += [float(lp.sum()) for lp in pass_logps(engine.checkpoint.network, passes[i:i + 32],
                                                          engine.checkpoint.mask_id, pad)]
    coupled, independent = [], []
    for k, (kind, (w1, w2)) in enumerate(plan):
        value = (w1 * sums[2 * k] + w2 * sums[2 * k + 1]) / 2
        (coupled if kind == "coupled" else independent).append(value)
    return coupled, independent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    ap.add_argument("--set", dest="which", choices=["stdlib", "packages"], default="stdlib")
    ap.add_argument("--samples", type=int, default=40, help="held-out middles")
    ap.add_argument("--draws", type=int, default=24, help="estimates per middle and estimator")
    ap.add_argument("--context", type=int, default=96, help="tokens of code kept on each side")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    engine = Engine.load(args.model, device="cpu")
    tok = engine.tasks.tok
    rng = random.Random(args.seed)
    rows, t0 = [], time.perf_counter()
    for case in samples(args.samples, args.seed, args.which, kind="multi"):
        middle = tok.encode(case.middle)
        if len(middle) < 2:
            continue
        before, after = tok.encode(case.before)[-args.context:], tok.encode(case.after)[:args.context]
        coupled, independent = _estimates(engine, before, middle, after, args.draws, rng)
        rows.append({"tokens": len(middle), "var_coupled": statistics.variance(coupled),
                     "var_independent": statistics.variance(independent),
                     "mean_coupled": statistics.fmean(coupled), "mean_independent": statistics.fmean(independent)})
    seconds = time.perf_counter() - t0
    ratios = [r["var_independent"] / r["var_coupled"] for r in rows if r["var_coupled"] > 0]
    summary = {
        "middles": len(rows), "draws": args.draws, "tokens_mean": round(statistics.fmean(r["tokens"] for r in rows), 1),
        "var_coupled_mean": round(statistics.fmean(r["var_coupled"] for r in rows), 2),
        "var_independent_mean": round(statistics.fmean(r["var_independent"] for r in rows), 2),
        "ratio_of_means": round(statistics.fmean(r["var_independent"] for r in rows)
                                / statistics.fmean(r["var_coupled"] for r in rows), 2),
        "ratio_median": round(statistics.median(ratios), 2),
        "coupled_lower_share": round(sum(r["var_coupled"] < r["var_independent"] for r in rows) / len(rows), 3),
        "estimate_mean_coupled": round(statistics.fmean(r["mean_coupled"] for r in rows), 2),
        "estimate_mean_independent": round(statistics.fmean(r["mean_independent"] for r in rows), 2),
    }
    print(f"coupled vs independent masks: {len(rows)} held-out middles ({args.which}, seed {args.seed}), "
          f"{summary['tokens_mean']} tokens on average, {args.draws} draws of 2 forward passes each way; "
          f"{seconds:.0f} s on {platform.machine()} {os.cpu_count()} cores, {engine.checkpoint.path.name}")
    print(f"{'estimator':12s} {'mean variance':>14s} {'mean estimate':>14s}")
    print(f"{'coupled':12s} {summary['var_coupled_mean']:14.2f} {summary['estimate_mean_coupled']:14.2f}")
    print(f"{'independent':12s} {summary['var_independent_mean']:14.2f} {summary['estimate_mean_independent']:14.2f}")
    print(f"variance ratio independent/coupled: {summary['ratio_of_means']}x (of means), "
          f"{summary['ratio_median']}x (median per middle); coupled lower on {100 * summary['coupled_lower_share']:.0f}%")
    print(json.dumps({"benchmark": "coupled_variance", "set": args.which, "seed": args.seed,
                      "seconds": round(seconds, 1), **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
