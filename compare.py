"""
The paper's comparison at toy scale: every recipe of its Table 2 fine-tuned from base models,
tuned on seeds of its own, then judged on other seeds by paired differences, with the verdict
rule fixed before the run.

    python compare.py                  # the confirmatory run: 6 judged seeds (RESULTS.md, sec. 1)
    python compare.py --seeds 2        # a quicker look: the same protocol, wider intervals
    python compare.py --ablations      # then: IFT's ablations on the same bases (sec. 2)
    python compare.py --mechanism      # then: do the models recover from their own mistakes?
    python compare.py --help           # every setting (the model flags are ift.py's)
    python compare.py --seed 1343 --seeds 13 --lrs-from assets/compare_summary.json \\
        --out-dir out/replication      # the replication (protocol 5 below)

Each recipe trains with ift.train() exactly as `python ift.py --loss ... --init-from <base>`
would, with smaller defaults (a 2 x 64 GPT, 1000 fine-tuning steps, compile off; flags win),
several runs at a time on a CPU (--workers), in phases (see "The phases").

The protocol (fixed before the test split is read; each rule is applied where the comment says):
 1. Seeds. Judged seeds --seed, --seed + 1, ... (--seeds of them); tuning seeds --seed + 1000,
    --seed + 1001, ... (--tuning-seeds of them). Every seed, judged or tuning, trains its OWN
    base model (initial weights and batch order from that seed; same settings and pool), and
    all of that seed's recipes fine-tune from it with that seed's batch order ("Stage 0").
 2. Tuning. Each recipe with an lr of its own trains on every tuning seed at each multiplier of
    --lr-grid times ift.DEFAULT_LR[loss] (the same number of points for every recipe). Its lr for
    exact match is the one with the best validation exact match averaged over the tuning seeds;
    its lr for claim (c) the best validation preference margin (ties: lower validation NLL, then
    lower lr). A best lr at an edge of the grid adds one more multiplier step past that edge, at
    most --max-extensions (2) times; an optimum still at an edge is flagged in the report.
    Tuning seeds are never judged and never read the test split ("Tuning").
 3. Judging. Every judged seed trains every recipe at its chosen lr; a claim is a paired
    difference over the judged seeds on the test split, and its verdict comes from the 95%
    t-interval of the mean difference ("The verdicts"): reproduced (above 0), reversed (below
    0), equivalent (inside +-DELTA, DELTA = 0.02 exact match, 1 nat of margin), else
    inconclusive. Five claims are tested; the report says what that does to false verdicts.
 4. Controls. (b) IFT >= SFT then DPO is shown beside SFT - SFT then DPO; (c) is judged on the
    mean preference margin, with preference accuracy beside it; each side of a claim is paired
    with the model it started from, to say whether it moved at all.
 5. The replication, written down before it runs (RESULTS.md, section 1, shows the arithmetic):
    fresh judged seeds 1343-1355 (`--seed 1343 --seeds 13`), sharing nothing with the first run
    (judged 1337-1342, tuning 2337-2338), each with its own base; the same recipes, verdict rule,
    DELTA and test split; no tuning: every recipe's two lrs, their edge flags and claim (c)'s
    recipes come from the first run's summary (--lrs-from). Its own verdicts are the headline,
    set beside the first run's claim by claim, with both runs' seeds pooled after the fact. Why
    13: as many seeds as the first run's measured cost per seed fits in 2 hours less 10% on this
    project's 2-core CPU (RESULTS.md, section 1, gives the times and the arithmetic).

It writes to --out-dir (default out/compare): compare.md (the report, this command among it),
compare.json (every run), summary.json (the numbers behind the tables, small enough to commit),
claims.png (each claim's interval and verdict; with --lrs-from, the earlier run's beside it),
families.png (test exact match per recipe and family), and each base and run's config.json,
train.log, log.csv and ckpt.pt under base/ and runs/. --ablations adds ablations.md and .json;
--mechanism mechanism.md, .json and .png. report.py lays out the reports and figures.
"""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import ift
import plumbing
import report
from plumbing import arg

RECIPE_FIELDS = ("loss", "lr", "init_from")  # each recipe sets its own: no flags for them
TUNING_OFFSET = 1000  # tuning seeds are --seed + 1000, ...: never a judged seed (--seeds <= 1000)


@dataclass
class CompareConfig(ift.Config):
    # ift.py's fields, with smaller defaults (RESULTS.md, section 1, says why these sizes)
    n_layer: int = arg(2, "transformer blocks")
    n_embd: int = arg(64, "width C of the residual stream")
    max_steps: int = arg(1000, "steps of each single-stage run (each sequential stage: half)")
    warmup_steps: int = arg(30, "linear warm-up steps, then cosine decay")
    log_interval: int = arg(250, "steps between log lines (in each run's train.log)")
    eval_interval: int = arg(1000, "steps between validation evaluations")
    compile: str = arg("off", "torch.compile (off: it would compile anew for every short run)",
                       ("auto", "on", "off"))
    out_dir: str = arg("out/compare", "output folder")
    # the comparison's own
    base_steps: int = arg(6000, "steps of each seed's base model on <data>/pretrain.jsonl (kept "
                          "in <out-dir>/base while its settings and data files are unchanged)")
    seeds: int = arg(6, "judged seeds --seed, --seed + 1, ...: each its own base; the claims are "
                     "paired over them")
    tuning_seeds: int = arg(2, "tuning seeds --seed + 1000, ...: each its own base; they choose "
                            "the lrs and are never judged")
    lr_grid: tuple = arg((0.1, 0.33, 1.0), "multipliers of each recipe's DEFAULT_LR tried on the "
                         "tuning seeds")
    max_extensions: int = arg(2, "times a grid may add a step past the edge where its best lr is")
    lrs_from: str = arg("", "an earlier comparison's summary.json, same settings: take its lrs, "
                        "tune nothing, set its claims beside (the replication)")
    workers: int = arg(0, "runs trained at once, a process each (0: one per core up to 8 on a "
                       "CPU; 1 on a GPU)")
    ablations: bool = arg(False, "instead, train IFT's ablations on the judged seeds' bases of "
                          "the comparison in --out-dir")
    mechanism: bool = arg(False, "instead, measure how the checkpoints of the comparison in "
                          "--out-dir recover from their own mistakes")

RANGES = (("seeds", 1, TUNING_OFFSET, ""), ("tuning_seeds", 1, 100, ""),
          ("workers", 0, 64, " (0: automatic)"), ("max_extensions", 0, 5, ""))


def compare_problem(cfg):
    """ift.py's checks, plus the comparison's own: the first problem as one line, or None."""
    grid, summary = cfg.lr_grid, Path(cfg.out_dir, "summary.json").resolve()
    problems = [(ift.WORLD > 1, "compare.py runs in one process: run it without torchrun")]
    problems += [(not lo <= getattr(cfg, k) <= hi, f"--{k.replace('_', '-')} must lie in "
                  f"[{lo}, {hi}]{note}, got {getattr(cfg, k)}") for k, lo, hi, note in RANGES]
    problems += [
        (cfg.base_steps < 1, f"--base-steps must be >= 1, got {cfg.base_steps}"),
        (cfg.max_steps < 2, "--max-steps must be >= 2 (two sequential stages)"),
        (cfg.ablations and cfg.mechanism,
         "--ablations and --mechanism are two commands: pass one, then the other"),
        (cfg.lrs_from and (cfg.ablations or cfg.mechanism),
         "--lrs-from is for the comparison; --ablations and --mechanism read its --out-dir"),
        (cfg.lrs_from and Path(cfg.lrs_from).resolve() == summary,
         f"--lrs-from {cfg.lrs_from} would be overwritten by this run: pass another --out-dir"),
        (len(grid) < 2 or min(grid) <= 0 or len(set(grid)) < len(grid),
         f"--lr-grid must be at least two distinct positive numbers, got "
         f"{' '.join(map(str, grid))}")]
    return next((text for bad, text in problems if bad), None) or ift.config_problem(cfg)


# -----------------------------------------------------------------------------
# The verdicts: all of the statistics
#
# A claim is judged on paired differences d_s = metric(recipe, seed s) - metric(other, seed s)
# over the judged seeds, each with its own base. With their mean m, sample std s and n seeds, the
# 95% t-interval [lo, hi] is m +- t95(n - 1) * s / sqrt(n), SE = s / sqrt(n); with the claim's
# margin of indifference DELTA, fixed before the run:
#   reproduced    lo > 0                        the recipe is better (first, even inside +-DELTA)
#   reversed      hi < 0                        the other is better
#   equivalent    -DELTA <= lo and hi <= DELTA  no difference of more than DELTA either way
#   inconclusive  otherwise                     the seeds cannot tell
# DELTA is 0.02 exact match (40 of the 2000 test rows), and 1 nat of the mean preference margin
# for claim (c) (the chosen answer e = 2.7 times likelier, small next to margins summed over whole
# answers). |m| / SE well above t95 marks a verdict another run should repeat. Each side of a
# claim is also paired with the model it started from: an interval containing 0 "did not move",
# one below 0 is "worse than its start"; a claim won against such a side says little. Five
# claims at 95% each: with no true difference anywhere, the chance that one or more comes out
# reproduced or reversed by luck is up to 1 - 0.95^5 = 23%.

DELTA = {"exact_match": 0.02, "margin": 1.0}
N_CLAIMS = 5
CONTROL = "b control"  # (b)'s control: SFT - SFT then DPO

# two-sided 95% quantiles of Student's t by degrees of freedom; past 9, 1.96 + 2.4 / df is
# within 0.03 of them
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def half_width(std, n):
    """The 95% t-interval half-width of the mean of n paired differences with this std."""
    df = n - 1
    return T95.get(df, 1.96 + 2.4 / df) * std / math.sqrt(n)


def verdict(lo, hi, delta):
    """The four words (see above) from a 95% interval [lo, hi] and the claim's DELTA."""
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "reversed"
    if -delta <= lo and hi <= delta:
        return "equivalent"
    return "inconclusive"


def paired(diffs, delta):
    """Mean, sample std and 95% t-interval half-width of paired differences, the verdict, the
    seeds each way, |mean| / SE, and how many seeds the same std would need for a half-width of
    delta."""
    mean, std = plumbing.mean_std(diffs)
    ways = {"up": sum(d > 0 for d in diffs), "down": sum(d < 0 for d in diffs)}
    if len(diffs) < 2:
        return {"diffs": diffs, "mean": mean, "std": None, "ci95": None, "seeds_needed": None,
                "t": None, "t95": None, **ways,
                "verdict": "one seed: no spread (use --seeds 2 or more)"}
    half = half_width(std, len(diffs))
    needed = next((n for n in range(2, 10001) if half_width(std, n) <= delta), None)
    se = std / math.sqrt(len(diffs))
    return {"diffs": diffs, "mean": mean, "std": std, "ci95": half, "seeds_needed": needed,
            "t": abs(mean) / se if se else None, "t95": half / se if se else None,
            **ways, "verdict": verdict(mean - half, mean + half, delta)}


def claim_list(claim_c):
    """(key, text, recipe, other, metric) of the five claims, then (b)'s control."""
    return [("a", "IFT > SFT on exact match", "ift", "sft", "exact_match"),
            ("a'", "IFT at SFT's FLOPs > SFT on exact match", "ift at sft's flops", "sft",
             "exact_match"),
            ("b", "IFT >= SFT then DPO on exact match", "ift", "sft then dpo", "exact_match"),
            ("c", "the better DPO recipe > the best other recipe on preference margin",
             *claim_c, "margin"),
            ("d", "SFT then IFT > SFT then SFT on exact match", "sft then ift", "sft then sft",
             "exact_match"),
            (CONTROL, "(b)'s control: SFT >= SFT then DPO on exact match", "sft", "sft then dpo",
             "exact_match")]


def judge_claims(recipes, runs, margin_runs, claim_c, seeds):
    """The claims and (b)'s control, each on paired test differences over the judged seeds;
    each side also paired with the model it started from, to say whether it moved at all.
    Claim (c) reads its runs at the margin lrs, and shows preference accuracy beside."""
    starts = {r.name: r.start for r in recipes}
    out = []
    for key, text, recipe, other, metric in claim_list(claim_c):
        table = margin_runs if key == "c" else runs

        def values(name, metric=metric):
            return [table[(name, s)]["test"][metric] for s in seeds]

        def moved(name):  # the side minus the model it started from, seed by seed
            return paired([a - runs[(starts[name], s)]["test"][metric]
                           for a, s in zip(values(name), seeds)], DELTA[metric])
        claim = {"claim": key, "text": text, "recipe": recipe, "other": other, "metric": metric,
                 "delta": DELTA[metric], "seeds": seeds,
                 **paired([a - b for a, b in zip(values(recipe), values(other))], DELTA[metric]),
                 "moved": {name: moved(name) for name in (recipe, other)}}
        if key == "c":
            pa = "preference_accuracy"
            claim[pa] = paired([a - b for a, b in zip(values(recipe, pa), values(other, pa))],
                               0.02)
        out.append(claim)
    return out


def pooled(first, second):
    """{claim: paired() over the seeds of two summaries together}: pooled after the fact."""
    return {c["claim"]: paired([per_seed["claims"][c["claim"]] for s in (first, second)
                                for per_seed in s["per_seed"].values()], c["delta"])
            for c in first["claims"]}



# -----------------------------------------------------------------------------
# The base models, the recipes and the runs
#
# Stage 0, the base model. The paper fine-tunes a pretrained model, and DPO's premise is a model
# that already writes answers, so every recipe starts from a base: the random GPT trained for
# --base-steps by plain language modelling on data/pretrain.jsonl (prompts in none of the
# splits). Where those steps land among the tasks' phase changes moves with the machine's float
# order, so a base is a random draw like the batch order: EVERY seed trains its own, and the
# paired differences measure the recipes over that luck too, as a reader elsewhere draws it.
#
# One seed then trains these models (S = --max-steps):
#   single stage   SFT, IFT, ORPO and DPO from its base on the whole train split for S steps (the
#                  paper's "+ SFT", "+ DPO", ... rows of its Table 2); DPO's reference is the base.
#   sequential     stage 1: SFT from the base on half A for S/2 steps; stage 2, from it, on half B
#                  for S/2 steps: SFT (the paper's control: restarting a schedule alone can move
#                  results), IFT, ORPO, and DPO with the stage-1 model as reference.
#   equal compute  IFT for S / IFT_COST steps: the FLOPs of SFT's S steps.
# IFT's ablations are not in the default run, so that its seeds buy power for the claims.

BASE = "base (stage 0)"


@dataclass
class Recipe:
    name: str
    group: str                # single stage, sequential, equal compute, ablation, base
    loss: str                 # ift.LOSSES
    data: str = "train"       # the split it trains on (see load_data)
    steps: int = 0
    start: str = BASE         # the recipe whose checkpoint it fine-tunes ("": from scratch)
    lr_of: str = ""           # the recipe whose tuned lr it takes ("": its own, tuned)
    overrides: dict = field(default_factory=dict)  # ift.Config fields it sets

    @property
    def tuned(self):
        return not self.lr_of


def compare_recipes(steps):
    """The recipes of one judged seed, in training order (a recipe's start comes before it)."""
    half = steps // 2
    recipes = [Recipe(loss, "single stage", loss, steps=steps)
               for loss in ("sft", "ift", "orpo", "dpo")]
    recipes.append(Recipe("sft (stage 1)", "sequential", "sft", "train_a", half, lr_of="sft"))
    recipes += [Recipe(f"sft then {loss}", "sequential", loss, "train_b", steps - half,
                       "sft (stage 1)") for loss in ("sft", "ift", "orpo", "dpo")]
    recipes.append(Recipe("ift at sft's flops", "equal compute", "ift",
                          steps=round(steps / ift.IFT_COST), lr_of="ift"))
    return recipes


def ablation_recipes(steps):
    """IFT's ablations (`--ablations`): each changes one thing of IFT, at IFT's lr."""
    return [Recipe(name, "ablation", "ift", steps=steps, lr_of="ift", overrides=o) for name, o in (
        ("ift, lam 0", {"lam": 0.0}), ("ift, gamma 0", {"gamma": 0.0}),
        ("ift, detached weights", {"detach_weights": True}),
        ("ift, noisy lam", {"lam_schedule": "noisy"}))]


def base_recipe(cfg):
    return Recipe(BASE, "base", "sft", "pretrain", cfg.base_steps, start="", lr_of=BASE)


def run_cost(recipe):
    """A run's rough cost in SFT steps (DPO and ORPO score two answers per row)."""
    return recipe.steps * {"sft": 1.0, "ift": ift.IFT_COST, "orpo": 2.0, "dpo": 2.0}[recipe.loss]


def config_for(cfg, **fields):
    """An ift.Config: the comparison's settings of ift.py's fields, with the given ones set."""
    plain = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ift.Config)}
    return ift.Config(**{**plain, **fields})


def data_hashes(data_dir, names=("train", "val", "test", "pretrain")):
    """sha256 of each data file a comparison reads."""
    return {name: hashlib.sha256((Path(data_dir) / f"{name}.jsonl").read_bytes()).hexdigest()
            for name in names}


def base_folder(bcfg, out_dir):
    """The base model's settings, and its folder: <out-dir>/base/<hash of the settings>. One
    folder per settings (the seed among them), so no base is ever overwritten by another. The
    pool makes the model; its record also holds val and test scores."""
    settings = {k: v for k, v in dataclasses.asdict(bcfg).items() if k not in (
        "out_dir", "device", "log_interval", "eval_interval", "max_new_tokens")}
    settings.update({f"{k}_sha256": h for k, h in
                     data_hashes(bcfg.data, ("pretrain", "val", "test")).items()})
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return settings, out_dir / "base" / key


def read_json(path, what, hint="delete it, or pass another --out-dir"):
    """A JSON file this program wrote, or one line saying that it is not one."""
    try:
        return json.loads(Path(path).read_bytes())
    except (ValueError, OSError) as e:  # not UTF-8 or not JSON is a ValueError too
        raise plumbing.UserError(f"{path}: not {what} ({type(e).__name__}); {hint}") from None


def load_data(cfg, enc):
    """The splits every run reads: train, val, test, the train split's halves A and B, and the
    pretraining pool of the base models (plain language modelling: with "prompt length" 1 every
    token after <|user|> is a target)."""
    pool_path = Path(cfg.data) / "pretrain.jsonl"
    if not pool_path.is_file():
        raise plumbing.UserError(f"{pool_path}: no pretraining pool for the base model; run "
                                 f"python data/prepare.py, or put rows of your own there")
    data = ift.load_splits(cfg, enc, need_rejected=("train", "val", "test"))
    n = len(data["train"])
    data["train_a"] = ift.Split(data["train"].rows[:n // 2], enc, cfg.block_size, "train half A")
    data["train_b"] = ift.Split(data["train"].rows[n // 2:], enc, cfg.block_size, "train half B")
    pool = ift.Split(ift.load_rows(pool_path, limit=cfg.limit_rows), enc, cfg.block_size,
                     str(pool_path))
    pool.chosen = [(ids, 1) for ids, _ in pool.chosen]
    data["pretrain"] = pool
    return data


def set_up(cfg):
    """What every command and every worker process reads: the config, the device, the output
    folder, the tokenizer and the splits."""
    device, out_dir = ift.start(cfg)
    enc = ift.load_tokenizer(cfg.data)
    return {"cfg": cfg, "device": device, "out_dir": out_dir, "enc": enc,
            "data": load_data(cfg, enc)}


# -----------------------------------------------------------------------------
# Running jobs
#
# Every run is a Job: a recipe, a seed, an lr, and the checkpoint it starts from, which is finished
# before it starts. Lists of jobs map over --workers processes of one thread each on a CPU (a
# 2 x 64 GPT cannot keep two threads busy; RESULTS.md measures it), the longest first. Each
# finished run prints one progress line: its scores, the share of the planned work done (in SFT
# steps) and the time the whole comparison has left at the rate so far.

@dataclass
class Job:
    recipe: Recipe
    seed: int
    lr: float
    init_from: str         # the checkpoint it fine-tunes ("" for a base)
    judged: bool = True    # False: a tuning seed's run, which never reads the test split


WORKER = {}  # in each worker process (and in the main one, for --workers 1): set_up()'s dict
VAL_KEYS = ("val_exact_match", "val_nll", "val_margin", "val_preference_accuracy")


def worker_start(cfg, threads):
    """Set up a process that trains runs: its threads, the tokenizer, the splits."""
    torch.set_num_threads(threads)
    with contextlib.redirect_stdout(io.StringIO()):  # the main process printed any warnings
        WORKER.update(set_up(cfg))


def worker_run(job):
    """Train and test one job with what worker_start() set up in this process: a recipe from
    job.init_from into runs/, or its seed's base (Stage 0), read back from <out-dir>/base when
    one was made with the same settings from the same data files. Its folder gets config.json,
    train.log (what a plain run prints), log.csv and ckpt.pt. Only judged runs read the test
    split; a run whose loss stops being finite ends "diverged". Returns the run's record."""
    cfg, enc, data, device, out_dir = (WORKER[k] for k in ("cfg", "enc", "data", "device",
                                                          "out_dir"))
    r, seed = job.recipe, job.seed
    rcfg = config_for(cfg, loss=r.loss, seed=seed, lr=job.lr, init_from=job.init_from,
                      max_steps=r.steps, **r.overrides)
    if r.name == BASE:
        settings, run_dir = base_folder(rcfg, out_dir)
        if (run_dir / "base.json").is_file():
            record = read_json(run_dir / "base.json", "a base-model record of compare.py")
            if record.get("test") or not job.judged:  # a tuning seed's base has no test scores
                return {**record, "ckpt": str(run_dir / "ckpt.pt"), "reused": True}
    else:
        slug = "".join(c if c.isalnum() else "_" for c in r.name)  # "ift, lam 0" -> ift__lam_0
        run_dir = out_dir / "runs" / f"seed{seed}" / f"{slug}_lr{job.lr:.2g}"
    rcfg.out_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(rcfg), indent=2))
    torch.manual_seed(seed)
    model = ift.build_model(rcfg, enc, device)
    t = time.time()
    record = {"recipe": r.name, "seed": seed, "lr": job.lr, "steps": r.steps,
              "ckpt": str(run_dir / "ckpt.pt")}
    try:
        with (run_dir / "train.log").open("w") as f, contextlib.redirect_stdout(f):
            log, seconds = ift.train(rcfg, model, enc, {"train": data[r.data], "val": data["val"]},
                                     device, run_dir)
    except plumbing.UserError as e:
        return {**record, "outcome": "diverged", "error": str(e)}
    last = [x for x in log if "val_exact_match" in x][-1]  # ift.train validates at its last step
    record.update(outcome="finished", ms_per_step=1000 * seconds / r.steps, test=None,
                  **{k: last[k] for k in VAL_KEYS})
    if job.judged:
        res = ift.evaluate(model, enc, data["test"], device, ift.autocast_for(device),
                           rcfg.max_new_tokens)
        record["test"] = {**{k: res[k] for k in ("exact_match", "exact_match_by_task", "nll",
                                                 "preference_accuracy")},
                          "margin": res["preference_margin"]}
    record["seconds"] = time.time() - t
    if r.name == BASE:  # base.json comes last: it means ckpt.pt is done
        record["settings"] = settings
        tmp = run_dir / "base.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(run_dir / "base.json")
    return record


def workers_for(cfg, device):
    """(processes, threads each): --workers, or one per core up to 8 on a CPU, 1 on a GPU."""
    cores = torch.get_num_threads()
    workers = cfg.workers or (min(cores, 8) if device.type == "cpu" else 1)
    return workers, max(1, cores // workers)


@contextlib.contextmanager
def worker_pool(setup, workers, threads):
    """A map over jobs: a pool of `workers` processes, or, for one worker, this process."""
    if workers == 1:
        WORKER.update(setup)
        yield map
        return
    with concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                                worker_start, (setup["cfg"], threads)) as pool:
        yield pool.map


def run_jobs(run, jobs, plan):
    """Train jobs, the longest first, with run (a map over jobs); (job, result) pairs, and one
    progress line per run (plan: the planned cost, the cost done, the start time). A judged run
    or a base that diverges stops everything: only a tuning run may diverge and lose."""
    jobs = sorted(jobs, key=lambda job: -run_cost(job.recipe))  # stable: ties keep their order
    done = []
    for job, res in zip(jobs, run(worker_run, jobs)):  # results come in order, as they finish
        plan["done"] += run_cost(job.recipe)
        elapsed = time.time() - plan["start"]
        left = elapsed / plan["done"] * max(plan["total"] - plan["done"], 0)
        scores = "diverged"
        if res["outcome"] == "finished":
            test = f" | test exact {res['test']['exact_match']:.3f}" if res["test"] else ""
            scores = (f"val exact {res['val_exact_match']:.3f} | val margin "
                      f"{res['val_margin']:.2f}{test}")
        print(f"[{min(plan['done'] / plan['total'], 1):4.0%}] "
              f"{'judged' if job.judged else 'tuning'} seed {job.seed} | {job.recipe.name:<18} "
              f"| lr {job.lr:.1e} | {scores} | {res.get('seconds', 0):.0f}s | elapsed "
              f"{plumbing.fmt_time(elapsed)}, eta {plumbing.fmt_time(left)} for the whole "
              f"comparison", flush=True)
        if res["outcome"] != "finished" and (job.judged or job.recipe.name == BASE):
            raise plumbing.UserError(f"{job.recipe.name}, seed {job.seed}: {res['error']}")
        done.append((job, res))
    return done


def starts_of(done):
    """(recipe name, seed) -> checkpoint, of the finished runs among done that other recipes
    start from: the bases and stage 1 (one run per seed each)."""
    return {(job.recipe.name, job.seed): res["ckpt"] for job, res in done
            if job.recipe.name in (BASE, "sft (stage 1)") and res["outcome"] == "finished"}


def jobs_at(recipes, seeds, lrs, starts, judged=True):
    """Each recipe on each seed at lrs[the recipe whose lr it takes], from its start's checkpoint
    on that seed."""
    return [Job(r, s, lrs[r.lr_of or r.name], starts[(r.start, s)], judged)
            for s in seeds for r in recipes]


# -----------------------------------------------------------------------------
# Tuning (protocol 2)
#
# Each tuned recipe (the paper's Table 2) is tuned on the tuning seeds only and on validation
# metrics only: tuning runs do not even evaluate the test split. Its lr for exact match serves
# the table and claims (a), (a'), (b), (d); its lr for the margin, claim (c). A run that diverged
# on any tuning seed loses. A best lr at the grid's edge may be a cut-off optimum, so the grid
# adds edge^2 / its neighbour, for either metric, and tunes again. Stage 1 takes SFT's lr for
# exact match, the equal-compute run and the ablations IFT's.

METRICS = ("exact_match", "margin")  # what a recipe's lrs are tuned for


def grid_scores(recipe, done, seeds):
    """{lr: (mean val exact match, mean val margin, mean val NLL)} over the tuning seeds of
    every lr of recipe's grid in done; None for an lr that diverged on some seed."""
    runs = {}
    for job, res in done:
        if job.recipe.name == recipe.name and not job.judged:
            runs.setdefault(job.lr, {})[job.seed] = res
    scores = {}
    for lr, by_seed in runs.items():
        ok = [by_seed[s] for s in seeds if s in by_seed and by_seed[s]["outcome"] == "finished"]
        scores[lr] = None if len(ok) < len(seeds) else tuple(
            plumbing.mean_std([r[k] for r in ok])[0] for k in ("val_exact_match", "val_margin",
                                                               "val_nll"))
    return scores


def best_lrs(scores):
    """{metric: the best lr} by the mean validation metric, ties to the lower NLL then lr."""
    ok = {lr: s for lr, s in scores.items() if s is not None}
    return ok and {metric: min(ok, key=lambda lr: (-ok[lr][i], ok[lr][2], lr))
                   for i, metric in enumerate(METRICS)}


def extension(grid, best):
    """The lr one multiplier step past the edge where best lies, or None inside the grid."""
    g = sorted(grid)
    if best in (g[0], g[-1]):
        edge, neighbour = (g[0], g[1]) if best == g[0] else (g[-1], g[-2])
        return edge * edge / neighbour
    return None


def tune(cfg, run, plan, recipes, seeds, starts, also=()):
    """Tune recipes on the tuning seeds from their starts, at most --max-extensions rounds past
    the first; `also` are other jobs that share the first round's workers. Returns the finished
    (job, result) pairs, and per recipe its grid, its two chosen lrs, the metrics whose optimum
    stays at an edge, and the scores."""
    grids = {r.name: [ift.DEFAULT_LR[r.loss] * m for m in cfg.lr_grid] for r in recipes}
    new, done = grids, []
    for round_ in range(cfg.max_extensions + 1):
        jobs = [Job(r, s, lr, starts[(r.start, s)], judged=False) for r in recipes
                for lr in new[r.name] for s in seeds]
        if round_:  # the first round is in the plan already
            plan["total"] += sum(run_cost(job.recipe) for job in jobs)
        done += run_jobs(run, jobs + (list(also) if round_ == 0 else []), plan)
        scores = {r.name: grid_scores(r, done, seeds) for r in recipes}
        choice = {name: best_lrs(s) for name, s in scores.items()}
        lost = next((name for name, c in choice.items() if not c), None)
        if lost:
            raise plumbing.UserError(f"{lost}: every lr of its grid diverged on a tuning seed; "
                                     f"try smaller --lr-grid multipliers")
        new = {r.name: sorted({lr for lr in (extension(grids[r.name], b) for b in
                                             choice[r.name].values()) if lr is not None})
               for r in recipes}
        if round_ == cfg.max_extensions or not any(new.values()):
            break
        grids = {name: sorted(grid + new[name]) for name, grid in grids.items()}
    return done, {r.name: {"grid": grids[r.name], "lr": choice[r.name]["exact_match"],
                           "lr_margin": choice[r.name]["margin"],
                           "at_edge": [m for m, lr in choice[r.name].items()
                                       if extension(grids[r.name], lr) is not None],
                           "scores": scores[r.name]} for r in recipes}


def pick_claim_c(table, names):
    """Claim (c)'s two recipes among names, picked like the lrs, on the tuning seeds' mean
    VALIDATION margin at each recipe's margin lr: the better DPO recipe and the best other."""
    def score(name):
        exact, margin, nll = table[name]["scores"][table[name]["lr_margin"]]
        return margin, -nll
    dpo = [name for name in names if name.endswith("dpo")]
    return max(dpo, key=score), max((n for n in names if n not in dpo), key=score)


# -----------------------------------------------------------------------------
# Learning rates from an earlier run (--lrs-from summary.json: the replication, protocol 5)
#
# The lrs mean something only for the runs they were tuned for, so the summary must come from
# the same recipes (names and steps, the base's among them) and settings: every CompareConfig
# field but FREE equal, each tuned recipe's grid holding --lr-grid times today's DEFAULT_LR, and
# the data files (not the --data path) of the same sha256 where it records them. The first
# run's summary, written before --lrs-from existed, records neither: its settings are read from
# its `regenerate` command with today's defaults, its data taken on trust. Its judged and tuning
# seeds may not be judged again: a replication's seeds are fresh.

FREE = ("seed", "seeds", "out_dir", "workers", "device", "lrs_from", "log_interval", "ablations",
        "mechanism", "data")  # may differ from the summary's run


def settings_of(cfg):
    """The comparison's settings that a summary records (JSON-ready: lists for tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
            if k not in RECIPE_FIELDS}


def config_of_command(command):
    """The settings of `python compare.py ...` (a summary's regenerate line), with today's
    defaults for the flags it does not give."""
    words = shlex.split(command)
    if words[:2] != ["python", "compare.py"]:
        raise ValueError(f"regenerate is not a compare.py command: {command}")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return settings_of(parse_config(words[2:]))
    except SystemExit:
        raise ValueError(f"regenerate has flags this compare.py refuses: {command}") from None


def lrs_from(cfg, path):
    """The summary at path, checked against cfg (see above): (tuning table, claim (c)'s two
    recipes, the summary). A bad file or one from other recipes or settings: one line."""
    def refuse(problem):
        raise plumbing.UserError(f"{path}: {problem}")
    summary = read_json(path, "a summary.json of compare.py", "pass the summary.json a "
                        "comparison wrote (e.g. assets/compare_summary.json)")
    keys = ("regenerate", "seeds", "tuning_seeds", "per_seed", "recipes", "claims")
    missing = [k for k in keys if k not in summary] if isinstance(summary, dict) else keys
    if missing:
        refuse(f"not a summary.json of compare.py (missing {', '.join(missing)})")
    recipes = [base_recipe(cfg)] + compare_recipes(cfg.max_steps)
    theirs = summary["recipes"] if isinstance(summary["recipes"], dict) else {}
    if list(theirs) != [r.name for r in recipes]:
        refuse(f"from other recipes ({', '.join(map(str, theirs))}), not this comparison's")
    try:
        table = {r.name: {"grid": [float(lr) for lr in theirs[r.name]["grid"]],
                          **{k: float(theirs[r.name][k]) for k in ("lr", "lr_margin")},
                          "at_edge": [str(m) for m in theirs[r.name]["at_edge"]], "scores": {}}
                 for r in recipes if r.tuned}
        steps = {name: int(t["steps"]) for name, t in theirs.items()}
        c = next(c for c in summary["claims"] if c["claim"] == "c")
        claim_c = (str(c["recipe"]), str(c["other"]))
        their_cfg = summary.get("config") or config_of_command(summary["regenerate"])
        used = {int(s) for s in summary["seeds"] + summary["tuning_seeds"]}
    except (KeyError, TypeError, ValueError, StopIteration) as e:
        refuse(f"a field is missing or malformed ({type(e).__name__}: {e})")
    grids = {r.name: [ift.DEFAULT_LR[r.loss] * m for m in cfg.lr_grid] for r in recipes}
    other = [f"--{k.replace('_', '-')} {their_cfg.get(k)} (here {v})"
             for k, v in settings_of(cfg).items() if k not in FREE and their_cfg.get(k) != v]
    other += [f"{r.name} {steps[r.name]} steps (here {r.steps})" for r in recipes
              if steps[r.name] != r.steps]
    other += [f"{name}'s grid {t['grid']} (here {grids[name]})" for name, t in table.items()
              if not all(any(math.isclose(lr, g) for g in t["grid"]) for lr in grids[name])]
    other += [f"{cfg.data}/{k}.jsonl" for k, h in data_hashes(cfg.data).items()
              if summary.get("data_sha256") and summary["data_sha256"].get(k) != h]
    if other:
        refuse(f"made with other settings: {'; '.join(other)}")
    if not set(claim_c) <= table.keys():
        refuse(f"claim (c)'s recipes {claim_c} are not tuned recipes")
    again = sorted(used & {cfg.seed + i for i in range(cfg.seeds)})
    if again:
        refuse(f"its run used seeds {', '.join(map(str, again))} already; judge fresh ones "
               f"(e.g. --seed {max(summary['seeds']) + 1})")
    return table, claim_c, summary


# -----------------------------------------------------------------------------
# The phases
#
# A run can start once its start's checkpoint exists and its lr is known, so the comparison
# trains in five phases, each one or more lists of jobs for the worker pool (numbered below).
# Between phases, tune() and pick_claim_c() are pure functions of finished runs. With lrs from
# an earlier run (`fixed`) there is nothing to tune: phases 1 and 4 are skipped.

def train_all(cfg, run, plan, recipes, tuning, judged, fixed=None):
    """The five phases; fixed: (tuning table, claim (c)) of --lrs-from. Returns every finished
    (job, result), the tuning table (per recipe: grid, lrs, edge flags, scores) and claim (c)'s
    two recipes."""
    own = [r for r in recipes if r.tuned]                         # tuned: the paper's Table 2
    from_base = [r for r in own if r.start == BASE]
    stage2 = [r for r in own if r.start != BASE]
    stage1 = [r for r in recipes if r.name == "sft (stage 1)"]
    rest = [r for r in recipes if not r.tuned and r not in stage1]   # equal compute
    base = base_recipe(cfg)
    judged_bases = [Job(base, s, ift.DEFAULT_LR["sft"], "") for s in judged]
    if fixed:
        (table, claim_c), tuning = fixed, []
        done = run_jobs(run, judged_bases, plan)
    else:
        # 1. the tuning seeds' bases
        done = run_jobs(run, [Job(base, s, ift.DEFAULT_LR["sft"], "", judged=False)
                              for s in tuning], plan)
        # 2. the tuning of the recipes from a base, sharing its first round with the judged
        #    seeds' bases -> their lrs
        tuned, table = tune(cfg, run, plan, from_base, tuning, starts_of(done), judged_bases)
        done += tuned
    lrs = {name: t["lr"] for name, t in table.items()}
    # 3. the tuning seeds' stage 1; on the judged seeds every recipe from a base, stage 1 too
    starts = starts_of(done)
    done += run_jobs(run, jobs_at(stage1, tuning, lrs, starts, judged=False)
                     + jobs_at(from_base + stage1 + rest, judged, lrs, starts), plan)
    if not fixed:
        # 4. the tuning of the stage-2 recipes from the tuning seeds' stage 1 -> their lrs;
        #    claim (c)'s recipes
        tuned, table2 = tune(cfg, run, plan, stage2, tuning, starts_of(done))
        done, table = done + tuned, {**table, **table2}
        lrs = {name: t["lr"] for name, t in table.items()}
        claim_c = pick_claim_c(table, [r.name for r in own])
    extra = [r for r in own if r.name in claim_c and table[r.name]["lr_margin"] != lrs[r.name]]
    plan["total"] += sum(run_cost(r) for r in extra) * len(judged)
    # 5. the judged seeds' stage 2, and claim (c)'s runs at their margin lrs
    lrs_margin = {name: t["lr_margin"] for name, t in table.items()}
    starts = starts_of(done)
    done += run_jobs(run, jobs_at(stage2, judged, lrs, starts)
                     + jobs_at(extra, judged, lrs_margin, starts), plan)
    return done, table, claim_c


# -----------------------------------------------------------------------------
# The comparison and its records

def compare(cfg, command):
    """Train and test every recipe over the seeds, in phases; write the reports and figures."""
    t_start = time.time()
    fixed = lrs_from(cfg, cfg.lrs_from) if cfg.lrs_from else None
    setup = set_up(cfg)
    device, out_dir, data = setup["device"], setup["out_dir"], setup["data"]
    recipes = compare_recipes(cfg.max_steps)
    judged = [cfg.seed + i for i in range(cfg.seeds)]
    tuning = [] if fixed else [cfg.seed + TUNING_OFFSET + i for i in range(cfg.tuning_seeds)]
    workers, threads = workers_for(cfg, device)
    lrs_note = (f"lrs from {cfg.lrs_from}" if fixed else
                f"tuned on seeds {', '.join(map(str, tuning))}")
    print(f"compare | {len(tuning) + len(judged)} base models, then {len(recipes)} recipes x "
          f"{len(judged)} judged seeds {judged[0]}..{judged[-1]}, {lrs_note} | device {device}, "
          f"{report.at_a_time(workers, threads)} | {len(data['train'])} train rows | outputs in "
          f"{out_dir}", flush=True)
    # the planned work in SFT steps, before any grid extension or claim (c)'s runs
    total = (run_cost(base_recipe(cfg)) * (len(tuning) + len(judged))
             + sum(run_cost(r) for r in recipes if r.tuned) * len(cfg.lr_grid) * len(tuning)
             + sum(run_cost(r) for r in recipes if r.name == "sft (stage 1)") * len(tuning)
             + sum(run_cost(r) for r in recipes) * len(judged))
    plan = {"total": total, "done": 0.0, "start": t_start}
    with worker_pool(setup, workers, threads) as run:
        done, table, claim_c = train_all(cfg, run, plan, recipes, tuning, judged,
                                         fixed and fixed[:2])
    info = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
            "device": str(device), "device_name": plumbing.device_name(device),
            "torch": torch.__version__, "threads": threads, "workers": workers,
            "runtime_seconds": time.time() - t_start,
            "busy_seconds": sum(res.get("seconds", 0) for job, res in done
                                if not res.get("reused")),
            "params": sum(p.numel() for p in ift.GPT(**ift.model_args(cfg, setup["enc"]))
                          .parameters()),
            "seeds": judged, "tuning_seeds": tuning, "claim_c": claim_c,
            "tasks": sorted({row["task"] for row in data["test"].rows}),
            "config": settings_of(cfg), "lrs_from": cfg.lrs_from or None,
            "data_sha256": data_hashes(cfg.data)}
    return write_outputs(cfg, info, recipes, done, table, out_dir, fixed and fixed[2])


def write_outputs(cfg, info, recipes, done, table, out_dir, earlier=None):
    """The tables and claims from the finished runs: compare.json, compare.md, claims.png,
    families.png and summary.json in out_dir; the report is printed too. earlier: the summary
    of --lrs-from, whose claims are set beside this run's."""
    seeds, claim_c, every = info["seeds"], info["claim_c"], [base_recipe(cfg)] + recipes
    lrs = {BASE: ift.DEFAULT_LR["sft"], **{name: t["lr"] for name, t in table.items()}}
    by_lr = {}  # (recipe name, seed) -> {lr: record}, of every finished judged run and base
    for job, res in done:
        if job.judged and res["outcome"] == "finished":
            by_lr.setdefault((job.recipe.name, job.seed), {})[job.lr] = res
    runs = {(r.name, s): by_lr[(r.name, s)][lrs[r.lr_of or r.name]] for r in every for s in seeds}
    margin_runs = {(name, s): by_lr[(name, s)][table[name]["lr_margin"]] for name in claim_c
                   for s in seeds}
    summary = [{"recipe": r.name, "group": r.group, "lr": lrs.get(r.lr_of or r.name),
                "steps": r.steps, **means([runs[(r.name, s)] for s in seeds], info["tasks"])}
               for r in every]
    claims = judge_claims(recipes, runs, margin_runs, claim_c, seeds)
    small = summary_file(info, summary, claims, table, runs)
    paths = [out_dir / name for name in ("compare.json", "compare.md", "claims.png",
                                         "families.png", "summary.json")]
    paths[0].write_text(json.dumps({
        **info, "summary": summary, "claims": claims, "tuning": table_json(table),
        "runs": [runs[(r.name, s)] for s in seeds for r in recipes],
        "bases": {s: runs[(BASE, s)] for s in seeds},
        "claim_c_runs": [margin_runs[key] for key in sorted(margin_runs)],
        "tuning_runs": [{"recipe": job.recipe.name, **res} for job, res in done
                        if not job.judged]}, indent=2))
    lines = report.comparison(info, summary, claims, N_CLAIMS, table,
                              [runs[(BASE, s)]["test"] for s in seeds], cfg)
    if earlier:
        lines += report.beside(earlier, small, pooled(earlier, small))
    paths[1].write_text("\n".join(lines) + "\n")
    report.plot_claims(claims, info, paths[2], earlier and earlier["claims"])
    report.plot_families(summary, info, paths[3])
    paths[4].write_text(json.dumps(small, indent=1))
    print("\n" + "\n".join(lines))
    print("wrote " + ", ".join(str(p) for p in paths))
    return summary, claims


def means(per_seed, tasks):
    """Mean and std over the seeds of every test metric of a recipe's runs, and its costs."""
    return {**{t: plumbing.mean_std([p["test"]["exact_match_by_task"][t] for p in per_seed])
               for t in tasks},
            **{k: plumbing.mean_std([p["test"][k] for p in per_seed])
               for k in ("exact_match", "preference_accuracy", "margin", "nll")},
            **{k: plumbing.mean_std([p[k] for p in per_seed]) for k in ("seconds", "ms_per_step")}}


def table_json(table):
    """The tuning table with its lr keys as JSON can hold them: a list per recipe."""
    return {name: {**{k: t[k] for k in ("grid", "lr", "lr_margin", "at_edge")},
                   "scores": [{"lr": lr, **(dict(zip(("val_exact_match", "val_margin", "val_nll"),
                                                     s)) if s else {"diverged": True})}
                              for lr, s in sorted(t["scores"].items())]}
            for name, t in table.items()}


CLAIM_KEYS = ("claim", "text", "recipe", "other", "metric", "delta", "mean", "ci95", "verdict",
              "up", "down", "t", "seeds_needed")


def summary_file(info, summary, claims, table, runs):
    """summary.json: the numbers behind compare.md's tables, small enough to commit (RESULTS.md
    keeps copies in assets/), and the settings and data files' sha256 that --lrs-from checks."""
    metrics = info["tasks"] + ["exact_match", "preference_accuracy", "margin", "nll"]
    base_keys = ("exact_match", "exact_match_by_task", "preference_accuracy", "margin", "nll")
    return {
        "regenerate": info["command"], "date": info["date"], "machine": report.machine(info),
        "runtime_seconds": info["runtime_seconds"], "seeds": info["seeds"],
        "tuning_seeds": info["tuning_seeds"],
        "per_seed": {s: {"base": {k: runs[(BASE, s)]["test"][k] for k in base_keys},
                         "base_ckpt": runs[(BASE, s)]["ckpt"],
                         "claims": {c["claim"]: c["diffs"][i] for c in claims}}
                     for i, s in enumerate(info["seeds"])},
        "recipes": {row["recipe"]: {"lr": row["lr"], "steps": row["steps"],
                                    **{k: table[row["recipe"]][k] for k in (
                                        "grid", "lr_margin", "at_edge")
                                       if row["recipe"] in table},
                                    **{k: {"mean": row[k][0], "std": row[k][1]}
                                       for k in metrics}} for row in summary},
        "claims": [{**{k: c[k] for k in CLAIM_KEYS},
                    "moved_from_start": {name: {k: p[k] for k in ("mean", "ci95", "verdict")}
                                         for name, p in c["moved"].items()}} for c in claims],
        **{k: info[k] for k in ("lrs_from", "config", "data_sha256")}}


# -----------------------------------------------------------------------------
# IFT's ablations (python compare.py --ablations)
#
# Each ablation changes one thing of IFT (lam 0, gamma 0, detached relation weights, noisy lam).
# They train after a comparison, from each judged seed's base at IFT's lr, and are paired with
# IFT on test exact match with the comparison's verdict rule: their own command, so that the
# default run's time buys seeds for the claims.

def saved_comparison(cfg, command):
    """The comparison in --out-dir (its compare.json, checked), the settings it ran with (with
    this command line's --workers and --device), set_up() of them, and the report's heading."""
    path = Path(cfg.out_dir) / "compare.json"
    if not path.is_file():
        raise plumbing.UserError(f"{path}: no comparison there; run python compare.py first "
                                 f"(with the same --out-dir)")
    saved = read_json(path, "a comparison of compare.py")
    if not isinstance(saved, dict) or not {"command", "config", "runs", "seeds", "bases",
                                           "tuning"} <= saved.keys():
        raise plumbing.UserError(f"{path}: not a comparison of compare.py (keys missing); run "
                                 f"python compare.py again with this --out-dir")
    mine = ("workers", "device", "out_dir", "ablations", "mechanism", "lrs_from")  # this line's
    run_cfg = dataclasses.replace(cfg, **{k: v for k, v in saved["config"].items() if k in {
        f.name for f in dataclasses.fields(CompareConfig)} - set(mine)})
    run_cfg.lr_grid = tuple(run_cfg.lr_grid)
    setup = set_up(run_cfg)
    info = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
            "device_name": plumbing.device_name(setup["device"]),
            "comparison": saved["command"].strip(), "seeds": saved["seeds"]}
    return saved, run_cfg, setup, info


def ablations(cfg, command):
    """Train IFT's ablations on the judged seeds of the comparison in --out-dir; pair each with
    IFT; write ablations.md and ablations.json there."""
    t_start = time.time()
    saved, run_cfg, setup, info = saved_comparison(cfg, command)
    recipes, seeds, lr = ablation_recipes(run_cfg.max_steps), info["seeds"], saved["tuning"][
        "ift"]["lr"]
    workers, threads = workers_for(run_cfg, setup["device"])
    starts = {(BASE, s): saved["bases"][str(s)]["ckpt"] for s in seeds}
    jobs = jobs_at(recipes, seeds, {"ift": lr}, starts)
    print(f"ablations | {len(recipes)} recipes x {len(seeds)} judged seeds of "
          f"{setup['out_dir'] / 'compare.json'} at IFT's lr {lr:.1e} | "
          f"{report.at_a_time(workers, threads)}", flush=True)
    plan = {"total": sum(run_cost(job.recipe) for job in jobs), "done": 0.0, "start": t_start}
    with worker_pool(setup, workers, threads) as run:
        done = run_jobs(run, jobs, plan)
    ift_runs = {r["seed"]: r for r in saved["runs"] if r["recipe"] == "ift"}
    verdicts = [{"recipe": r.name, **paired(
        [res["test"]["exact_match"] - ift_runs[job.seed]["test"]["exact_match"]
         for job, res in done if job.recipe == r], DELTA["exact_match"])} for r in recipes]
    info.update(lr=lr, runtime_seconds=time.time() - t_start)
    paths = report.write(setup["out_dir"], "ablations", {
        **info, "verdicts": verdicts, "runs": [res for job, res in done]},
        report.ablations(info, verdicts, DELTA["exact_match"]))
    print("wrote " + ", ".join(str(p) for p in paths))


# -----------------------------------------------------------------------------
# IFT's mechanism: does a model recover from its own mistakes? (python compare.py --mechanism)
#
# The paper's thesis (sec. 3): SFT scores token t only after a ground-truth prefix, so it never
# learns what to do after a mistake of its own; IFT trains on its own predictions. On the test
# rows of the families whose continuation the prompt fixes (add, reverse), for every answer
# position m but the last: clean = greedy accuracy of each later token t after the ground-truth
# prefix; corrupted = the same with token m replaced by the model's likeliest WRONG token there.
# The gap clean - corrupted, by distance d = t - m, is what one own mistake costs: the smaller,
# the better the model recovers. Paired with SFT seed by seed as sft gap - recipe gap,
# "reproduced" means: recovers better than SFT (DELTA as for exact match). It measures SFT, IFT
# and, once --ablations has trained them in the same --out-dir, the ablations.

MECHANISM_TASKS = ("add", "reverse")
MAX_DISTANCE = 4  # distances d = 1 .. 4 after the mistake (an add answer: 3-4 digits + eot)


@torch.no_grad()
def recovery_counts(model, seqs, device):
    """Counts (MAX_DISTANCE, 3): for d = 1.., the later answer tokens scored, right after a clean
    prefix, right after a prefix holding the model's likeliest mistake at distance d before."""
    x, y, mask = ift.make_batch(seqs, device)                             # (B, T) each
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
    """Recovery from own mistakes of the SFT and IFT checkpoints of the comparison in --out-dir
    (and the ablations', when trained); writes mechanism.md, mechanism.json and mechanism.png."""
    command = shlex.join(["python", "compare.py", "--mechanism", "--out-dir", cfg.out_dir])
    saved, run_cfg, setup, info = saved_comparison(cfg, command)
    device, out_dir = setup["device"], setup["out_dir"]
    test = setup["data"]["test"]
    seqs = [s for s, r in zip(test.chosen, test.rows) if r["task"] in MECHANISM_TASKS]
    if not seqs:
        raise plumbing.UserError(f"{run_cfg.data}/test.jsonl: no rows of "
                                 f"{', '.join(MECHANISM_TASKS)}")
    saved_runs = saved["runs"]
    if (out_dir / "ablations.json").is_file():
        saved_runs = saved_runs + read_json(out_dir / "ablations.json",
                                            "an ablations record of compare.py")["runs"]
    runs = {(r["recipe"], r["seed"]): r for r in saved_runs}
    names = ["sft", "ift"] + [r.name for r in ablation_recipes(1)
                              if all((r.name, s) in runs for s in info["seeds"])]
    gaps = {}  # recipe -> per seed: [clean, corrupted, gap] per distance, and pooled (last row)
    for name in names:
        for seed in info["seeds"]:
            init = dataclasses.replace(run_cfg, init_from=runs[(name, seed)]["ckpt"])
            model = ift.build_model(init, setup["enc"], device).eval()  # checked against config
            c = recovery_counts(model, seqs, device).double()
            c = torch.cat([c, c.sum(0, keepdim=True)])                     # + all distances
            acc = c[:, 1:] / c[:, :1].clamp(min=1)                         # (D + 1, 2)
            gaps.setdefault(name, []).append(torch.cat([acc, acc[:, :1] - acc[:, 1:]], 1))
    table = {name: torch.stack(per_seed) for name, per_seed in gaps.items()}  # (S, D + 1, 3)
    verdicts = [{"recipe": name, **paired(
        (table["sft"][:, -1, 2] - table[name][:, -1, 2]).tolist(), DELTA["exact_match"])}
        for name in names if name != "sft"]
    info.update(tasks=MECHANISM_TASKS, rows=len(seqs), tokens_scored=int(c[-1, 0]),
                max_distance=MAX_DISTANCE)
    paths = report.write(out_dir, "mechanism", {**info, "verdicts": verdicts, "recipes": {
        name: {"clean": t[:, :, 0].tolist(), "corrupted": t[:, :, 1].tolist(),
               "gap": t[:, :, 2].tolist()} for name, t in table.items()}},
        report.mechanism(info, table, verdicts))
    report.plot_mechanism(table, info, out_dir / "mechanism.png")
    print("wrote " + ", ".join(str(p) for p in paths + [out_dir / "mechanism.png"]))


# -----------------------------------------------------------------------------
# main

def parse_config(argv):
    """The CompareConfig of `python compare.py ...`, checked; no flags for RECIPE_FIELDS."""
    return plumbing.parse_flags(CompareConfig, argv, check=compare_problem, skip=RECIPE_FIELDS,
                           description=__doc__.split("\n\n")[0].strip())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(argv)
    print("config: " + json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                   if k not in RECIPE_FIELDS}), flush=True)
    command = shlex.join(["python", "compare.py", *argv])
    try:
        if cfg.mechanism:
            mechanism(cfg)
        elif cfg.ablations:
            ablations(cfg, command)
        else:
            compare(cfg, command)
    except plumbing.UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
