"""
Frozen Lake's sensitivity sweep: does frozen_lake.py's comparison hold at other learning rates
and betas?

    python frozen_lake_sweep.py                  # the two-routes map (RESULTS.md, section 6)
    python frozen_lake_sweep.py --map dead-end   # the second design (section 7)
    python frozen_lake_sweep.py --help           # every option: frozen_lake.py's, and the grid's

Choosing each method's lr by the reported MSE would tune on the test metric (there is no
validation set), so the sweep chooses nothing: it reruns frozen_lake.py's comparison at every
(lr, beta), with the same seeds and starting weights, and reports per family (a) the ranking at
each lr, (b) each method's best MSE anywhere, an "oracle" chosen on the metric itself (a bound
on what tuning could buy), and (c) the grid points where the paper's order holds. SFT and IFT,
without a beta, run once per lr. Into --out-dir, beside frozen_lake.py's files: sweep.json and
frozen_lake_sweep.png.
"""

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from itertools import product

import torch

import frozen_lake as fl
from frozen_lake import FAMILIES, METHODS, PAPER_ORDER
from plumbing import UserError, arg, mean_std, parse_flags, pyplot


@dataclass
class SweepConfig(fl.Config):
    sweep_lrs: tuple = arg((0.01, 0.05, 0.2), "Adam learning rates (every method)")
    sweep_dpo_betas: tuple = arg((0.1, 0.5), "DPO betas, each at every learning rate")
    sweep_orpo_betas: tuple = arg((0.25, 1.0), "ORPO betas, each at every learning rate")


def config_problem(cfg):
    """The grid's checks, then frozen_lake.py's: the first problem in one line, or None."""
    for name in ("sweep_lrs", "sweep_dpo_betas", "sweep_orpo_betas"):
        values, flag = getattr(cfg, name), "--" + name.replace("_", "-")
        if not all(x > 0.0 for x in values):
            return f"{flag} must all be > 0, got {values}"
        if len(set(values)) < len(values):
            return f"{flag} must not repeat a value, got {values}"
    return fl.config_problem(cfg)


def variants(cfg):
    """The (method, beta) pairs trained at each lr, in METHODS order."""
    betas = {"DPO": cfg.sweep_dpo_betas, "ORPO": cfg.sweep_orpo_betas}
    return [(method, beta) for method in METHODS for beta in betas.get(method, [None])]


def label(method, beta):
    return method if beta is None else f"{method}(beta {beta:g})"


def sweep(cfg, env, demos, pi_star):
    """Train every (family, method, lr, beta) on every seed (a line per row), print the table,
    then (b) and (c) per family; returns the rows and, per family, (a), (b) and (c)."""
    rows = []
    for family, lr, (method, beta) in product(FAMILIES, cfg.sweep_lrs, variants(cfg)):
        t0 = time.time()
        betas = {"DPO": {"dpo_beta": beta}, "ORPO": {"orpo_beta": beta}}.get(method, {})
        point = replace(cfg, lr=lr, **betas)
        mses = [fl.train(family, seed, method, point, env, demos, pi_star)[1][-1][2]
                for seed in range(cfg.seeds)]  # the MSE after the last step, as in the main run
        mean, std = mean_std(mses)
        rows.append({"family": family, "method": method, "lr": lr, "beta": beta,
                     "mse_mean": mean, "mse_std": std, "mse_seeds": mses})
        print(f"sweep | {family:7s} | lr {lr:<5g} | {label(method, beta):16s} | "
              f"MSE {mean:.4f} ± {std:.4f} | {time.time() - t0:.1f}s")
    print(f"\nsweep: MSE to pi* after {cfg.steps} steps, mean ± sample std over {cfg.seeds} "
          f"seed(s) (main run: lr {cfg.lr:g}, DPO beta {cfg.dpo_beta:g}, ORPO beta "
          f"{cfg.orpo_beta:g})")
    print(f"{'policy':8s} {'method':16s} | "
          + " | ".join(f"{f'lr {lr:g}':15s}" for lr in cfg.sweep_lrs))
    for family, (method, beta) in product(FAMILIES, variants(cfg)):
        print(f"{family:8s} {label(method, beta):16s} | " + " | ".join(
            f"{r['mse_mean']:.4f} ± {r['mse_std']:.4f}" for r in rows
            if (r["family"], r["method"], r["beta"]) == (family, method, beta)))
    verdicts = {}
    for family in FAMILIES:
        mine = sorted((r for r in rows if r["family"] == family), key=lambda r: r["mse_mean"])
        at_lr = {f"{lr:g}": [[label(r["method"], r["beta"]), r["mse_mean"]]
                             for r in mine if r["lr"] == lr] for lr in cfg.sweep_lrs}  # (a)
        oracle = [next(r for r in mine if r["method"] == m) for m in METHODS]  # (b)
        oracle.sort(key=lambda r: r["mse_mean"])
        verdict = ("matches" if tuple(r["method"] for r in oracle) == PAPER_ORDER
                   else "does NOT match")
        best = " < ".join(f"{label(r['method'], r['beta'])} {r['mse_mean']:.4f} at lr "
                          f"{r['lr']:g}" for r in oracle)
        print(f"sweep {family} oracle, each method's best grid point (CHOSEN ON THE REPORTED MSE, "
              f"a reference only): {best} -> {verdict} the paper's order")
        mse = {(r["method"], r["lr"], r["beta"]): r["mse_mean"] for r in mine}
        grid = list(product(cfg.sweep_lrs, cfg.sweep_dpo_betas, cfg.sweep_orpo_betas))
        holds = []  # (c) the grid points where the paper's order holds
        for lr, dpo_beta, orpo_beta in grid:
            beta = {"SFT": None, "DPO": dpo_beta, "ORPO": orpo_beta, "IFT": None}
            if tuple(sorted(METHODS, key=lambda m: mse[(m, lr, beta[m])])) == PAPER_ORDER:
                holds.append({"lr": lr, "dpo_beta": dpo_beta, "orpo_beta": orpo_beta})
        print(f"sweep {family} paper's order {' > '.join(PAPER_ORDER)} holds at {len(holds)} of "
              f"{len(grid)} grid points (lr x DPO beta x ORPO beta)")
        for h in holds:
            print(f"    at lr {h['lr']:g}, DPO beta {h['dpo_beta']:g}, "
                  f"ORPO beta {h['orpo_beta']:g}")
        verdicts[family] = {"ranking_at_lr": at_lr, "oracle": oracle,
                            "paper_order_holds_at": holds, "grid_points": len(grid)}
    return rows, verdicts


def start_mse(cfg, env, demos, pi_star):
    """Per family, the untrained starting policies' MSE to pi*, mean over the seeds."""
    mse = {}
    for family in FAMILIES:
        values = []
        for seed in range(cfg.seeds):
            policy, _ = fl.train(family, seed, "start", cfg, env, demos, pi_star)
            pi = fl.policy_matrix(policy, env.n_states)  # (S, A)
            values.append(fl.policy_mse(pi, pi_star, ~env.terminal))
        mse[family] = mean_std(values)[0]
    return mse


def plot_sweep(path, rows, start_mse, cfg):
    """MSE vs lr per method and beta (mean, error bar = sample std), a panel per family; the
    dotted line: the untrained starting policy's MSE."""
    pairs = variants(cfg)
    fig, axes = pyplot().subplots(1, len(FAMILIES), figsize=(11, 4.6))
    for ax, family in zip(axes, FAMILIES):
        for k, (method, beta) in enumerate(pairs):
            group = [r for r in rows
                     if (r["family"], r["method"], r["beta"]) == (family, method, beta)]
            nth_beta = k - [m for m, _ in pairs].index(method)  # its line style
            dodge = 1.04 ** (k - (len(pairs) - 1) / 2)  # shift sideways: bars do not overlap
            ax.errorbar([r["lr"] * dodge for r in group], [r["mse_mean"] for r in group],
                        yerr=[r["mse_std"] for r in group], color=fl.METHOD_COLORS[method],
                        ls=("-", "--", ":", "-.")[nth_beta % 4], marker="o", ms=4, capsize=3,
                        label=label(method, beta))
        ax.axhline(start_mse[family], color="black", ls=":", lw=1, label="start (untrained)")
        ax.axvline(cfg.lr, color="0.6", lw=6, alpha=0.3, zorder=0,
                   label=f"main run's lr ({cfg.lr:g})")
        ax.set(xscale="log", title=f"{family} policy", xlabel="Adam learning rate (every method)",
               ylabel="MSE to pi* after training (lower is better)")
        ax.set_xticks(list(cfg.sweep_lrs), [f"{lr:g}" for lr in cfg.sweep_lrs])
        ax.minorticks_off()
        ax.grid(axis="y", alpha=0.3)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"Frozen Lake '{cfg.map}': sensitivity to lr and beta, {cfg.steps} steps, "
                 f"mean ± sample std over {cfg.seeds} seed(s)")
    fig.tight_layout()
    fl.save(path, fig)


def main(argv=None):
    """The command line; a UserError ends it in one line, "error: ...", with status 1."""
    cfg = parse_flags(SweepConfig, argv, check=config_problem,
                      description=__doc__.split("\n\n")[0].strip())
    t0 = time.time()
    try:
        out = fl.make_out_dir(cfg)
        print("config:", json.dumps(asdict(cfg)))
        torch.set_num_threads(1)  # as frozen_lake.py: tiny tensors
        env, chosen, rejected, V, pi_star, demos = fl.problem(cfg)
        rows, verdicts = sweep(cfg, env, demos, pi_star)
        fl.save(out / "sweep.json", {"config": asdict(cfg), "paper_order": list(PAPER_ORDER),
                                     "rows": rows, "verdicts": verdicts})
        plot_sweep(out / "frozen_lake_sweep.png", rows, start_mse(cfg, env, demos, pi_star), cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
