"""
The paper's comparison at toy scale: a base model, then every recipe of its Table 2 and IFT's
ablations fine-tuned from it with the same batch order seed by seed, tested, and judged on
paired differences.

    python compare.py                     # base, 14 recipes x 4 seeds, lr sweeps: ~45 min, 2 cores
    python compare.py --seeds 1           # the base, one seed and the sweeps: no spread
    python compare.py --mechanism         # then: do the models recover from their own mistakes?
    python compare.py --help              # every setting (the model flags are ift.py's)

It imports the lesson, ift.py, and trains each recipe with ift.train() exactly as
`python ift.py --loss ... --init-from <base>` would. The base model (stage 0) is trained first,
once, by plain language modelling on data/pretrain.jsonl, and kept for the next run with the
same settings. Its defaults are smaller than one recipe's (a 2 x 64 GPT, 1000 fine-tuning
steps, compile off), so that everything fits in 50 minutes on a laptop; flags given on the
command line win. The runs train in phases (see "The phases" below), several at a time on a CPU.
It writes to --out-dir (default out/compare): compare.md (the tables, the claims, the sweep,
machine, runtime and this command), compare.json (every run of every seed), claims.png (each
claim's paired difference with its 95% interval), families.png (test exact match per recipe and
task family), summary.json (the tables' numbers, small enough to commit), the base model under
base/, and each run's config.json, train.log, log.csv and ckpt.pt under runs/; --mechanism adds
mechanism.md, mechanism.json and mechanism.png (see "IFT's mechanism" below). RESULTS.md shows
and discusses the numbers.
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
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import ift
from bench import device_name

RECIPE_FIELDS = ("loss", "lr", "init_from")  # each recipe sets its own: no flags for them


@dataclass
class CompareConfig(ift.Config):
    # ift.py's fields, with smaller defaults (RESULTS.md, section 1, says why these sizes)
    n_layer: int = ift.arg(2, "transformer blocks")
    n_embd: int = ift.arg(64, "width C of the residual stream")
    max_steps: int = ift.arg(1000, "steps of each single-stage run (each sequential stage: half)")
    warmup_steps: int = ift.arg(30, "linear warm-up steps, then cosine decay")
    log_interval: int = ift.arg(250, "steps between log lines (in each run's train.log)")
    eval_interval: int = ift.arg(1000, "steps between validation evaluations")
    compile: str = ift.arg("off", "torch.compile (off: it would compile anew for every short run)",
                           ("auto", "on", "off"))
    out_dir: str = ift.arg("out/compare", "output folder")
    # the comparison's own
    base_steps: int = ift.arg(6000, "steps of stage 0: the base model, trained once by plain "
                              "language modelling on <data>/pretrain.jsonl, that every recipe "
                              "fine-tunes (kept in <out-dir>/base and reused while its settings "
                              "and the data files are unchanged)")
    seeds: int = ift.arg(4, "seeds --seed, --seed + 1, ...; a seed gives every recipe the same "
                         "batch order, so recipes are compared seed by seed")
    lr_sweep: tuple = ift.arg((0.1, 0.33, 1.0), "multipliers of each recipe's DEFAULT_LR tried "
                              "on the first seed; each keeps the best on the validation version "
                              "of the metric a claim judges it by")
    dpo_lr_sweep: tuple = ift.arg((0.1, 0.33, 1.0, 3.0), "the same for the DPO recipes")
    workers: int = ift.arg(0, "runs trained at once, each in a process of its own (0: one per "
                           "CPU core, at most 8, on a CPU; 1 on a GPU)")
    mechanism: bool = ift.arg(False, "instead of training, measure how the checkpoints of the "
                              "comparison in --out-dir recover from their own mistakes")


def compare_problem(cfg):
    """ift.py's checks, plus the comparison's own."""
    problems = [
        (ift.WORLD > 1, "compare.py runs in one process: run it without torchrun"),
        (not 1 <= cfg.seeds <= 1000, f"--seeds must lie in [1, 1000], got {cfg.seeds}"),
        (cfg.base_steps < 1, f"--base-steps must be >= 1, got {cfg.base_steps}"),
        (not 0 <= cfg.workers <= 64, f"--workers must lie in [0, 64] (0: automatic), got "
                                     f"{cfg.workers}"),
        (cfg.max_steps < 2, "--max-steps must be >= 2 (two sequential stages)"),
        *[(not all(m > 0 for m in sweep) or len(set(sweep)) < len(sweep),
           f"{flag} must be distinct positive numbers, got {' '.join(map(str, sweep))}")
          for flag, sweep in (("--lr-sweep", cfg.lr_sweep),
                              ("--dpo-lr-sweep", cfg.dpo_lr_sweep))],
    ]
    return next((message for bad, message in problems if bad), None) or ift.config_problem(cfg)


# -----------------------------------------------------------------------------
# The base model, the recipes and the runs
#
# Stage 0, the base model. The paper fine-tunes a pretrained model (Mistral-7B), and DPO's premise
# is a model that already writes answers. So every recipe here starts from one base model: the
# random GPT trained for --base-steps by plain language modelling (every token of prompt and
# answer is a target) on data/pretrain.jsonl, a pool of rows whose prompts are in none of the
# three splits. It is trained ONCE, with seed --seed, for all seeds, as the paper has one
# pretrained model: the seeds then vary the fine-tuning (batch order), and a paired difference
# measures the recipes rather than the luck of pretraining. It is saved in <out-dir>/base and
# reused while its settings and the bytes of the pool, val and test files are unchanged (its
# record holds its val and test scores); the table shows it as a row.
#
# One seed then trains these models, all with the same batch order (S = --max-steps):
#   single stage   SFT, IFT, ORPO and DPO from the base on the whole train split for S steps (the
#                  paper's "+ SFT", "+ DPO", ... rows of its Table 2); DPO's reference is the base.
#   sequential     stage 1: SFT from the base on half A of the train split for S/2 steps; stage 2,
#                  from that model, on half B for S/2 steps: SFT (the paper's control: restarting
#                  a schedule alone can move results), IFT, ORPO, and DPO with the stage-1 model
#                  as reference.
#   ablations      IFT with lam = 0 (relation propagation only), gamma = 0 (temporal residual
#                  connection only), detached relation weights, noisy lam.
#   equal compute  IFT for S / IFT_COST steps: the FLOPs of SFT's S steps.
# Learning rates: on the first seed each recipe with an lr of its own (lr_of = its name) trains
# once per --lr-sweep multiplier of ift.DEFAULT_LR[loss] (DPO: --dpo-lr-sweep). Each claim
# judges its recipes by one metric and tunes them on that metric's validation version: the
# table and claims (a), (a'), (b), (d) use the lr with the best validation exact match; claim
# (c), on preference accuracy, uses the lr with the best validation preference accuracy (ties:
# the lower validation NLL). Stage 1 takes SFT's lr; the ablations and the equal-compute run
# take IFT's. Every later seed reuses the choices. The test split is never used to choose
# anything.

BASE = "base (stage 0)"


def compare_recipes(steps):
    """The recipes of one seed, in training order (a recipe's lr and start come before it)."""
    half = steps // 2
    recipes = []

    def add(name, group, loss, data="train", n=steps, start=BASE, lr_of=None, **overrides):
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
    add("ift at sft's flops", "equal compute", "ift", n=round(steps / ift.IFT_COST), lr_of="ift")
    return recipes


def run_cost(recipe):
    """A run's rough cost in SFT steps (DPO and ORPO score two answers per row)."""
    return recipe["steps"] * {"sft": 1.0, "ift": ift.IFT_COST, "orpo": 2.0, "dpo": 2.0}[
        recipe["loss"]]


def config_for(cfg, **fields):
    """An ift.Config: the comparison's settings of ift.py's fields, with the given ones set."""
    plain = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ift.Config)}
    return ift.Config(**{**plain, **fields})


def train_and_test(rcfg, model, enc, train_split, data, device, run_dir):
    """ift.train() on train_split (what a plain run prints goes to run_dir/train.log), then the
    test metrics, and the validation metrics the lr choices read. Returns the run's record."""
    t = time.time()
    with (run_dir / "train.log").open("w") as f, contextlib.redirect_stdout(f):
        splits = {"train": train_split, "val": data["val"]}
        log, train_seconds = ift.train(rcfg, model, enc, splits, device, run_dir)
    autocast = ift.autocast_for(device)
    res = ift.evaluate(model, enc, data["test"], device, autocast, rcfg.max_new_tokens)
    val_logps = ift.answer_logps(model, data["val"], device, autocast)       # (N, 2)
    evals = [r for r in log if "val_exact_match" in r]
    return {"seed": rcfg.seed, "lr": rcfg.lr, "steps": rcfg.max_steps,
            "ckpt": str(run_dir / "ckpt.pt"), "seconds": time.time() - t,
            "ms_per_step": 1000 * train_seconds / rcfg.max_steps,
            "val_exact_match": evals[-1]["val_exact_match"], "val_nll": evals[-1]["val_nll"],
            "val_preference_accuracy": (val_logps[:, 0] > val_logps[:, 1]).float().mean().item(),
            "test": {k: res[k] for k in ("exact_match", "exact_match_by_task", "nll",
                                         "preference_accuracy")}}


def base_folder(bcfg, out_dir):
    """The base model's settings, and its folder: <out-dir>/base/<hash of the settings>. One
    folder per settings, so a base made with other settings is kept, never overwritten."""
    settings = {k: v for k, v in dataclasses.asdict(bcfg).items() if k not in (
        "out_dir", "device", "log_interval", "eval_interval", "max_new_tokens")}
    # the pool makes the model; its record also holds val and test scores
    for name in ("pretrain", "val", "test"):
        path = Path(bcfg.data) / f"{name}.jsonl"
        settings[f"{name}_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return settings, out_dir / "base" / key


def read_json(path, what):
    """A JSON file this program wrote, or one line saying that it is not one."""
    try:
        return json.loads(path.read_bytes())
    except (ValueError, OSError) as e:  # not UTF-8 or not JSON is a ValueError too
        raise ift.UserError(f"{path}: not {what} ({type(e).__name__}); delete it, or pass "
                            f"another --out-dir") from None


def base_model(cfg, enc, data, device, out_dir):
    """Stage 0 (see above): the base model's record, trained now, or read from <out-dir>/base
    when that one was made with the same settings from the same data files."""
    pool_path = Path(cfg.data) / "pretrain.jsonl"
    if not pool_path.is_file():
        raise ift.UserError(f"{pool_path}: no pretraining pool for the base model; run python "
                            f"data/prepare.py, or put rows of your own there")
    bcfg = config_for(cfg, loss="sft", lr=ift.DEFAULT_LR["sft"], init_from="",
                      max_steps=cfg.base_steps)
    settings, base_dir = base_folder(bcfg, out_dir)
    bcfg.out_dir = str(base_dir)
    record_path = base_dir / "base.json"
    if record_path.is_file():
        print(f"base model: reusing {base_dir / 'ckpt.pt'} (same settings, same data files)")
        return read_json(record_path, "a base-model record of compare.py")
    base_dir.mkdir(parents=True, exist_ok=True)
    pool = ift.Split(ift.load_rows(pool_path, limit=cfg.limit_rows), enc, cfg.block_size,
                     str(pool_path))
    # plain language modelling: with "prompt length" 1 every token after <|user|> is a target
    pool.chosen = [(ids, 1) for ids, _ in pool.chosen]
    print(f"base model: {cfg.base_steps} steps of language modelling on {len(pool)} rows of "
          f"{pool_path} ...", flush=True)
    torch.manual_seed(cfg.seed)
    model = ift.build_model(bcfg, enc, device)
    (base_dir / "config.json").write_text(json.dumps(dataclasses.asdict(bcfg), indent=2))
    record = {"recipe": BASE, **train_and_test(bcfg, model, enc, pool, data, device, base_dir),
              "settings": settings}
    tmp = record_path.with_suffix(".tmp")  # base.json comes last: it means ckpt.pt is done
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(record_path)
    return record


def compare_run(cfg, recipe, seed, lr, init_from, enc, data, device, out_dir):
    """Train one recipe for one seed from init_from and test it. Its folder gets config.json,
    train.log (what a plain run prints), log.csv and ckpt.pt."""
    slug = "".join(c if c.isalnum() else "_" for c in recipe["name"])  # "ift, lam 0" -> ift__lam_0
    run_dir = out_dir / "runs" / f"seed{seed}" / f"{slug}_lr{lr:.2g}"
    rcfg = config_for(cfg, loss=recipe["loss"], seed=seed, lr=lr, init_from=init_from,
                      max_steps=recipe["steps"], out_dir=str(run_dir), **recipe["overrides"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(rcfg), indent=2))
    torch.manual_seed(seed)
    model = ift.build_model(rcfg, enc, device)
    return {"recipe": recipe["name"],
            **train_and_test(rcfg, model, enc, data[recipe["data"]], data, device, run_dir)}


def load_data(cfg, enc):
    """The splits every run reads: train, val, test, and the train split's halves A and B."""
    data = ift.load_splits(cfg, enc, need_rejected=("train", "val", "test"))
    n = len(data["train"])
    data["train_a"] = ift.Split(data["train"].rows[:n // 2], enc, cfg.block_size, "train half A")
    data["train_b"] = ift.Split(data["train"].rows[n // 2:], enc, cfg.block_size, "train half B")
    return data


# -----------------------------------------------------------------------------
# The phases
#
# Every run is a Job: a recipe, a seed, an lr, and the checkpoint it starts from. A run can start
# once its checkpoint exists and its lr is known, so the comparison trains in four phases, each a
# list of jobs mapped over the worker pool (a plain loop with one worker):
#   1. the first seed's lr sweeps of the recipes that start from the base;     -> their lrs
#   2. stage 1 of every seed (SFT's lr);
#   3. the later seeds' runs from the base, every seed's ablations and equal-compute run, and
#      the first seed's sweeps of the stage-2 recipes (from its stage 1);       -> their lrs,
#                                                                                  claim (c)
#   4. the later seeds' stage-2 runs, and claim (c)'s runs at its lrs.
# Between phases, choose_lrs() and pick_claim_c() are pure functions of finished runs. Within a
# phase the longest jobs start first, so no worker idles long at its end.
#
# Runs at once. A 2 x 64 GPT is too small to keep two CPU threads busy, so on a CPU --workers
# processes train one run each with one thread (RESULTS.md measures the gain). A run reads and
# writes only its own folder and the checkpoint it starts from, which is finished before it starts.

@dataclass
class Job:
    recipe: dict       # from compare_recipes()
    seed: int
    lr: float
    init_from: str     # the checkpoint it fine-tunes
    sweep: bool = False  # an lr candidate of the first seed's sweep: it may diverge and lose


WORKER = {}  # in each worker process (and in the main one, for --workers 1): what a run reads


def worker_start(cfg, threads):
    """Set up a process that trains runs: its threads, the tokenizer, the splits."""
    torch.set_num_threads(threads)
    with contextlib.redirect_stdout(io.StringIO()):  # the main process printed any warnings
        device, out_dir = ift.start(cfg)
        enc = ift.load_tokenizer(cfg.data)
        WORKER.update(cfg=cfg, device=device, out_dir=out_dir, enc=enc, data=load_data(cfg, enc))


def worker_run(job):
    """compare_run() of a job, with what worker_start() set up in this process. A sweep candidate
    that diverges returns a record that says so; any other run that diverges stops everything."""
    w = WORKER
    try:
        return compare_run(w["cfg"], job.recipe, job.seed, job.lr, job.init_from, w["enc"],
                           w["data"], w["device"], w["out_dir"])
    except ift.UserError as e:
        if not job.sweep:
            raise ift.UserError(f"{job.recipe['name']}, seed {job.seed}: {e}") from None
        return {"recipe": job.recipe["name"], "seed": job.seed, "lr": job.lr, "diverged": str(e)}


def at_a_time(workers, threads):
    """'2 runs at a time, 1 thread each'"""
    return (f"{workers} run{'s' * (workers > 1)} at a time, {threads} "
            f"thread{'s' * (threads > 1)} each")


def workers_for(cfg, device):
    """(processes, threads each): --workers, or one per core up to 8 on a CPU, 1 on a GPU."""
    cores = torch.get_num_threads()
    workers = cfg.workers or (min(cores, 8) if device.type == "cpu" else 1)
    return workers, max(1, cores // workers)


@contextlib.contextmanager
def worker_pool(cfg, workers, threads, device, out_dir, enc, data):
    """A map over jobs: a pool of `workers` processes, or, for one worker, this process."""
    if workers == 1:
        WORKER.update(cfg=cfg, device=device, out_dir=out_dir, enc=enc, data=data)
        yield map
        return
    with concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                                worker_start, (cfg, threads)) as pool:
        yield pool.map


class Progress:
    """One line per finished run: its scores, the share of the planned work done, time left."""

    def __init__(self, total, done, t_start):
        self.total, self.done, self.t_start = total, done, t_start

    def report(self, job, res):
        self.done += run_cost(job.recipe)
        elapsed = time.time() - self.t_start
        test = (f"test exact {res['test']['exact_match']:.3f} | val exact "
                f"{res['val_exact_match']:.3f} | val pref {res['val_preference_accuracy']:.3f}"
                f" | {res['seconds']:.0f}s" if "test" in res else "diverged")
        left = ift.fmt_time(elapsed / self.done * max(self.total - self.done, 0))
        print(f"[{min(self.done / self.total, 1):4.0%}] seed {job.seed} | "
              f"{job.recipe['name']:<22} | lr {job.lr:.1e}{' (sweep)' if job.sweep else ''} | "
              f"{test} | elapsed {ift.fmt_time(elapsed)}, about {left} left", flush=True)


def run_phase(run, jobs, progress):
    """Train jobs, the longest first, with run (a map over jobs); (job, result) pairs."""
    jobs = sorted(jobs, key=lambda job: -run_cost(job.recipe))  # stable: ties keep their order
    done = []
    for job, res in zip(jobs, run(worker_run, jobs)):  # results come in order, as they finish
        progress.report(job, res)
        done.append((job, res))
    return done


def multipliers(cfg, recipe):
    return cfg.dpo_lr_sweep if recipe["loss"] == "dpo" else cfg.lr_sweep


def sweep_jobs(cfg, recipes, seed, runs):
    """The sweep of each recipe on seed: one job per lr multiplier, from its start's checkpoint."""
    return [Job(r, seed, ift.DEFAULT_LR[r["loss"]] * m, runs[(r["start"], seed)]["ckpt"], True)
            for r in recipes for m in multipliers(cfg, r)]


def jobs_at(recipes, seeds, lrs, runs, lr_key="lr_of"):
    """Each recipe on each seed at the lr chosen for it (lrs[r[lr_key]]), from its start."""
    return [Job(r, s, lrs[r[lr_key]], runs[(r["start"], s)]["ckpt"]) for s in seeds
            for r in recipes]


def table_runs(base, seeds, done, lrs):
    """(recipe, seed) -> the run the tables show: the base, or the recipe's run at its lr for
    exact match, among done, the (job, result) pairs of the finished runs."""
    runs = {(BASE, s): base for s in seeds}
    for job, res in done:
        if job.lr == lrs.get(job.recipe["lr_of"]):
            runs.setdefault((job.recipe["name"], job.seed), res)
    return runs


def tried_runs(done):
    """(recipe, seed) -> {lr: run} of every finished run that did not diverge."""
    tried = {}
    for job, res in done:
        if "test" in res:
            tried.setdefault((job.recipe["name"], job.seed), {})[job.lr] = res
    return tried


def choose_lrs(recipes, done):
    """Each recipe's lr for exact match and its lr for preference accuracy, each the best on the
    validation split (ties: the lower val NLL, then the lower lr) among its sweep's runs in done
    (diverged runs lose): (lrs, lrs_pa) by recipe name, and the rows of the sweep table."""
    lrs, lrs_pa, rows = {}, {}, []
    for r in recipes:
        results = sorted((res for job, res in done if job.sweep and job.recipe == r),
                         key=lambda x: x["lr"])
        ok = [x for x in results if "test" in x]
        if not ok:
            raise ift.UserError(f"{r['name']}: every lr of its sweep diverged; try smaller "
                                f"multipliers")
        lr = lrs[r["name"]] = min(ok, key=lambda x: (-x["val_exact_match"], x["val_nll"]))["lr"]
        lr_pa = lrs_pa[r["name"]] = min(
            ok, key=lambda x: (-x["val_preference_accuracy"], x["val_nll"]))["lr"]
        rows += [{"recipe": r["name"], "lr": x["lr"], "diverged": "diverged" in x,
                  **{k: x.get(k) for k in ("val_exact_match", "val_preference_accuracy",
                                           "val_nll")},
                  "chosen_for_exact_match": x["lr"] == lr,
                  "chosen_for_preference_accuracy": x["lr"] == lr_pa} for x in results]
    return lrs, lrs_pa, rows


def pick_claim_c(own, tried, lrs_pa, seed):
    """Claim (c)'s two recipes among own (the recipes with an lr of their own: the paper's
    Table 2), on the VALIDATION preference accuracy of the first seed at the lr tuned for it:
    the better DPO recipe and the best other one."""
    def score(name):
        run = tried[(name, seed)][lrs_pa[name]]
        return run["val_preference_accuracy"], -run["val_nll"]
    dpo = [name for name in own if name.endswith("dpo")]
    return (max(dpo, key=score), max((n for n in own if n not in dpo), key=score))


def train_all(cfg, run, progress, recipes, seeds, base):
    """The four phases (see above). Returns every finished (job, result), the lrs chosen for
    exact match and for preference accuracy (by recipe name), the sweep table's rows, and claim
    (c)'s two recipes."""
    first, later = seeds[0], seeds[1:]
    own = [r for r in recipes if r["lr_of"] == r["name"]]          # swept: the paper's Table 2
    from_base = [r for r in own if r["start"] == BASE]
    stage2 = [r for r in own if r["start"] != BASE]
    stage1 = [r for r in recipes if r["name"] == "sft (stage 1)"]
    rest = [r for r in recipes if r not in own + stage1]            # ablations, equal compute
    runs = table_runs(base, seeds, [], {})
    # 1. the first seed's sweeps from the base, and their lrs
    done = run_phase(run, sweep_jobs(cfg, from_base, first, runs), progress)
    lrs, lrs_pa, sweep = choose_lrs(from_base, done)
    # 2. stage 1 of every seed
    done += run_phase(run, jobs_at(stage1, seeds, lrs, runs), progress)
    runs = table_runs(base, seeds, done, lrs)
    # 3. the rest from the base, and the first seed's stage-2 sweeps; their lrs and claim (c)
    done += run_phase(run, jobs_at(from_base, later, lrs, runs) + jobs_at(rest, seeds, lrs, runs)
                      + sweep_jobs(cfg, stage2, first, runs), progress)
    lrs2, lrs_pa2, sweep2 = choose_lrs(stage2, done)
    lrs, lrs_pa, sweep = {**lrs, **lrs2}, {**lrs_pa, **lrs_pa2}, sweep + sweep2
    claim_c = pick_claim_c([r["name"] for r in own], tried_runs(done), lrs_pa, first)
    extra = [r for r in own if r["name"] in claim_c and lrs_pa[r["name"]] != lrs[r["name"]]]
    progress.total += sum(run_cost(r) for r in extra) * len(later)
    # 4. the later seeds' stage 2, and claim (c)'s runs at their lrs for preference accuracy
    done += run_phase(run, jobs_at(stage2, later, lrs, runs)
                      + jobs_at(extra, later, lrs_pa, runs, lr_key="name"), progress)
    return done, lrs, lrs_pa, sweep, claim_c


# -----------------------------------------------------------------------------
# The verdicts
#
# A claim is judged on paired differences d_s = metric(recipe, seed s) - metric(other, seed s):
# reproduced if the 95% t-interval of their mean lies above 0, not reproduced if it lies below,
# within noise if it contains 0. Each side is also paired with the model it started from (the
# base, or stage 1): a side whose interval contains 0 "did not move", one whose interval lies
# below 0 ended "worse than its start", and the table says so.

# two-sided 95% quantiles of Student's t by degrees of freedom; past 9, 1.96 + 2.4 / df is
# within 0.03 of them
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


POWER = 0.02  # the 95% half-width a claim's interval should reach (exact match: 2 points)


def half_width(std, n):
    """The 95% t-interval half-width of the mean of n paired differences with this std."""
    df = n - 1
    return T95.get(df, 1.96 + 2.4 / df) * std / math.sqrt(n)


def paired(diffs):
    """Mean, sample std and 95% t-interval half-width of paired differences, the verdict, and
    how many seeds the same std would need for a half-width of POWER."""
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return {"diffs": diffs, "mean": mean, "std": None, "ci95": None, "seeds_needed": None,
                "verdict": "one seed: no spread (use --seeds 2 or more)"}
    std = statistics.stdev(diffs)
    half = half_width(std, len(diffs))
    verdict = ("reproduced" if mean - half > 0 else "not reproduced" if mean + half < 0
               else "within noise")
    needed = next((n for n in range(2, 10001) if half_width(std, n) <= POWER), None)
    return {"diffs": diffs, "mean": mean, "std": std, "ci95": half, "verdict": verdict,
            "seeds_needed": needed}


def judge_claims(recipes, runs, pa_runs, claim_c, seeds):
    """The paper's claims, each on paired differences over the seeds; each side also paired
    with the model it started from, to say whether it moved at all."""
    starts = {r["name"]: r["start"] for r in recipes}
    claims = [("a", "IFT > SFT on exact match", "ift", "sft", "exact_match"),
              ("a'", "IFT at SFT's FLOPs > SFT on exact match", "ift at sft's flops", "sft",
               "exact_match"),
              ("b", "IFT >= SFT then DPO on exact match", "ift", "sft then dpo", "exact_match"),
              ("c", "the better DPO recipe > the best other recipe on preference accuracy",
               *claim_c, "preference_accuracy"),
              ("d", "SFT then IFT > SFT then SFT on exact match", "sft then ift", "sft then sft",
               "exact_match")]
    out = []
    for key, text, recipe, other, metric in claims:
        table = pa_runs if key == "c" else runs  # claim (c): the runs tuned on its metric

        def values(name):
            return [table[(name, s)]["test"][metric] for s in seeds]

        def moved(name):  # the side minus the model it started from, seed by seed
            return paired([a - runs[(starts[name], s)]["test"][metric]
                           for a, s in zip(values(name), seeds)])
        diffs = [a - b for a, b in zip(values(recipe), values(other))]
        out.append({"claim": key, "text": text, "recipe": recipe, "other": other,
                    "metric": metric, **paired(diffs),
                    "moved": {name: moved(name) for name in (recipe, other)}})
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


# -----------------------------------------------------------------------------
# The comparison

def compare(cfg, command):
    """Train and test every recipe over the seeds, in phases; write the reports and figures."""
    t_start = time.time()
    device, out_dir = ift.start(cfg)
    enc = ift.load_tokenizer(cfg.data)
    data = load_data(cfg, enc)
    recipes = compare_recipes(cfg.max_steps)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    own = [r for r in recipes if r["lr_of"] == r["name"]]
    workers, threads = workers_for(cfg, device)
    total = cfg.base_steps + sum(run_cost(r) for r in recipes) * len(seeds) + sum(
        run_cost(r) * (len(multipliers(cfg, r)) - 1) for r in own)  # claim (c) adds to it
    print(f"compare | a base model, then {len(recipes)} recipes x {len(seeds)} seeds, plus an "
          f"lr sweep of {len(own)} recipes on seed {seeds[0]} | device {device}, "
          f"{at_a_time(workers, threads)} | {len(data['train'])} train rows | outputs in "
          f"{out_dir}", flush=True)
    base = base_model(cfg, enc, data, device, out_dir)
    print(f"base model: test exact {base['test']['exact_match']:.3f} | val exact "
          f"{base['val_exact_match']:.3f} | elapsed {ift.fmt_time(time.time() - t_start)}",
          flush=True)
    progress = Progress(total, cfg.base_steps, t_start)
    with worker_pool(cfg, workers, threads, device, out_dir, enc, data) as run:
        done, lrs, lrs_pa, sweep, claim_c = train_all(cfg, run, progress, recipes, seeds, base)
    info = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
            "device": str(device), "device_name": device_name(device),
            "torch": torch.__version__, "threads": threads, "workers": workers,
            "runtime_seconds": time.time() - t_start,
            "seed_seconds": {s: sum(res["seconds"] for job, res in done
                                    if job.seed == s and "test" in res) for s in seeds},
            "base_seconds": base["seconds"],
            "params": sum(p.numel() for p in ift.GPT(**ift.model_args(cfg, enc)).parameters()),
            "seeds": seeds, "tasks": sorted({row["task"] for row in data["test"].rows}),
            "lr_for_preference_accuracy": lrs_pa,
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RECIPE_FIELDS}}
    return write_outputs(cfg, info, recipes, base, done, lrs, lrs_pa, sweep, claim_c, out_dir)


def write_outputs(cfg, info, recipes, base, done, lrs, lrs_pa, sweep, claim_c, out_dir):
    """The tables and claims from the finished runs: compare.json, compare.md, claims.png,
    families.png and summary.json in out_dir; the report is printed too."""
    seeds, tasks = info["seeds"], info["tasks"]
    runs, tried = table_runs(base, seeds, done, lrs), tried_runs(done)
    pa_runs = {(name, s): tried[(name, s)][lrs_pa[name]] for name in claim_c for s in seeds}
    base_row = {"name": BASE, "group": "base", "loss": "sft", "steps": cfg.base_steps,
                "start": "", "lr_of": BASE}
    summary = summarize([base_row] + recipes, runs, seeds, {**lrs, BASE: base["lr"]}, tasks)
    claims = judge_claims(recipes, runs, pa_runs, claim_c, seeds)
    paths = [out_dir / name for name in ("compare.json", "compare.md", "claims.png",
                                         "families.png", "summary.json")]
    paths[0].write_text(json.dumps({**info, "summary": summary, "claims": claims, "sweep": sweep,
                                    "base": base,
                                    "runs": [runs[(r["name"], s)] for s in seeds
                                             for r in recipes],
                                    "claim_c_runs": [pa_runs[key] for key in sorted(pa_runs)]},
                                   indent=2))
    report = compare_report(info, summary, claims, sweep, cfg)
    paths[1].write_text(report)
    plot_claims(claims, info, paths[2])
    plot_families(summary, info, paths[3])
    paths[4].write_text(json.dumps(summary_file(info, summary, claims), indent=1))
    print("\n" + report)
    print("wrote " + ", ".join(str(p) for p in paths))
    return summary, claims


# -----------------------------------------------------------------------------
# Reports

def summary_file(info, summary, claims):
    """summary.json: the numbers behind compare.md's tables, small enough to commit (RESULTS.md
    keeps a copy in assets/): per recipe, each metric's mean and std over the seeds; per claim,
    the paired differences, their mean, the 95% half-width and the verdict."""
    metrics = info["tasks"] + ["exact_match", "preference_accuracy", "nll"]
    return {
        "regenerate": info["command"], "date": info["date"],
        "machine": machine(info), "seeds": info["seeds"],
        "recipes": {row["recipe"]: {"lr": row["lr"], "steps": row["steps"],
                                    **{k: {"mean": row[k][0], "std": row[k][1]}
                                       for k in metrics}} for row in summary},
        "claims": [{**{k: c[k] for k in ("claim", "text", "recipe", "other", "metric", "diffs",
                                         "mean", "ci95", "verdict", "seeds_needed")},
                    "moved_from_start": {name: {k: p[k] for k in ("mean", "ci95", "verdict")}
                                         for name, p in c["moved"].items()}} for c in claims]}


def machine(info):
    """'AMD EPYC (cpu, 2 runs at a time, 1 thread each), torch 2.13.0+cpu'"""
    return (f"{info['device_name']} ({info['device']}, "
            f"{at_a_time(info['workers'], info['threads'])}), torch {info['torch']}")


def paired_cells(p):
    """The table cells of a paired() result: differences | mean ± std | 95% interval | verdict."""
    diffs = ", ".join(f"{d:+.3f}" for d in p["diffs"])
    spread = f"{p['mean']:+.3f}" + (f" ± {p['std']:.3f}" if p["std"] is not None else "")
    interval = (f"[{p['mean'] - p['ci95']:+.3f}, {p['mean'] + p['ci95']:+.3f}]"
                if p["ci95"] is not None else "-")
    return f"{diffs} | {spread} | {interval} | **{p['verdict']}**"


def moved_cell(name, p):
    """'sft +0.120 ± 0.020': a side's change from its start; bold when it did not move or
    moved backwards, since a claim won against such a side says little."""
    change = f"{name} {p['mean']:+.3f}"
    if p["ci95"] is None:
        return change + " (one seed)"
    flag = {"within noise": "did not move", "not reproduced": "worse than its start"}
    if p["verdict"] in flag:
        return f"**{change} ± {p['ci95']:.3f}: {flag[p['verdict']]}**"
    return f"{change} ± {p['ci95']:.3f}"


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
        f"Machine: {machine(info)}; {info['date']}. Runtime "
        f"{ift.fmt_time(info['runtime_seconds'])} in all: the base model "
        f"{ift.fmt_time(info['base_seconds'])} (when trained, not reused), then the runs, "
        f"{info['workers']} at a time. Their own times, summed: the first seed with the lr sweep "
        f"{ift.fmt_time(seed_times[0])}, each later seed {ift.fmt_time(min(seed_times[1:] or [0]))}"
        f" to {ift.fmt_time(max(seed_times[1:] or [0]))}.", "",
        f"Settings: GPT {cfg.n_layer}x{cfg.n_embd} ({info['params'] / 1e6:.2f}M parameters), "
        f"batch {cfg.batch_size}; base model: {cfg.base_steps} steps of language modelling on "
        f"the pretraining pool; from it {cfg.max_steps} steps per single-stage run (each "
        f"sequential stage half), warm-up {cfg.warmup_steps} then cosine to "
        f"{cfg.min_lr_ratio} x lr, lam {cfg.lam}, gamma {cfg.gamma}, DPO beta {cfg.dpo_beta}, "
        f"ORPO beta {cfg.orpo_beta}; "
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
        "Paired difference per seed (recipe minus the other, same base model and batches); "
        "verdict from the 95% t-interval of the mean difference: above 0 reproduced, below 0 "
        "not reproduced, containing 0 within noise. Claim (c) picks its two recipes on the "
        "first seed's validation preference accuracy, each at its lr tuned for that metric. "
        "Each side's change from the model it started from (the base, or stage 1) is paired "
        "the same way; a side whose interval contains 0 did not move, one whose interval lies "
        "below 0 ended worse than its start. Seeds for "
        f"±{POWER}: how many seeds the measured std of the differences would need for a 95% "
        f"half-width of {POWER}.", "",
        "| claim | recipe - other | per-seed differences | mean ± std | 95% interval | verdict "
        f"| seeds for ±{POWER} | each side's change from its start (± 95%) |",
        "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        lines.append(f"| ({c['claim']}) {c['text']} | {c['recipe']} - {c['other']} "
                     f"({c['metric']}) | {paired_cells(c)} | {c['seeds_needed'] or '-'} | "
                     + "; ".join(moved_cell(name, p) for name, p in c["moved"].items()) + " |")
    lines += ["", f"## Learning-rate sweep (seed {info['seeds'][0]}, validation split, last "
              "step)", "", "| recipe | lr | val exact | val pref acc | val NLL | chosen for |",
              "|---|---|---|---|---|---|"]
    lrs = {}  # recipe -> the lrs it was swept over
    for s in sweep:
        lrs.setdefault(s["recipe"], []).append(s["lr"])
    for s in sweep:
        scores = ("diverged | - | -" if s["diverged"] else
                  f"{s['val_exact_match']:.3f} | {s['val_preference_accuracy']:.3f} | "
                  f"{s['val_nll']:.4f}")
        chosen = [m for m in ("exact match", "preference accuracy")
                  if s["chosen_for_" + m.replace(" ", "_")]]
        if chosen and s["lr"] in (min(lrs[s["recipe"]]), max(lrs[s["recipe"]])):
            chosen[-1] += " (the sweep's edge)"
        lines.append(f"| {s['recipe']} | {s['lr']:.1e} | {scores} | {', '.join(chosen)} |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Plots

def plot_claims(claims, info, path):
    """Each claim's paired difference: its mean over the seeds and 95% t-interval against the
    line at zero, the verdict written beside it (the claims table of compare.md, drawn)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(claims) + 1.4))
    colors = {"reproduced": "tab:green", "not reproduced": "tab:red", "within noise": "tab:gray"}
    for y, c in enumerate(reversed(claims)):
        half = c["ci95"] or 0.0
        ax.errorbar(c["mean"], y, xerr=half, fmt="o", capsize=4,
                    color=colors.get(c["verdict"], "black"))
        ax.annotate(c["verdict"], (c["mean"] + half, y), xytext=(8, 0),
                    textcoords="offset points", va="center", fontsize=9)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(claims)), [f"({c['claim']}) {c['recipe']} - {c['other']}\n"
                                       f"{c['metric'].replace('_', ' ')}"
                                       for c in reversed(claims)], fontsize=8)
    ax.set_xlabel("paired difference on the test split (mean over seeds, 95% t-interval)")
    lo = min(c["mean"] - (c["ci95"] or 0) for c in claims)
    hi = max(c["mean"] + (c["ci95"] or 0) for c in claims)
    ax.set_xlim(min(lo, 0) - 0.02, max(hi, 0) + 0.25 * (max(hi, 0) - min(lo, 0)) + 0.03)
    ax.set_title(f"The paper's claims, each paired seed by seed over {len(info['seeds'])} seeds "
                 f"(same base model and batches)", fontsize=10)
    fig.text(0.01, 0.01, info["command"], fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_families(summary, info, path):
    """Test exact match per recipe (rows) and task family (columns), mean over the seeds, as a
    heat map with the mean and std written in each cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
# the model recovers. Each recipe's gap is paired with SFT's seed by seed (same base model
# and batches) as sft gap - recipe gap, so "reproduced" means: recovers better than SFT.

MECHANISM_TASKS = ("add", "reverse")
MECHANISM_RECIPES = ("sft", "ift", "ift, lam 0", "ift, gamma 0", "ift, detached weights",
                     "ift, noisy lam")
MAX_DISTANCE = 4  # distances d = 1 .. 4 after the mistake (an add answer: 3-4 digits + eot)


@torch.no_grad()
def recovery_counts(model, seqs, device):
    """Counts (MAX_DISTANCE, 3): for d = 1.., the later answer tokens scored, right after a clean
    prefix, right after a prefix holding the model's likeliest mistake at distance d before."""
    x, y, mask, _ = ift.make_batch(seqs, device)                          # (B, T) each
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
    saved = read_json(path, "a comparison of compare.py")
    if not isinstance(saved, dict) or not {"command", "config", "runs", "seeds"} <= saved.keys():
        raise ift.UserError(f"{path}: not a comparison of compare.py (keys missing); run python "
                            f"compare.py again with this --out-dir")
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
            c = recovery_counts(model, seqs, device).double()
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
