"""
compare.py's reports: the markdown and the pictures of its records. Nothing here trains, tunes
or judges; every number comes from compare.py (its paired() results, its tuning table, its test
scores), and these functions only lay them out.

    compare.md      comparison(): how it was made, the test table, the bases, the claims, the lrs;
                    with --lrs-from, beside(): the two runs' claims side by side
    ablations.md    ablations()          mechanism.md    mechanism()
    claims.png      plot_claims()        families.png    plot_families()
    mechanism.png   plot_mechanism()
"""

import json

import plumbing

# -----------------------------------------------------------------------------
# Cells and tables


def md_table(header, rows):
    """A markdown table: the header, its delimiter, one line per row of cells."""
    return (["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def at_a_time(workers, threads):
    """'2 runs at a time, 1 thread each'"""
    return (f"{workers} run{'s' * (workers > 1)} at a time, {threads} "
            f"thread{'s' * (threads > 1)} each")


def machine(info):
    """'AMD EPYC (cpu, 2 runs at a time, 1 thread each), torch 2.13.0+cpu'"""
    return (f"{info['device_name']} ({info['device']}, "
            f"{at_a_time(info['workers'], info['threads'])}), torch {info['torch']}")


def pm(pair, digits=3):
    """'0.123 ± 0.045' from a (mean, std) pair."""
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def places(claim):
    """The decimals of a claim's numbers: 2 for nats of margin, 3 for exact match."""
    return 2 if claim["metric"] == "margin" else 3


def bounds(p, digits=3):
    """'[-0.024, +0.005]': the 95% interval of a paired() result ('-' without spread)."""
    if p["ci95"] is None:
        return "-"
    return f"[{p['mean'] - p['ci95']:+.{digits}f}, {p['mean'] + p['ci95']:+.{digits}f}]"


PAIRED_HEADER = ("per-seed differences", "mean ± std", "95% interval (± half-width)", "verdict",
                 "up / down")


def paired_cells(p, digits=3):
    """The cells of a paired() result under PAIRED_HEADER, joined by ' | '."""
    diffs = ", ".join(f"{d:+.{digits}f}" for d in p["diffs"])
    std = "" if p["std"] is None else f" ± {p['std']:.{digits}f}"
    half = "" if p["ci95"] is None else f" (±{p['ci95']:.{digits}f})"
    return (f"{diffs} | {p['mean']:+.{digits}f}{std} | {bounds(p, digits)}{half} | "
            f"**{p['verdict']}** | {p['up']} / {p['down']}")


def verdicts_table(first, verdicts):
    """A markdown table of paired() results, one per recipe."""
    return md_table([first, *PAIRED_HEADER], [[v["recipe"], paired_cells(v)] for v in verdicts])


def moved_cell(name, p, digits=3):
    """'sft +0.120 ± 0.020': a side's change from its start; bold when it did not move or
    moved backwards, since a claim won against such a side says little."""
    change = f"{name} {p['mean']:+.{digits}f}"
    if p["ci95"] is None:
        return change + " (one seed)"
    change += f" ± {p['ci95']:.{digits}f}"
    if p["verdict"] == "reproduced":
        return change
    return f"**{change}: " + ("worse than its start**" if p["verdict"] == "reversed"
                              else "did not move**")


def write(out_dir, stem, record, lines):
    """<stem>.json and <stem>.md (printed too) in out_dir; their paths."""
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(record, indent=2))
    paths[1].write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return paths


# -----------------------------------------------------------------------------
# compare.md

def comparison(info, summary, claims, n_claims, table, bases, cfg):
    """compare.md's lines: how it was made, the test table, the bases (their test scores, one
    per judged seed), the claims (n_claims of them, then (b)'s control), the lrs."""
    n, tasks, seeds = len(info["seeds"]), info["tasks"], ", ".join(map(str, info["seeds"]))
    lines = [
        "# IFT, SFT, ORPO and DPO at toy scale (`python compare.py`)", "",
        f"Regenerate: `{info['command']}`", "",
        f"Machine: {machine(info)}; {info['date']}. Runtime "
        f"{plumbing.fmt_time(info['runtime_seconds'])} in all; the runs trained now took "
        f"{plumbing.fmt_time(info['busy_seconds'])} summed over the workers.", "",
        f"Settings: GPT {cfg.n_layer}x{cfg.n_embd} ({info['params'] / 1e6:.2f}M parameters), "
        f"batch {cfg.batch_size}; each seed's base model: {cfg.base_steps} steps of language "
        f"modelling on the pretraining pool; from it {cfg.max_steps} steps per single-stage run "
        f"(each sequential stage half), warm-up {cfg.warmup_steps} then cosine to "
        f"{cfg.min_lr_ratio} x lr, lam {cfg.lam}, gamma {cfg.gamma}, DPO beta {cfg.dpo_beta}, "
        f"ORPO beta {cfg.orpo_beta}; judged seeds {seeds}, "
        + (f"lrs from {info['lrs_from']} (not tuned here)." if info["lrs_from"] else
           f"tuning seeds {', '.join(map(str, info['tuning_seeds']))} (never judged); lrs from "
           f"the tuning below."), "",
        f"## Test split: exact match per family, preference margin and accuracy, answer NLL "
        f"(mean ± std over {n} judged seed{'s' * (n > 1)}, each its own base)", ""]
    lines += md_table(["recipe", *tasks, "mean exact", "pref margin", "pref acc", "chosen NLL",
                       "steps", "lr", "s/run", "ms/step"], [
        [row["recipe"], *(pm(row[t]) for t in tasks), f"**{pm(row['exact_match'])}**",
         pm(row["margin"], 2), pm(row["preference_accuracy"]), pm(row["nll"]), row["steps"],
         f"{row['lr']:.1e}", f"{row['seconds'][0]:.0f}", f"{row['ms_per_step'][0]:.1f}"]
        for row in summary])
    lines += [
        "", "Pref margin: mean over rows of log p(chosen) - log p(rejected), summed over answer "
        "tokens (nats). Pref acc: how often the chosen answer is the likelier. Chosen NLL: mean "
        "per-token NLL of the chosen answer. s/run includes testing (a reused base: when it was "
        "trained).", "", "## The base models, one per judged seed (test split)", ""]
    lines += md_table(["seed", *tasks, "mean exact", "pref margin", "pref acc"], [
        [s, *(f"{t['exact_match_by_task'][k]:.3f}" for k in tasks), f"**{t['exact_match']:.3f}**",
         f"{t['margin']:.2f}", f"{t['preference_accuracy']:.3f}"]
        for s, t in zip(info["seeds"], bases)])
    a, c = (next(c for c in claims if c["claim"] == k) for k in ("a", "c"))
    lines += [
        "", "## The paper's claims, paired seed by seed", "",
        f"Recipe minus the other, per judged seed; from the 95% t-interval of the mean over {n} "
        f"seeds: **reproduced** above 0, **reversed** below 0, **equivalent** inside ±delta "
        f"(delta {a['delta']} exact match, {c['delta']} nats of margin), "
        f"**inconclusive** otherwise (compare.py, \"The verdicts\").", ""]
    lines += md_table(["claim", "recipe - other (metric)", *PAIRED_HEADER,
                       "abs(mean) / SE (t quantile)", "seeds for ±delta",
                       "each side's change from its start (± 95%)"], [
        [f"({c['claim']}) {c['text']}", f"{c['recipe']} - {c['other']} ({c['metric']})",
         paired_cells(c, places(c)), f"{c['t']:.1f} ({c['t95']:.2f})" if c["t95"] else "-",
         c["seeds_needed"] or "-",
         "; ".join(moved_cell(name, p, places(c)) for name, p in c["moved"].items())]
        for c in claims])
    lines += [
        "", f"(b)'s control, SFT - SFT then DPO, is the last row: IFT's advantage over SFT then "
        f"DPO minus SFT's own is IFT - SFT, claim (a), whose verdict ({a['verdict']}) says "
        f"whether that advantage exceeds what SFT's extra steps alone give.",
        "", f"(c) on preference accuracy, the same runs: {paired_cells(c['preference_accuracy'])} "
        f"(up / down).", "",
        f"{n_claims} claims are tested at 95% each: with no true difference anywhere, the chance "
        f"that at least one comes out reproduced or reversed by luck is up to "
        f"{1 - 0.95 ** n_claims:.0%} (independent claims).", ""]
    return lines + lrs(table, info)


def lrs(table, info):
    """The tuning table (per recipe and lr, the tuning seeds' mean validation scores), or the
    lrs read from --lrs-from; an optimum still at the grid's edge is flagged."""
    def chosen(t, metric, lr):
        edge = " (**still at the grid's edge**)" if metric in t["at_edge"] else ""
        return f"{lr:.1e}{edge}" if info["lrs_from"] else metric.replace("_", " ") + edge
    if info["lrs_from"]:
        return [f"## Learning rates from {info['lrs_from']} (not tuned here)", ""] + md_table(
            ["recipe", "lr for exact match", "lr for the margin"],
            [[name, chosen(t, "exact_match", t["lr"]), chosen(t, "margin", t["lr_margin"])]
             for name, t in table.items()])
    rows = [[name, f"{lr:.1e}", "diverged | - | -" if s is None else
             f"{s[0]:.3f} | {s[1]:.2f} | {s[2]:.4f}",
             ", ".join(chosen(t, m, lr) for m, key in (("exact_match", "lr"),
                                                     ("margin", "lr_margin")) if t[key] == lr)]
            for name, t in table.items() for lr, s in sorted(t["scores"].items())]
    flagged = [f"{name} ({', '.join(m.replace('_', ' ') for m in t['at_edge'])})"
               for name, t in table.items() if t["at_edge"]]
    return ([f"## Tuning (seeds {', '.join(map(str, info['tuning_seeds']))}, validation split, "
             f"mean over the tuning seeds, last step)", ""]
            + md_table(["recipe", "lr", "val exact", "val margin", "val NLL", "chosen for"], rows)
            + ["", "Optimum still at a grid edge after the extensions: "
               + (", ".join(flagged) if flagged else "none") + "."])


def side_by_side(first, second, pooled):
    """Two summary.json files' claims side by side, claim by claim: each run's mean and 95%
    interval, verdict and abs(mean) / SE, whether the verdict repeated, and pooled[claim], both
    runs' seeds in one paired() result (after the fact). Markdown lines."""
    def label(s):
        return f"{len(s['seeds'])} seeds, {s['seeds'][0]}-{s['seeds'][-1]}"

    def cells(p, digits, verdict=True):
        mean = f"{p['mean']:+.{digits}f}, {bounds(p, digits)}"
        t = "-" if p.get("t") is None else f"{p['t']:.1f}"
        return [mean, f"**{p['verdict']}**", t] if verdict else [mean, p["verdict"]]
    later = {c["claim"]: c for c in second["claims"]}
    rows = [[f"({c['claim']}) {c['recipe']} - {c['other']}", *cells(c, places(c)),
             *cells(later[c["claim"]], places(c)),
             "yes" if c["verdict"] == later[c["claim"]]["verdict"] else "**no**",
             *cells(pooled[c["claim"]], places(c), verdict=False)]
            for c in first["claims"]]
    n = len(first["seeds"]) + len(second["seeds"])
    return md_table(["claim", f"first run ({label(first)}): mean, 95% interval", "verdict",
                     "abs(mean) / SE", f"replication ({label(second)}): mean, 95% interval",
                     "verdict", "abs(mean) / SE", "same verdict",
                     f"pooled after the fact ({n} seeds): mean, 95% interval", "verdict"], rows)


def beside(earlier, summary, pooled):
    """compare.md's last section with --lrs-from: the run the lrs came from, side by side."""
    return ["", "## Beside the run the lrs came from", "",
            f"`{earlier['regenerate']}` ({earlier.get('machine', '?')}, "
            f"{earlier.get('date', '?')}) and this run, claim by claim; this run's verdicts are "
            f"the replication's. Pooled: both runs' seeds in one interval, after the fact.", "",
            *side_by_side(earlier, summary, pooled)]


# -----------------------------------------------------------------------------
# ablations.md and mechanism.md

def ablations(info, verdicts, delta):
    """ablations.md's lines: each ablation minus IFT, paired by seed."""
    return [f"# IFT's ablations (`{info['command']}`)", "",
            f"On the judged seeds {', '.join(map(str, info['seeds']))} of `{info['comparison']}`, "
            f"each from its seed's base at IFT's lr {info['lr']:.1e}; {info['device_name']}, "
            f"{info['date']}, {plumbing.fmt_time(info['runtime_seconds'])}.", "",
            f"Paired by seed on test exact match: the ablation minus IFT (delta {delta}).", "",
            *verdicts_table("ablation - ift", verdicts)]


def mechanism(info, table, verdicts):
    """mechanism.md's lines: per recipe, the clean accuracy and the gap at each distance
    (table: recipe -> (seeds, distances + 1, [clean, corrupted, gap]), the last row all
    distances), and SFT's gap minus each recipe's, paired by seed."""
    def cell(t, d, k):
        return pm(plumbing.mean_std(t[:, d, k].tolist()))
    dists = [f"d = {d}" for d in range(1, info["max_distance"] + 1)] + ["all d"]
    return [
        f"# Recovery from one's own mistakes (`{info['command']}`)", "",
        f"Checkpoints of `{info['comparison']}`, seeds {', '.join(map(str, info['seeds']))}; "
        f"test rows of {' and '.join(info['tasks'])} ({info['rows']} rows, "
        f"{info['tokens_scored']} scored tokens per model); {info['device_name']}, "
        f"{info['date']}.", "",
        "Gap = clean accuracy - accuracy after the model's likeliest mistake d tokens earlier "
        "(mean ± std over seeds; smaller = better recovery):", "",
        *md_table(["recipe", "clean, all d", *(f"gap, {d}" for d in dists)], [
            [name, cell(t, -1, 0), *(cell(t, d, 2) for d in range(len(dists)))]
            for name, t in table.items()]),
        "", "Paired by seed: SFT's gap - the recipe's gap (all d); above 0 = recovers better "
        "than SFT.", "", *verdicts_table("recipe", verdicts)]


# -----------------------------------------------------------------------------
# Pictures

COLORS = {"reproduced": "tab:green", "reversed": "tab:red", "equivalent": "tab:blue",
          "inconclusive": "tab:gray"}


def plot_claims(claims, info, path, earlier=None):
    """Each claim's paired difference: its mean over the seeds and 95% t-interval, the +-delta
    band shaded, the verdict written beside it; exact-match claims above, the margin claim below
    (its own unit). earlier: another run's claims (summary.json), a hollow marker above each."""
    plt = plumbing.pyplot()
    groups = [[c for c in claims if c["metric"] == m] for m in ("exact_match", "margin")]
    before = {c["claim"]: c for c in earlier or []}
    fig, axes = plt.subplots(2, 1, figsize=(9, (0.9 if before else 0.6) * len(claims) + 2.2),
                             gridspec_kw={"height_ratios": [len(g) + 0.5 for g in groups]})
    for ax, group in zip(axes, groups):
        delta = group[0]["delta"]
        ax.axvspan(-delta, delta, color="tab:blue", alpha=0.12, lw=0)
        ax.axvline(0, color="black", lw=0.8)
        shown = group + [before[c["claim"]] for c in group if c["claim"] in before]
        for y, c in enumerate(reversed(group)):
            marks = [(c, y - 0.15 * bool(before), "o", "")]
            if c["claim"] in before:
                marks.append((before[c["claim"]], y + 0.2, "s", "earlier run: "))
            for p, at, marker, word in marks:
                half = p["ci95"] or 0.0
                color = COLORS.get(p["verdict"], "black")
                ax.errorbar(p["mean"], at, xerr=half, fmt=marker, capsize=4, color=color,
                            mfc="white" if word else color)
                ax.annotate(f"{word}{p['verdict']} ({p['up']} up, {p['down']} down)",
                            (p["mean"] + half, at), xytext=(8, 0), textcoords="offset points",
                            va="center", fontsize=7 if word else 8)
        ax.set_yticks(range(len(group)), [f"({c['claim']}) {c['recipe']} - {c['other']}"
                                          for c in reversed(group)], fontsize=8)
        lo = min([c["mean"] - (c["ci95"] or 0) for c in shown] + [-delta])
        hi = max([c["mean"] + (c["ci95"] or 0) for c in shown] + [delta])
        ax.set_xlim(lo - 0.05 * (hi - lo), hi + 0.45 * (hi - lo))
        ax.set_ylim(-0.6, len(group) - 0.4)
        unit = "exact match" if group[0]["metric"] == "exact_match" else "preference margin (nats)"
        ax.set_xlabel(f"paired test difference in {unit}: mean, 95% t-interval; shaded ±{delta}")
    axes[0].set_title(f"The paper's claims over {len(info['seeds'])} judged seeds, each its own "
                      f"base model" + ("; hollow: the run its lrs came from" if before else ""),
                      fontsize=10)
    fig.text(0.01, 0.01, info["command"], fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_families(summary, info, path):
    """Test exact match per recipe (rows) and task family (columns), mean over the seeds, as a
    heat map with the mean and std written in each cell."""
    plt = plumbing.pyplot()
    columns = info["tasks"] + ["exact_match"]
    means = [[row[k][0] for k in columns] for row in summary]                # (recipes, tasks)
    fig, ax = plt.subplots(figsize=(1.25 * len(columns) + 2.4, 0.34 * len(summary) + 1.2))
    ax.imshow(means, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(summary):
        for j, k in enumerate(columns):
            mean, std = row[k]
            ax.text(j, i, f"{mean:.3f}" + (f" ± {std:.3f}" if std else ""), ha="center",
                    va="center", fontsize=8, color="white" if mean > 0.6 else "black")
    ax.set_xticks(range(len(columns)), info["tasks"] + ["mean"])
    ax.set_yticks(range(len(summary)), [row["recipe"] for row in summary], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_title(f"test exact match, mean ± std over {len(info['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_mechanism(table, info, path):
    """Accuracy after one's own mistake, and the gap to the clean prefix, against the distance
    after the mistake: mean ± std over seeds, one line per recipe (table: as for mechanism())."""
    plt = plumbing.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    d = list(range(1, info["max_distance"] + 1))
    for name, t in table.items():
        for ax, k in zip(axes, (1, 2)):
            values = t[:, :len(d), k]                                       # (S, D)
            spread = values.std(0) if len(values) > 1 else 0 * values[0]
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
