"""
The paper's comparison at toy scale: every recipe of its Table 2 and IFT's ablations, trained
from the same initial model and batch order seed by seed, tested, and judged on paired
differences.

    python compare.py                     # 14 recipes x 5 seeds + an lr sweep: 37-54 min, 2 cores
    python compare.py --seeds 1           # one seed and the sweep: ~16 min, no spread
    python compare.py --mechanism         # then: do the models recover from their own mistakes?
    python compare.py --help              # every setting (the model flags are ift.py's)

It imports the lesson, ift.py, and trains each recipe with ift.train() exactly as
`python ift.py --loss ...` would. Its defaults are smaller than one recipe's (a 2 x 64 GPT,
1000 steps, compile off), so that 5 seeds fit in under an hour on a laptop; flags given on the
command line win. It writes to --out-dir (default out/compare): compare.md (the tables, the
claims, the sweep, machine, runtime and this command), compare.json (every run, every seed, the
validation curves), compare.png, summary.json (the tables' numbers, small enough to commit), and
each run's config.json, train.log, log.csv and ckpt.pt under runs/; --mechanism adds
mechanism.md, mechanism.json and mechanism.png (see the section "IFT's mechanism" below).
RESULTS.md shows and discusses the numbers.
"""

import contextlib
import dataclasses
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import ift
from bench import IFT_COST, device_name

RECIPE_FIELDS = ("loss", "lr", "init_from")  # each recipe sets its own: no flags for them


@dataclass
class CompareConfig(ift.Config):
    # ift.py's fields, with smaller defaults: ~70 short runs. A 2 x 64 model steps 2.4x faster
    # than 3 x 96 on a 2-core CPU; in pilot runs (SFT, seed 1337, 1000 steps) it reached
    # validation exact match 0.258 at lr 5e-3 (0.160 at 1e-2, 0.110 at 2e-2).
    n_layer: int = ift.arg(2, "transformer blocks")
    n_embd: int = ift.arg(64, "width C of the residual stream")
    max_steps: int = ift.arg(1000, "steps of each single-stage run (each sequential stage: half)")
    warmup_steps: int = ift.arg(30, "linear warm-up steps, then cosine decay")
    log_interval: int = ift.arg(250, "steps between log lines (in each run's train.log)")
    eval_interval: int = ift.arg(250, "steps between validation evaluations")
    compile: str = ift.arg("off", "torch.compile (off: it would compile anew for every short run)",
                           ("auto", "on", "off"))
    out_dir: str = ift.arg("out/compare", "output folder")
    # the comparison's own
    seeds: int = ift.arg(5, "seeds --seed, --seed + 1, ...; a seed gives every recipe the same "
                         "initial model and batch order, so recipes are compared seed by seed")
    lr_sweep: tuple = ift.arg((0.33, 1.0, 3.0), "multipliers of each recipe's DEFAULT_LR tried "
                              "on the first seed; each keeps the best on validation exact match")
    mechanism: bool = ift.arg(False, "instead of training, measure how the checkpoints of the "
                              "comparison in --out-dir recover from their own mistakes")


def compare_problem(cfg):
    """ift.py's checks, plus the comparison's own."""
    problems = [
        (ift.WORLD > 1, "compare.py runs in one process: run it without torchrun"),
        (cfg.seeds < 1, f"--seeds must be >= 1, got {cfg.seeds}"),
        (cfg.max_steps < 2, "--max-steps must be >= 2 (two sequential stages)"),
        (not all(m > 0 and math.isfinite(m) for m in cfg.lr_sweep),
         f"--lr-sweep must be positive numbers, got {' '.join(map(str, cfg.lr_sweep))}"),
    ]
    return next((message for bad, message in problems if bad), None) or ift.config_problem(cfg)


# -----------------------------------------------------------------------------
# The recipes, the runs and the verdicts
#
# One seed trains these models, all from the same initial weights and batch order (S = --max-steps):
#   single stage   SFT, IFT, ORPO and DPO on the whole train split for S steps (the paper's
#                  "+ SFT", "+ DPO", ... rows of its Table 2). The starting model is the
#                  random one, so DPO alone has no language model to rank with, and its reference
#                  is that random model.
#   sequential     stage 1: SFT on half A of the train split for S/2 steps; stage 2, from that
#                  model, on half B for S/2 steps: SFT (the paper's control: restarting a schedule
#                  alone can move results), IFT, ORPO, and DPO with the stage-1 model as reference.
#   ablations      IFT with lam = 0 (relation propagation only), gamma = 0 (temporal residual
#                  connection only), detached relation weights, noisy lam.
#   equal compute  IFT for S / IFT_COST steps: the FLOPs of SFT's S steps.
# Learning rates: on the first seed each recipe with an lr of its own (lr_of = its name) trains
# once per --lr-sweep multiplier of ift.DEFAULT_LR[loss] and keeps the lr with the best validation
# exact match (ties: the lower validation NLL). The test split is never used to choose. Stage 1
# takes SFT's lr; the ablations and the equal-compute run take IFT's. Every later seed reuses the
# choices.
#
# A claim is judged on paired differences d_s = metric(recipe, seed s) - metric(other, seed s):
# reproduced if the 95% t-interval of their mean lies above 0, not reproduced if it lies below,
# within noise if it contains 0.

def compare_recipes(steps):
    """The recipes of one seed, in training order (a recipe's lr and start come before it)."""
    half = steps // 2
    recipes = []

    def add(name, group, loss, data="train", n=steps, start="", lr_of=None, **overrides):
        recipes.append({"name": name, "group": group, "loss": loss, "data": data, "steps": n,
                        "start": start, "lr_of": lr_of or name, "overrides": overrides})
    for loss in ("sft", "ift", "orpo", "dpo"):
        add(loss, "single stage", loss)
    add("sft (stage 1)", "sequential", "sft", "train_a", half, lr_of="sft")
    for loss in ("sft", "ift", "orpo", "dpo"):
        add(f"sft then {loss}", "sequential", loss, "train_b", steps - half, "sft (stage 1)")
    add("ift, lam 0", "ablation", "ift", lr_of="ift", lam=0.0)
    add("ift, gamma 0", "ablation", "ift", lr_of="ift", gamma=0.0)
    add("ift, detached weights", "ablation", "ift", lr_of="ift", detach_weights=True)
    add("ift, noisy lam", "ablation", "ift", lr_of="ift", lam_schedule="noisy")
    add("ift at sft's flops", "equal compute", "ift", n=round(steps / IFT_COST), lr_of="ift")
    return recipes


def step_cost(loss):
    """Rough cost of one step relative to SFT's (pair losses score two answers per row)."""
    return {"sft": 1.0, "ift": IFT_COST, "orpo": 2.0, "dpo": 2.0}[loss]


def compare_run(cfg, recipe, seed, lr, init_from, enc, data, device, out_dir):
    """Train one recipe for one seed and test it. Its folder gets config.json, train.log (what
    a plain run prints), log.csv and ckpt.pt."""
    slug = "".join(c if c.isalnum() else "_" for c in recipe["name"])  # "ift, lam 0" -> ift__lam_0
    run_dir = out_dir / "runs" / f"seed{seed}" / f"{slug}_lr{lr:.2g}"
    plain = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ift.Config)}
    rcfg = ift.Config(**{**plain, "loss": recipe["loss"], "seed": seed, "lr": lr,
                         "init_from": init_from, "max_steps": recipe["steps"],
                         "out_dir": str(run_dir), **recipe["overrides"]})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(rcfg), indent=2))
    t = time.time()
    torch.manual_seed(seed)
    model = ift.build_model(rcfg, enc, device)
    splits = {"train": data[recipe["data"]], "val": data["val"]}
    with (run_dir / "train.log").open("w") as f, contextlib.redirect_stdout(f):
        log, train_seconds = ift.train(rcfg, model, enc, splits, device, run_dir)
    res = ift.evaluate(model, enc, data["test"], device, ift.autocast_for(device),
                       cfg.max_new_tokens)
    evals = [r for r in log if "val_exact_match" in r]
    return {"recipe": recipe["name"], "seed": seed, "lr": lr, "steps": recipe["steps"],
            "ckpt": str(run_dir / "ckpt.pt"), "seconds": time.time() - t,
            "ms_per_step": 1000 * train_seconds / recipe["steps"],
            "val_curve": [[r["step"], r["val_exact_match"]] for r in evals],
            "val_exact_match": evals[-1]["val_exact_match"], "val_nll": evals[-1]["val_nll"],
            "test": {k: res[k] for k in ("exact_match", "exact_match_by_task", "nll",
                                         "preference_accuracy")}}


# two-sided 95% quantiles of Student's t by degrees of freedom; past 9, 1.96 + 2.4 / df is
# within 0.03 of them
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def paired(diffs):
    """Mean, sample std and 95% t-interval half-width of paired differences, and the verdict."""
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return {"diffs": diffs, "mean": mean, "std": None, "ci95": None,
                "verdict": "one seed: no spread (use --seeds 2 or more)"}
    std = statistics.stdev(diffs)
    df = len(diffs) - 1
    half = T95.get(df, 1.96 + 2.4 / df) * std / math.sqrt(len(diffs))
    verdict = ("reproduced" if mean - half > 0 else "not reproduced" if mean + half < 0
               else "within noise")
    return {"diffs": diffs, "mean": mean, "std": std, "ci95": half, "verdict": verdict}


def judge_claims(runs, seeds):
    """The four claims of the issue, each on paired differences over the seeds."""
    def values(recipe, metric):
        return [runs[(recipe, s)]["test"][metric] for s in seeds]

    def mean_of(recipe, metric):
        return statistics.mean(values(recipe, metric))
    claims = [("a", "IFT > SFT on exact match", "ift", "sft", "exact_match"),
              ("a'", "IFT at SFT's FLOPs > SFT on exact match", "ift at sft's flops", "sft",
               "exact_match"),
              ("b", "IFT >= SFT then DPO on exact match", "ift", "sft then dpo", "exact_match"),
              ("c", "DPO best on preference accuracy", "dpo", None, "preference_accuracy"),
              ("d", "SFT then IFT > SFT then SFT on exact match", "sft then ift", "sft then sft",
               "exact_match")]
    names = sorted({name for name, _ in runs})
    out = []
    for key, text, recipe, other, metric in claims:
        if other is None:  # the better DPO recipe against the best recipe without DPO
            dpo = [r for r in names if r.endswith("dpo")]
            recipe = max(dpo, key=lambda r: mean_of(r, metric))
            other = max((r for r in names if r not in dpo), key=lambda r: mean_of(r, metric))
        diffs = [a - b for a, b in zip(values(recipe, metric), values(other, metric))]
        out.append({"claim": key, "text": text, "recipe": recipe, "other": other,
                    "metric": metric, **paired(diffs)})
    return out


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(recipes, runs, seeds, lrs, tasks):
    """One row per recipe: mean and std over the seeds of every metric, and its costs."""
    rows = []
    for r in recipes:
        per_seed = [runs[(r["name"], s)] for s in seeds]
        row = {"recipe": r["name"], "group": r["group"], "lr": lrs[r["lr_of"]],
               "steps": r["steps"]}
        for t in tasks:
            row[t] = mean_std([p["test"]["exact_match_by_task"][t] for p in per_seed])
        for k in ("exact_match", "preference_accuracy", "nll"):
            row[k] = mean_std([p["test"][k] for p in per_seed])
        row["seconds"] = mean_std([p["seconds"] for p in per_seed])
        row["ms_per_step"] = mean_std([p["ms_per_step"] for p in per_seed])
        rows.append(row)
    return rows


def compare(cfg, command):
    """Train and test every recipe over the seeds; write compare.md, compare.json, compare.png."""
    t_start = time.time()
    device, out_dir = ift.start(cfg)
    enc = ift.load_tokenizer(cfg.data)
    data = ift.load_splits(cfg, enc, need_rejected=("train", "val", "test"))
    n = len(data["train"])
    data["train_a"] = ift.Split(data["train"].rows[:n // 2], enc, cfg.block_size, "train half A")
    data["train_b"] = ift.Split(data["train"].rows[n // 2:], enc, cfg.block_size, "train half B")
    recipes = compare_recipes(cfg.max_steps)
    multipliers = list(cfg.lr_sweep)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    swept = [r for r in recipes if r["lr_of"] == r["name"]]
    total = sum(r["steps"] * step_cost(r["loss"]) for r in recipes) * len(seeds) + sum(
        r["steps"] * step_cost(r["loss"]) for r in swept) * (len(multipliers) - 1)
    print(f"compare | {len(recipes)} recipes x {len(seeds)} seeds, plus a {len(multipliers)}-"
          f"point lr sweep of {len(swept)} recipes on seed {seeds[0]} | device {device} | "
          f"{n} train rows | outputs in {out_dir}", flush=True)
    runs, lrs, sweep, done = {}, {}, [], 0.0
    for seed in seeds:
        for r in recipes:
            start_ckpt = runs[(r["start"], seed)]["ckpt"] if r["start"] else ""
            sweeping = r["lr_of"] == r["name"] and r["name"] not in lrs  # on the first seed
            candidates = ([ift.DEFAULT_LR[r["loss"]] * m for m in multipliers] if sweeping
                          else [lrs[r["lr_of"]]])
            results = []
            for lr in candidates:
                try:
                    res = compare_run(cfg, r, seed, lr, start_ckpt, enc, data, device, out_dir)
                except ift.UserError as e:  # a diverged candidate of the sweep loses, nothing more
                    if not sweeping:
                        raise ift.UserError(f"{r['name']}, seed {seed}: {e}") from None
                    res = {"recipe": r["name"], "lr": lr, "diverged": str(e),
                           "val_exact_match": -1.0, "val_nll": math.inf}
                results.append(res)
                done += r["steps"] * step_cost(r["loss"])
                elapsed = time.time() - t_start
                test = (f"test exact {res['test']['exact_match']:.3f} | val exact "
                        f"{res['val_exact_match']:.3f} | {res['seconds']:.0f}s"
                        if "test" in res else "diverged")
                left = ift.fmt_time(elapsed / done * (total - done))
                print(f"[{done / total:4.0%}] seed {seed} | {r['name']:<22} | lr {lr:.1e}"
                      f"{' (sweep)' if sweeping else ''} | {test} | elapsed "
                      f"{ift.fmt_time(elapsed)}, about {left} left", flush=True)
            best = min(results, key=lambda x: (-x["val_exact_match"], x["val_nll"]))
            if sweeping:
                lrs[r["name"]] = best["lr"]
                sweep += [{"recipe": r["name"], "lr": x["lr"], "val_exact_match":
                           x["val_exact_match"], "val_nll": x["val_nll"],
                           "chosen": x is best, "diverged": "diverged" in x} for x in results]
            if "diverged" in best:
                raise ift.UserError(f"{r['name']}: every lr of --lr-sweep diverged; "
                                f"try smaller multipliers")
            runs[(r["name"], seed)] = best
    tasks = sorted({row["task"] for row in data["test"].rows})
    summary = summarize(recipes, runs, seeds, lrs, tasks)
    claims = judge_claims(runs, seeds)
    runtime = time.time() - t_start
    model = ift.GPT(**ift.model_args(cfg, enc))
    info = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
            "device": str(device), "device_name": device_name(device),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "runtime_seconds": runtime,
            "seed_seconds": {s: sum(runs[(r["name"], s)]["seconds"] for r in recipes)
                             for s in seeds},
            "params": sum(p.numel() for p in model.parameters()), "seeds": seeds,
            "tasks": tasks,
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RECIPE_FIELDS}}
    paths = [out_dir / "compare.json", out_dir / "compare.md", out_dir / "compare.png",
             out_dir / "summary.json"]
    paths[0].write_text(json.dumps({**info, "summary": summary, "claims": claims, "sweep": sweep,
                                    "runs": [runs[(r["name"], s)] for s in seeds
                                             for r in recipes]}, indent=2))
    report = compare_report(info, summary, claims, sweep, cfg)
    paths[1].write_text(report)
    plot_compare(summary, runs, recipes, seeds, tasks, paths[2])
    paths[3].write_text(json.dumps(summary_file(info, summary, claims), indent=1))
    print("\n" + report)
    print("wrote " + ", ".join(str(p) for p in paths))
    return summary, claims


def summary_file(info, summary, claims):
    """summary.json: the numbers behind compare.md's tables, small enough to commit (RESULTS.md
    keeps a copy in assets/): per recipe, each metric's mean and std over the seeds; per claim,
    the paired differences, their mean, the 95% half-width and the verdict."""
    metrics = info["tasks"] + ["exact_match", "preference_accuracy", "nll"]
    return {
        "regenerate": info["command"], "date": info["date"],
        "machine": f"{info['device_name']} ({info['device']}, {info['threads']} threads), torch "
                   f"{info['torch']}", "seeds": info["seeds"],
        "recipes": {row["recipe"]: {"lr": row["lr"], "steps": row["steps"],
                                    **{k: {"mean": row[k][0], "std": row[k][1]}
                                       for k in metrics}} for row in summary},
        "claims": [{k: c[k] for k in ("claim", "text", "recipe", "other", "metric", "diffs",
                                      "mean", "ci95", "verdict")} for c in claims]}


def paired_cells(p):
    """The table cells of a paired() result: differences | mean ± std | 95% interval | verdict."""
    diffs = ", ".join(f"{d:+.3f}" for d in p["diffs"])
    spread = f"{p['mean']:+.3f}" + (f" ± {p['std']:.3f}" if p["std"] is not None else "")
    interval = (f"[{p['mean'] - p['ci95']:+.3f}, {p['mean'] + p['ci95']:+.3f}]"
                if p["ci95"] is not None else "-")
    return f"{diffs} | {spread} | {interval} | **{p['verdict']}**"


def pm(pair):
    """'0.123 ± 0.045' from a (mean, std) pair."""
    return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def compare_report(info, summary, claims, sweep, cfg):
    """compare.md: the table, the claims, the sweep, and how and where it was made."""
    tasks, n = info["tasks"], len(info["seeds"])
    seed_times = list(info["seed_seconds"].values())
    lines = [
        "# IFT, SFT, ORPO and DPO at toy scale (`python compare.py`)", "",
        f"Regenerate: `{info['command']}`", "",
        f"Machine: {info['device_name']} ({info['device']}, {info['threads']} threads), torch "
        f"{info['torch']}; {info['date']}. Runtime {ift.fmt_time(info['runtime_seconds'])} in "
        f"all; one seed's {len(summary)} runs took {ift.fmt_time(min(seed_times))} to "
        f"{ift.fmt_time(max(seed_times))} (the lr sweep on seed {info['seeds'][0]} comes on "
        "top).", "",
        f"Settings: GPT {cfg.n_layer}x{cfg.n_embd} ({info['params'] / 1e6:.2f}M parameters), "
        f"batch {cfg.batch_size}, {cfg.max_steps} steps per single-stage run (each sequential "
        f"stage half), warm-up {cfg.warmup_steps} then cosine to {cfg.min_lr_ratio} x lr, "
        f"lam {cfg.lam}, gamma {cfg.gamma}, DPO beta {cfg.dpo_beta}, ORPO beta {cfg.orpo_beta}; "
        f"seeds {', '.join(map(str, info['seeds']))}; lr from the sweep below.", "",
        f"## Test split: exact match per family, preference accuracy, answer NLL "
        f"(mean ± std over {n} seed{'s' * (n > 1)})", "",
        "| recipe | " + " | ".join(tasks) + " | mean exact | pref acc | chosen NLL | steps | lr "
        "| s/run | ms/step |",
        "|---" * (len(tasks) + 8) + "|"]
    for row in summary:
        cells = [pm(row[t]) for t in tasks] + [
            f"**{pm(row['exact_match'])}**", pm(row["preference_accuracy"]),
            pm(row["nll"]), str(row["steps"]), f"{row['lr']:.1e}",
            f"{row['seconds'][0]:.0f}", f"{row['ms_per_step'][0]:.1f}"]
        lines.append(f"| {row['recipe']} | " + " | ".join(cells) + " |")
    lines += [
        "", "Chosen NLL: mean per-token NLL of the chosen (correct) answer. Preference accuracy: "
        "how often the chosen answer is more likely than the rejected one. s/run includes "
        "testing.", "",
        "## The paper's claims, seed by seed", "",
        "Paired difference per seed (recipe minus the other, same initial model and batches); "
        "verdict from the 95% t-interval of the mean difference: above 0 reproduced, below 0 "
        "not reproduced, containing 0 within noise.", "",
        "| claim | recipe - other | per-seed differences | mean ± std | 95% interval | verdict |",
        "|---|---|---|---|---|---|"]
    for c in claims:
        lines.append(f"| ({c['claim']}) {c['text']} | {c['recipe']} - {c['other']} "
                     f"({c['metric']}) | {paired_cells(c)} |")
    lines += ["", f"## Learning-rate sweep (seed {info['seeds'][0]}, validation split, last "
              "step)", "", "| recipe | lr | val exact | val NLL | chosen |",
              "|---|---|---|---|---|"]
    for s in sweep:
        scores = ("diverged | -" if s["diverged"] else
                  f"{s['val_exact_match']:.3f} | {s['val_nll']:.4f}")
        lines.append(f"| {s['recipe']} | {s['lr']:.1e} | {scores} | "
                     f"{'yes' if s['chosen'] else ''} |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Plots

def plot_compare(summary, runs, recipes, seeds, tasks, path):
    """Top: test exact match per family and recipe (error bars: std over seeds). Bottom: mean
    validation exact match against the optimizer step (sequential runs: counted from stage 1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(14, 8))
    ax = fig.add_subplot(2, 1, 1)
    cmap = plt.get_cmap("tab20")
    width = 0.8 / len(summary)
    groups = tasks + ["mean"]
    for i, row in enumerate(summary):
        cells = [row[t] for t in tasks] + [row["exact_match"]]
        ax.bar([g + (i - len(summary) / 2 + 0.5) * width for g in range(len(groups))],
               [c[0] for c in cells], width, yerr=[c[1] for c in cells], capsize=1.5,
               color=cmap(i % 20), label=row["recipe"])
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("test exact match")
    ax.set_ylim(0, 1)
    ax.legend(ncol=5, fontsize=8, loc="upper left")
    ax.set_title(f"python compare.py: mean ± std over {len(seeds)} seeds")
    curves = {}  # recipe -> (steps, mean validation exact match over the seeds)
    for r in recipes:
        per_seed = [runs[(r["name"], s)]["val_curve"] for s in seeds]
        steps = [step for step, _ in per_seed[0]]
        means = [statistics.mean(c[j][1] for c in per_seed) for j in range(len(steps))]
        if r["start"]:  # stage 2 goes on from where its stage 1 ended
            before_steps, before = curves[r["start"]]
            steps = [before_steps[-1]] + [before_steps[-1] + 1 + step for step in steps]
            means = [before[-1]] + means
        curves[r["name"]] = steps, means
    for k, groups_here in enumerate((("single stage", "ablation", "equal compute"),
                                     ("sequential",))):
        ax = fig.add_subplot(2, 2, 3 + k)
        for i, r in enumerate(recipes):
            if r["group"] in groups_here:
                ax.plot(*curves[r["name"]], "o-", color=cmap(i % 20), label=r["name"],
                        markersize=3)
        ax.set_xlabel("optimizer step" + (" (stage 2 continues stage 1)" if k else ""))
        ax.set_ylabel("validation exact match (mean)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -----------------------------------------------------------------------------
# IFT's mechanism: does a model recover from its own mistakes? (python compare.py --mechanism)
#
# The paper's thesis (sec. 3): SFT scores token t only after a ground-truth prefix, so it never
# learns what to do after a mistake of its own; IFT's temporal residual connection trains the
# model on its own predictions. We measure it on the checkpoints of a finished comparison, on the
# families whose correct continuation is fixed by the prompt whatever came before it in the
# answer (add: the digits of the sum; reverse: the letters). For every test row of them and every
# answer position m but the last:
#   clean      greedy accuracy of each later answer token t > m after the ground-truth prefix;
#   corrupted  the same after the ground-truth prefix with token m replaced by the model's own
#              likeliest WRONG token there (argmax of its logits without the right token).
# Both are scored against the ground truth, by distance d = t - m after the mistake. The gap
# clean - corrupted is what one own mistake costs the tokens after it: the smaller, the better
# the model recovers. Each recipe's gap is paired with SFT's seed by seed (same initial model
# and batches) as sft gap - recipe gap, so "reproduced" means: recovers better than SFT.

MECHANISM_TASKS = ("add", "reverse")
MECHANISM_RECIPES = ("sft", "ift", "ift, lam 0", "ift, gamma 0", "ift, detached weights",
                     "ift, noisy lam")
MAX_DISTANCE = 4  # distances d = 1 .. 4 after the mistake (an add answer: 3-4 digits + eot)


@torch.no_grad()
def recovery_counts(model, seqs, pad_id, device):
    """Counts (MAX_DISTANCE, 3): for d = 1.., the later answer tokens scored, right after a clean
    prefix, right after a prefix holding the model's likeliest mistake at distance d before."""
    x, y, mask = (t.to(device) for t in ift.collate(seqs, pad_id))        # (B, T) each
    logits = model(x).float()                                              # (B, T, V)
    clean = (logits.argmax(-1) == y) & mask                                # (B, T)
    wrong = logits.scatter(-1, y[..., None], -math.inf).argmax(-1)         # (B, T)
    counts = torch.zeros(MAX_DISTANCE, 3, dtype=torch.long)
    first = torch.tensor([p - 1 for _, p in seqs], device=device)          # (B,) 1st answer target
    n_answer = mask.sum(-1)                                                # (B,)
    rows = torch.arange(len(seqs), device=device)
    for m in range(int(n_answer.max()) - 1):
        hit = n_answer > m + 1                                             # (B,) rows with a t > m
        j = (first + m).clamp(max=x.shape[1] - 2)                          # (B,) target index
        x_bad = x.clone()
        x_bad[rows, j + 1] = torch.where(hit, wrong[rows, j], x[rows, j + 1])  # y[j] is x[j + 1]
        corrupted = (model(x_bad).argmax(-1) == y) & mask                  # (B, T)
        for d in range(1, MAX_DISTANCE + 1):
            t = j + d
            ok = hit & (m + d < n_answer) & (t < x.shape[1])               # (B,) token t exists
            t = t.clamp(max=x.shape[1] - 1)
            counts[d - 1] += torch.stack([ok.sum(), (clean[rows, t] & ok).sum(),
                                          (corrupted[rows, t] & ok).sum()]).cpu()
    return counts


def mechanism(cfg):
    """Recovery from own mistakes of every MECHANISM_RECIPES checkpoint of the comparison in
    --out-dir; writes mechanism.md, mechanism.json and mechanism.png there."""
    path = Path(cfg.out_dir) / "compare.json"
    if not path.is_file():
        raise ift.UserError(f"{path}: no comparison there; run python compare.py first (with the "
                            f"same --out-dir)")
    saved = json.loads(path.read_text())
    run_cfg = dataclasses.replace(cfg, **{k: saved["config"][k] for k in (
        "data", "limit_rows", "block_size", "n_layer", "n_head", "n_embd")})
    device, out_dir = ift.start(run_cfg)
    enc = ift.load_tokenizer(run_cfg.data)
    test_path = Path(run_cfg.data) / "test.jsonl"
    test = ift.Split(ift.load_rows(test_path, limit=run_cfg.limit_rows), enc,
                     run_cfg.block_size, str(test_path))
    seqs = [s for s, r in zip(test.chosen, test.rows) if r["task"] in MECHANISM_TASKS]
    if not seqs:
        raise ift.UserError(f"{test_path}: no rows of {', '.join(MECHANISM_TASKS)}")
    runs = {(r["recipe"], r["seed"]): r for r in saved["runs"]}
    gaps = {}  # recipe -> per seed: [clean, corrupted, gap] per distance, and pooled (last row)
    scored = 0  # answer tokens scored per model (the same for every model)
    for name in MECHANISM_RECIPES:
        for seed in saved["seeds"]:
            init = dataclasses.replace(run_cfg, init_from=runs[(name, seed)]["ckpt"])
            model = ift.build_model(init, enc, device).eval()  # checked against the config
            c = recovery_counts(model, seqs, enc.eot_token, device).double()
            c = torch.cat([c, c.sum(0, keepdim=True)])                     # + all distances
            scored = int(c[-1, 0])
            acc = c[:, 1:] / c[:, :1].clamp(min=1)                         # (D + 1, 2)
            gaps.setdefault(name, []).append(torch.cat([acc, acc[:, :1] - acc[:, 1:]], 1))
    table = {name: torch.stack(per_seed) for name, per_seed in gaps.items()}  # (S, D + 1, 3)
    verdicts = [{"recipe": name, **paired(
        (table["sft"][:, -1, 2] - table[name][:, -1, 2]).tolist())}
        for name in MECHANISM_RECIPES if name != "sft"]
    info = {"command": shlex.join(["python", "compare.py", "--mechanism", "--out-dir",
                                   cfg.out_dir]),
            "date": time.strftime("%Y-%m-%d %H:%M"), "device_name": device_name(device),
            "comparison": saved["command"].strip(), "seeds": saved["seeds"],
            "tasks": MECHANISM_TASKS,
            "rows": len(seqs), "tokens_scored": scored}
    paths = [out_dir / "mechanism.json", out_dir / "mechanism.md", out_dir / "mechanism.png"]
    paths[0].write_text(json.dumps({**info, "verdicts": verdicts, "recipes": {
        name: {"clean": t[:, :, 0].tolist(), "corrupted": t[:, :, 1].tolist(),
               "gap": t[:, :, 2].tolist()} for name, t in table.items()}}, indent=2))
    report = mechanism_report(info, table, verdicts)
    paths[1].write_text(report)
    plot_mechanism(table, info, paths[2])
    print(report)
    print("wrote " + ", ".join(str(p) for p in paths))


def mechanism_report(info, table, verdicts):
    """mechanism.md: accuracies and gaps by distance (mean ± std over seeds), then the verdicts."""
    def cell(t, d, k):
        return pm((t[:, d, k].mean().item(), t[:, d, k].std().item() if len(t) > 1 else 0.0))
    dists = [f"d = {d}" for d in range(1, MAX_DISTANCE + 1)] + ["all d"]
    lines = [
        "# Recovery from one's own mistakes (`" + info["command"] + "`)", "",
        f"Checkpoints of `{info['comparison']}`, seeds {', '.join(map(str, info['seeds']))}; "
        f"test rows of {' and '.join(info['tasks'])} ({info['rows']} rows, "
        f"{info['tokens_scored']} scored tokens per model); {info['device_name']}, "
        f"{info['date']}.", "",
        "Gap = clean accuracy - accuracy after the model's likeliest mistake d tokens earlier "
        "(mean ± std over seeds; smaller = better recovery):", "",
        "| recipe | clean, all d | " + " | ".join(f"gap, {d}" for d in dists) + " |",
        "|---" * (len(dists) + 2) + "|"]
    for name, t in table.items():
        lines.append(f"| {name} | {cell(t, -1, 0)} | " + " | ".join(
            cell(t, d, 2) for d in range(len(dists))) + " |")
    lines += ["", "Paired by seed: SFT's gap - the recipe's gap (all d); above 0 = recovers "
              "better than SFT.", "",
              "| recipe | per-seed differences | mean ± std | 95% interval | verdict |",
              "|---|---|---|---|---|"]
    for v in verdicts:
        lines.append(f"| {v['recipe']} | {paired_cells(v)} |")
    return "\n".join(lines) + "\n"


def plot_mechanism(table, info, path):
    """Accuracy after one's own mistake, and the gap to the clean prefix, against the distance
    after the mistake: mean ± std over seeds, one line per recipe."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    d = list(range(1, MAX_DISTANCE + 1))
    for name, t in table.items():
        for ax, k in zip(axes, (1, 2)):
            values = t[:, :MAX_DISTANCE, k]                                 # (S, D)
            spread = values.std(0) if len(values) > 1 else torch.zeros(MAX_DISTANCE)
            ax.errorbar(d, values.mean(0), yerr=spread, marker="o", capsize=2, label=name)
    axes[0].set_ylabel("accuracy after the model's own mistake")
    axes[1].set_ylabel("gap: clean - after the mistake")
    for ax in axes:
        ax.set_xlabel("distance after the mistake (tokens)")
        ax.set_xticks(d)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{info['command']}: {' and '.join(info['tasks'])}, "
                 f"mean ± std over {len(info['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -----------------------------------------------------------------------------
# main

def parse_config(argv):
    """The CompareConfig of `python compare.py ...`, checked; no flags for RECIPE_FIELDS."""
    return ift.parse_flags(CompareConfig, argv, check=compare_problem, skip=RECIPE_FIELDS,
                           description=__doc__.split("\n\n")[0].strip())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(argv)
    print("config: " + json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                   if k not in RECIPE_FIELDS}), flush=True)
    try:
        if cfg.mechanism:
            mechanism(cfg)
        else:
            compare(cfg, shlex.join(["python", "compare.py", *argv]))
    except ift.UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
