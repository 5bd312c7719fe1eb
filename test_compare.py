"""Tests of compare.py and its report.py: the verdicts, the recipes, the phases, the defaults
and one tiny comparison through the real command line, run once and checked by several tests.
Run: pytest -q test_compare.py"""

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import compare
import ift
import report

HERE = Path(__file__).resolve().parent
SEEDS = (1337, 1338)
TINY = ["--max-steps", "4", "--base-steps", "4", "--lr-grid", "0.5", "1", "--max-extensions", "1",
        "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--batch-size", "8", "--eval-interval", "2", "--limit-rows", "32",
        "--max-new-tokens", "8", "--device", "cpu"]


def run_cli(*args):
    return subprocess.run([sys.executable, str(HERE / "compare.py"), *args], capture_output=True,
                          text=True, timeout=600)


def test_compare_defaults_are_smaller_and_yield_to_flags():
    """compare.py shrinks the model and steps unless the command line sets them."""
    cfg = compare.parse_config([])
    assert (cfg.n_layer, cfg.n_embd, cfg.max_steps, cfg.compile) == (2, 64, 1000, "off")
    assert (cfg.seeds, cfg.tuning_seeds, cfg.base_steps, cfg.workers) == (6, 2, 6000, 0)
    assert cfg.out_dir == "out/compare" and cfg.lr_grid == (0.1, 0.33, 1.0)
    assert cfg.max_extensions == 2 and not cfg.ablations and not cfg.mechanism
    given = compare.parse_config(["--n-layer", "3", "--max-steps", "2000", "--lr-grid", "2", "4"])
    assert (given.n_layer, given.n_embd, given.max_steps, given.lr_grid) == (3, 64, 2000,
                                                                             (2.0, 4.0))


@pytest.mark.parametrize("args, message", [
    (["--loss", "sft"], "unrecognized arguments: --loss sft"),
    (["--lr", "1e-3"], "unrecognized arguments: --lr"),
    (["--seeds", "0"], "--seeds must lie in [1, 1000]"),
    (["--tuning-seeds", "0"], "--tuning-seeds must lie in [1, 100]"),
    (["--lr-grid", "1", "-2"], "--lr-grid must be at least two distinct positive numbers"),
    (["--lr-grid", "1", "1"], "--lr-grid must be at least two distinct positive numbers"),
    (["--lr-grid", "1"], "--lr-grid must be at least two distinct positive numbers"),
    (["--lr-grid", "1", "x"], "argument --lr-grid: invalid finite value: 'x'"),
    (["--lr-grid", "1", "nan"], "argument --lr-grid: must be a finite number, got nan"),
    (["--max-extensions", "6"], "--max-extensions must lie in [0, 5]"),
    (["--ablations", "--mechanism"], "--ablations and --mechanism are two commands"),
    (["--workers", "-1"], "--workers must lie in [0, 64] (0: automatic)"),
    (["--lrs-from", "out/compare/summary.json"], "would be overwritten by this run"),
    (["--mechanism", "--lrs-from", "x.json"], "--lrs-from is for the comparison"),
    (["--lam", "1.5"], "--lam must lie in [0, 1]"),
    (["--dpo-beta", "inf"], "argument --dpo-beta: must be a finite number, got inf"),
])
def test_compare_bad_input_is_one_line(args, message):
    """Bad flags exit with status 2 and one line naming the problem, no traceback."""
    r = run_cli(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("lo, hi, word", [
    (0.001, 0.05, "reproduced"), (-0.05, -0.001, "reversed"),
    (0.001, 0.015, "reproduced"),       # above 0 comes first, even inside the band
    (-0.02, 0.02, "equivalent"),        # the band's edges belong to it
    (-0.02, 0.0, "equivalent"), (0.0, 0.02, "equivalent"),
    (-0.0201, 0.01, "inconclusive"), (-0.01, 0.0201, "inconclusive"),
    (-0.05, 0.05, "inconclusive"), (0.0, 0.05, "inconclusive"),
])
def test_verdict_rule_maps_intervals_to_the_four_words(lo, hi, word):
    """The four words from a 95% interval and delta 0.02, at and just past the band's edges."""
    assert compare.verdict(lo, hi, 0.02) == word


def test_paired_verdicts_from_the_t_interval():
    """Mean, sample std and 95% t half-width of paired differences decide the verdict."""
    p = compare.paired([0.10, 0.11, 0.12, 0.13, 0.14], 0.02)
    assert p["mean"] == pytest.approx(0.12) and p["std"] == pytest.approx(math.sqrt(2.5e-4))
    assert p["ci95"] == pytest.approx(2.78 * math.sqrt(2.5e-4) / math.sqrt(5))
    assert p["verdict"] == "reproduced" and (p["up"], p["down"]) == (5, 0)
    # the same std needs 5 seeds for a half-width <= 0.02: 4 give 3.18 * 0.0158 / 2 = 0.025
    assert p["seeds_needed"] == 5 and compare.half_width(p["std"], 4) > 0.02
    assert compare.paired([-0.10, -0.11, -0.12, -0.13, -0.14], 0.02)["verdict"] == "reversed"
    # mean 0.2 but t(2) = 4.30: half-width 4.30 * 0.1 / sqrt(3) = 0.248 > 0.2
    wide = compare.paired([0.1, 0.2, 0.3], 0.02)
    assert wide["verdict"] == "inconclusive" and wide["ci95"] == pytest.approx(0.248, abs=1e-3)
    # mean 0.001, std 0.001: [-0.0015, +0.0035] inside +-0.02
    flat = compare.paired([0.0, 0.001, 0.002, 0.0, 0.002], 0.02)
    assert flat["verdict"] == "equivalent" and (flat["up"], flat["down"]) == (3, 0)
    one = compare.paired([0.05], 0.02)
    assert one["std"] is None and one["t95"] is None and "no spread" in one["verdict"]


def test_preference_margin_against_a_hand_computed_example():
    """The margin is the mean of log p(chosen) - log p(rejected), summed log-probs per row."""
    logps = torch.tensor([[-1.0, -3.0], [-2.0, -1.5], [-0.5, -4.5]])           # (N, 2)
    assert ift.preference_margin(logps) == pytest.approx((2.0 - 0.5 + 4.0) / 3)
    # unlike preference accuracy (2 of 3 here, for any margins of these signs), it keeps moving
    assert ift.preference_margin(logps * 2) == pytest.approx(2 * (2.0 - 0.5 + 4.0) / 3)


def test_compare_recipes_share_the_step_budget():
    """Both sequential stages add up to one single-stage run; IFT at SFT's FLOPs gets 3/4 of it;
    the ablations are not in the default run."""
    recipes = {r.name: r for r in compare.compare_recipes(1000)}
    assert len(recipes) == 10 and sum(r.tuned for r in recipes.values()) == 8
    assert recipes["sft (stage 1)"].steps + recipes["sft then ift"].steps == 1000
    assert recipes["ift at sft's flops"].steps * ift.IFT_COST == pytest.approx(1000)
    assert recipes["sft then dpo"].start == "sft (stage 1)"
    assert {recipes[n].data for n in ("sft (stage 1)", "sft then sft")} == {"train_a", "train_b"}
    ablations = {r.name: r for r in compare.ablation_recipes(1000)}
    assert not ablations.keys() & recipes.keys() and len(ablations) == 4
    lam0 = ablations["ift, lam 0"]
    assert lam0.overrides == {"lam": 0.0} and lam0.lr_of == "ift" and lam0.steps == 1000


def test_an_edge_grid_point_extends_in_its_direction():
    """extension(): one multiplier step past the edge where the best lr lies, None inside."""
    assert compare.extension([1e-3, 2e-3, 4e-3], 4e-3) == pytest.approx(8e-3)
    assert compare.extension([4e-3, 1e-3, 2e-3], 1e-3) == pytest.approx(5e-4)
    assert compare.extension([1e-3, 2e-3, 4e-3], 2e-3) is None


PEAKS = {  # multiplier of DEFAULT_LR where a fake recipe's val exact match / val margin peak
    "dpo": (0.5, 100.0), "sft then dpo": (0.5, 100.0), "orpo": (2.0, 1.0)}
TUNING = (2337, 2338)


def fake_result(job):
    """A finished run whose validation scores are a fixed function of its recipe and lr (peaks
    in PEAKS, else at 1x the default lr); its TEST scores are reversed, so a choice made on
    them would differ. ORPO at 2x diverges on the first tuning seed."""
    r = job.recipe
    record = {"recipe": r.name, "seed": job.seed, "lr": job.lr, "outcome": "finished",
              "ckpt": f"{r.name}|{job.seed}|{job.lr:g}", "seconds": 1.0, "ms_per_step": 1.0}
    if r.name == compare.BASE:
        return {**record, "val_exact_match": 0.1, "val_margin": 0.0, "val_nll": 1.0,
                "test": {"exact_match": 0.1, "margin": 0.0} if job.judged else None}
    m = job.lr / ift.DEFAULT_LR[r.loss]
    if r.name == "orpo" and round(m, 6) == 2 and job.seed == TUNING[0]:
        return {**record, "outcome": "diverged", "error": "step 3: the orpo loss is nan"}
    peak_exact, peak_margin = PEAKS.get(r.name, (1.0, 1.0))
    exact = 1 - abs(math.log(m / peak_exact))
    margin = 5 - abs(math.log(m / peak_margin)) + {"sft then dpo": 1.0, "ift": 0.5}.get(r.name, 0)
    test = {"exact_match": -exact, "margin": -margin, "preference_accuracy": 0.5, "nll": 1.0,
            "exact_match_by_task": {}} if job.judged else None
    return {**record, "val_exact_match": exact, "val_nll": 1 - exact, "val_margin": margin,
            "test": test}


def fake_train_all(grid=("0.5", "1", "2")):
    """train_all over 3 judged seeds and 2 tuning seeds with the fake trainer: its lists of jobs
    (one per call of the map) and its results."""
    cfg = compare.parse_config(["--lr-grid", *grid, "--max-steps", "4"])
    recipes, judged = compare.compare_recipes(4), [1337, 1338, 1339]
    lists = []

    def run(fn, jobs):
        assert fn is compare.worker_run
        lists.append(list(jobs))
        return map(fake_result, lists[-1])
    plan = {"total": 1e9, "done": 0.0, "start": 0.0}
    done, table, claim_c = compare.train_all(cfg, run, plan, recipes, list(TUNING), judged)
    return lists, done, table, claim_c, judged


def test_the_grid_extends_at_an_edge_at_most_twice_in_the_right_direction():
    """With the fake trainer: DPO's exact-match optimum (0.5x) sits at the low edge, so the grid
    adds 0.25x once; its margin optimum (100x) lies past the top, so the grid adds 4x and 8x,
    stops after two extensions and flags it. SFT (peaks at 1x, inside) is never extended; ORPO's
    best lr diverged on one tuning seed and loses."""
    lists, done, table, claim_c, judged = fake_train_all()
    lr = ift.DEFAULT_LR
    assert table["dpo"]["grid"] == pytest.approx([lr["dpo"] * m for m in (0.25, 0.5, 1, 2, 4, 8)])
    assert table["dpo"]["lr"] == pytest.approx(0.5 * lr["dpo"])
    assert table["dpo"]["lr_margin"] == pytest.approx(8 * lr["dpo"])
    assert table["dpo"]["at_edge"] == ["margin"]
    assert table["sft"]["grid"] == pytest.approx([lr["sft"] * m for m in (0.5, 1, 2)])
    assert table["sft"]["at_edge"] == [] and table["sft"]["lr"] == lr["sft"]
    assert table["orpo"]["lr"] == lr["orpo"] and table["orpo"]["scores"][2 * lr["orpo"]] is None
    assert table["sft then dpo"]["grid"] == pytest.approx(table["dpo"]["grid"])
    # every recipe starts with the same number of points
    first = {j.recipe.name for j in lists[1] if not j.judged}
    assert all(len([j for j in lists[1] if j.recipe.name == n and not j.judged]) == 3 * 2
               for n in first)


def test_tuning_seeds_are_never_judged_and_the_test_split_chooses_nothing():
    """With the fake trainer: every seed trains its own base; tuning seeds' runs are not judged
    (no test scores) and no judged seed tunes; the lrs follow validation although the test
    scores point the other way; each judged run starts from its own seed's base or stage 1."""
    lists, done, table, claim_c, judged = fake_train_all()
    jobs = [j for jobs in lists for j in jobs]
    bases = [j for j in jobs if j.recipe.name == compare.BASE]
    assert sorted(j.seed for j in bases) == sorted([*TUNING, *judged])
    assert {j.seed for j in lists[0]} == set(TUNING)          # the tuning bases come first
    assert all(j.judged == (j.seed in judged) for j in jobs)
    for job, res in done:
        assert (res.get("test") is None) == (job.seed in TUNING)
    assert {n: t["lr"] for n, t in table.items() if n in ("sft", "ift", "sft then ift")} == {
        "sft": ift.DEFAULT_LR["sft"], "ift": ift.DEFAULT_LR["ift"],
        "sft then ift": ift.DEFAULT_LR["ift"]}
    for j in jobs:
        if j.recipe.name == compare.BASE:
            assert j.init_from == ""
        elif j.recipe.start == compare.BASE:
            assert j.init_from.startswith(f"{compare.BASE}|{j.seed}|")
        else:
            assert j.init_from == f"sft (stage 1)|{j.seed}|{ift.DEFAULT_LR['sft']:g}"
    # every judged seed trains every recipe once at its lr for exact match
    per = [(j.recipe.name, j.seed) for j in jobs if j.judged and j.recipe.name != compare.BASE
           and j.lr == table.get(j.recipe.lr_of or j.recipe.name, {}).get("lr")]
    assert sorted(per) == sorted((r.name, s) for r in compare.compare_recipes(4) for s in judged)
    # claim (c): picked on the tuning seeds' validation margin; its runs at the margin lrs
    assert claim_c == ("sft then dpo", "ift")
    extra = {(j.recipe.name, j.seed, j.lr) for j in lists[-1] if j.recipe.name in claim_c}
    assert (("sft then dpo", 1338, table["sft then dpo"]["lr_margin"]) in extra)


class RuleModel(torch.nn.Module):
    """A stand-in for the GPT whose greedy prediction is a rule: "copy" predicts the input token
    itself, "constant" always predicts token 5, whatever the input."""

    def __init__(self, rule, vocab=8):
        super().__init__()
        self.rule, self.vocab = rule, vocab

    def forward(self, x):
        pred = x if self.rule == "copy" else torch.full_like(x, 5)
        return F.one_hot(pred, self.vocab).float()                          # (B, T, V)


def test_recovery_counts_against_hand_counts():
    """recovery_counts equals counts by hand for a model that copies its input and a blind one."""
    # Answers of 5s: the copying model gets the token right after its own mistake wrong and every
    # later one right; the blind one is never hurt. Row 1 has 5 answer targets (mistakes at
    # m = 0..3), row 2 has 2 (m = 0) and is padded.
    seqs = [([1, 5, 5, 5, 5, 5, 5], 2), ([1, 1, 5, 5, 5], 3)]  # (ids, prompt length)
    copy = compare.recovery_counts(RuleModel("copy"), seqs, device="cpu")
    # per distance d = 1..4: [tokens scored, right after a clean prefix, right after the mistake]
    assert copy.tolist() == [[5, 5, 0], [3, 3, 3], [2, 2, 2], [1, 1, 1]]
    blind = compare.recovery_counts(RuleModel("constant"), seqs, device="cpu")
    assert blind.tolist() == [[5, 5, 5], [3, 3, 3], [2, 2, 2], [1, 1, 1]]


def test_a_side_that_did_not_move_or_moved_backwards_is_flagged():
    """The claims table flags a side whose change from its start contains 0 or lies below it."""
    up, flat, down = (compare.paired(d, 0.02) for d in ([0.10, 0.12, 0.11], [0.01, -0.01, 0.0],
                                                         [-0.10, -0.12, -0.11]))
    assert report.moved_cell("sft", up) == f"sft +0.110 ± {up['ci95']:.3f}"
    assert report.moved_cell("dpo", flat).endswith(": did not move**")
    assert report.moved_cell("dpo", down).endswith(": worse than its start**")


FIRST_RUN = HERE / "assets" / "compare_summary.json"


def test_lrs_from_trains_no_tuning_run_and_takes_the_summarys_lrs():
    """With the fake trainer and --lrs-from the committed first run: no tuning seed trains, every
    judged run takes exactly the summary's lr (claim (c)'s two recipes also its margin lr)."""
    summary = json.loads(FIRST_RUN.read_text())
    cfg = compare.parse_config(["--seed", "1343", "--seeds", "2", "--lrs-from", str(FIRST_RUN)])
    table, claim_c, _ = compare.lrs_from(cfg, FIRST_RUN)
    c = next(c for c in summary["claims"] if c["claim"] == "c")
    assert claim_c == (c["recipe"], c["other"])
    lists = []

    def run(fn, jobs):
        lists.append(list(jobs))
        return map(fake_result, lists[-1])
    recipes, judged = compare.compare_recipes(cfg.max_steps), [1343, 1344]
    plan = {"total": 1e9, "done": 0.0, "start": 0.0}
    done, table_out, claim_out = compare.train_all(cfg, run, plan, recipes, [], judged,
                                                   (table, claim_c))
    assert table_out is table and claim_out == claim_c
    jobs = [j for jobs in lists for j in jobs]
    assert all(j.judged and j.seed in judged for j in jobs)
    lr = {name: r["lr"] for name, r in summary["recipes"].items()}
    want = {(r.name, s, lr[r.lr_of or r.name]) for r in recipes for s in judged}
    want |= {(name, s, summary["recipes"][name]["lr_margin"]) for name in claim_c for s in judged}
    want |= {(compare.BASE, s, ift.DEFAULT_LR["sft"]) for s in judged}
    assert {(j.recipe.name, j.seed, j.lr) for j in jobs} == want
    assert len(jobs) == len(want)  # each once


def synthetic_summary(seeds, diffs, verdicts):
    """A summary.json of two claims (a, c) over seeds: per-seed differences and verdicts given,
    mean and half-width from paired()."""
    claims = []
    for key, metric, ds, word in zip(("a", "c"), ("exact_match", "margin"), diffs, verdicts):
        p = compare.paired(ds, compare.DELTA[metric])
        claims.append({"claim": key, "recipe": "ift", "other": "sft", "metric": metric,
                       "delta": compare.DELTA[metric], **{k: p[k] for k in (
                           "mean", "ci95", "up", "down", "t")}, "verdict": word})
    return {"regenerate": "python compare.py", "seeds": seeds, "claims": claims,
            "per_seed": {str(s): {"claims": {"a": a, "c": c}}
                         for s, a, c in zip(seeds, *diffs)}}


def test_two_summaries_side_by_side_and_in_one_figure(tmp_path):
    """side_by_side: each run's mean, interval, verdict and abs(mean) / SE, whether the verdict
    repeated, and the seeds pooled; claims.png draws the earlier run beside."""
    first = synthetic_summary([1, 2, 3], ([0.01, 0.02, 0.03], [2.0, 3.0, 4.0]),
                              ["reproduced", "reproduced"])
    second = synthetic_summary([4, 5], ([-0.01, 0.01], [3.0, 5.0]),
                               ["inconclusive", "reproduced"])
    header, delimiter, a, c = report.side_by_side(first, second, compare.pooled(first, second))
    assert "first run (3 seeds, 1-3)" in header and "replication (2 seeds, 4-5)" in header
    assert "pooled after the fact (5 seeds)" in header and delimiter.count("|") == header.count("|")
    p = compare.paired([0.01, 0.02, 0.03], 0.02)
    cells = [x.strip() for x in a.split("|")[1:-1]]
    assert cells[:4] == ["(a) ift - sft", f"+0.020, [{0.02 - p['ci95']:+.3f}, "
                         f"{0.02 + p['ci95']:+.3f}]", "**reproduced**", f"{p['t']:.1f}"]
    assert cells[5] == "**inconclusive**" and cells[7] == "**no**"
    assert cells[8].startswith("+0.012, [")  # (0.01 + 0.02 + 0.03 - 0.01 + 0.01) / 5
    assert c.split("|")[8].strip() == "yes" and c.split("|")[2].strip().startswith("+3.00, [")
    claims = [{**x, "up": 1, "down": 0} for x in second["claims"]]
    report.plot_claims(claims, {"seeds": [4, 5], "command": "python compare.py"},
                       tmp_path / "claims.png", first["claims"])
    assert (tmp_path / "claims.png").read_bytes()[:4] == b"\x89PNG"


# -----------------------------------------------------------------------------
# one tiny comparison through the command line, checked by the tests below

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """python compare.py over two judged and two tuning seeds, two runs at a time: its folder,
    output and records."""
    out = tmp_path_factory.mktemp("cmp")
    r = run_cli("--seeds", "2", "--workers", "2", *TINY, "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "compare.json").read_text())
    return SimpleNamespace(out=out, stdout=r.stdout, res=res,
                           runs={(x["recipe"], x["seed"]): x for x in res["runs"]})


def run_config(run):
    """The config.json of a run's folder."""
    return json.loads((Path(run["ckpt"]).parent / "config.json").read_text())


def test_each_judged_seed_trains_its_own_base_and_fine_tunes_it(tiny):
    """Two judged seeds, two bases (their own seed, other weights); every recipe of a seed starts
    from that seed's base, stage 2 from that seed's stage 1."""
    assert tiny.res["seeds"] == list(SEEDS) and len(tiny.runs) == 10 * 2
    bases = {s: tiny.res["bases"][str(s)] for s in SEEDS}
    assert bases[1337]["ckpt"] != bases[1338]["ckpt"]
    assert [run_config(bases[s])["seed"] for s in SEEDS] == list(SEEDS)
    weights = [torch.load(bases[s]["ckpt"], weights_only=True)["model"] for s in SEEDS]
    assert weights[0].keys() == weights[1].keys()
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for s in SEEDS:
        for name in ("sft", "dpo", "sft (stage 1)", "ift at sft's flops"):
            assert run_config(tiny.runs[(name, s)])["init_from"] == bases[s]["ckpt"]
        stage2 = tiny.runs[("sft then dpo", s)]
        assert run_config(stage2)["init_from"] == tiny.runs[("sft (stage 1)", s)]["ckpt"]
        log = (Path(stage2["ckpt"]).parent / "train.log").read_text()
        assert "reference is the random initial model" not in log
    names = [row["recipe"] for row in tiny.res["summary"]]
    assert names == [compare.BASE] + [r.name for r in compare.compare_recipes(4)]
    assert not {"loss", "lr", "init_from"} & set(tiny.res["config"])  # each recipe sets its own
    assert "eta" in tiny.stdout and "for the whole comparison" in tiny.stdout


def test_tuning_seeds_choose_the_lrs_on_validation_and_are_never_judged(tiny):
    """The tuning seeds (their own bases) train every grid point; none reads the test split or
    appears among the judged runs; each chosen lr is the best mean validation score."""
    tuning = tiny.res["tuning_seeds"]
    assert tuning == [1337 + 1000, 1338 + 1000] and not set(tuning) & set(SEEDS)
    assert {x["seed"] for x in tiny.res["tuning_runs"]} == set(tuning)
    assert all(x.get("test") is None for x in tiny.res["tuning_runs"])
    assert all(x["seed"] in SEEDS for x in tiny.res["runs"])
    for name, t in tiny.res["tuning"].items():
        ok = [s for s in t["scores"] if not s.get("diverged")]
        for metric, key in (("val_exact_match", "lr"), ("val_margin", "lr_margin")):
            best = min(ok, key=lambda s: (-s[metric], s["val_nll"], s["lr"]))
            assert t[key] == best["lr"]
            per_seed = [x[metric] for x in tiny.res["tuning_runs"]
                        if x["recipe"] == name and x["lr"] == best["lr"]]
            assert len(per_seed) == 2 and best[metric] == pytest.approx(sum(per_seed) / 2)
        assert len(t["grid"]) in (2, 3, 4)  # two points, at most one step past each edge
        for s in SEEDS:
            assert tiny.runs[(name, s)]["lr"] == t["lr"]
    lr = {row["recipe"]: row["lr"] for row in tiny.res["summary"]}
    assert lr["ift at sft's flops"] == lr["ift"] and lr["sft (stage 1)"] == lr["sft"]


def test_claims_are_paired_test_differences(tiny):
    """Each claim's differences are the test metrics of its two recipes, seed by seed; (c) on
    the margin of its runs at their margin lrs, preference accuracy beside it."""
    claims = {c["claim"]: c for c in tiny.res["claims"]}
    assert set(claims) == {"a", "a'", "b", "c", "d", compare.CONTROL}

    def test(name, s, metric="exact_match"):
        return tiny.runs[(name, s)]["test"][metric]
    assert claims["d"]["diffs"] == pytest.approx([test("sft then ift", s) - test("sft then sft", s)
                                                  for s in SEEDS])
    assert claims["d"]["moved"]["sft then ift"]["diffs"] == pytest.approx(
        [test("sft then ift", s) - test("sft (stage 1)", s) for s in SEEDS])
    assert claims[compare.CONTROL]["diffs"] == pytest.approx(
        [test("sft", s) - test("sft then dpo", s) for s in SEEDS])
    c = claims["c"]
    assert c["recipe"].endswith("dpo") and not c["other"].endswith("dpo")
    c_runs = {(x["recipe"], x["seed"]): x for x in tiny.res["claim_c_runs"]}
    assert {x["lr"] for x in c_runs.values() if x["recipe"] == c["recipe"]} == {
        tiny.res["tuning"][c["recipe"]]["lr_margin"]}
    for metric, p in (("margin", c), ("preference_accuracy", c["preference_accuracy"])):
        assert p["diffs"] == pytest.approx([c_runs[(c["recipe"], s)]["test"][metric]
                                            - c_runs[(c["other"], s)]["test"][metric]
                                            for s in SEEDS])


def test_reports_figures_and_summary_are_written(tiny):
    """compare.md has well-formed tables, the command, the four words' rule and the control;
    the figures exist; summary.json holds per seed its base and claim differences, per recipe
    its grid and lrs."""
    md = (tiny.out / "compare.md").read_text()
    assert "python compare.py --seeds 2" in md and "| ift at sft's flops |" in md
    assert "up to 23%" in md and "(b)'s control, SFT - SFT then DPO" in md
    lines = md.splitlines()
    for i, line in enumerate(lines):  # every markdown table: header, delimiter, rows alike
        if line.startswith("|---"):
            assert {lines[j].count("|") for j in range(i - 1, i + 2)} == {line.count("|")}
    for name in ("claims.png", "families.png"):
        assert (tiny.out / name).read_bytes()[:4] == b"\x89PNG"
    small = json.loads((tiny.out / "summary.json").read_text())
    assert small["regenerate"].startswith("python compare.py --seeds 2")
    assert small["tuning_seeds"] == tiny.res["tuning_seeds"]
    per_seed = small["per_seed"]
    assert [per_seed[str(s)]["base_ckpt"] for s in SEEDS] == [
        tiny.res["bases"][str(s)]["ckpt"] for s in SEEDS]
    for i, c in enumerate(tiny.res["claims"]):
        assert [per_seed[str(s)]["claims"][c["claim"]] for s in SEEDS] == c["diffs"]
        assert small["claims"][i]["ci95"] == c["ci95"] and small["claims"][i]["up"] == c["up"]
    assert small["recipes"]["dpo"]["grid"] == tiny.res["tuning"]["dpo"]["grid"]
    assert small["recipes"]["dpo"]["lr_margin"] == tiny.res["tuning"]["dpo"]["lr_margin"]
    row = next(row for row in tiny.res["summary"] if row["recipe"] == "sft then ift")
    assert small["recipes"]["sft then ift"]["exact_match"] == {"mean": row["exact_match"][0],
                                                               "std": row["exact_match"][1]}


def test_ablations_then_mechanism_on_the_comparisons_bases(tiny):
    """--ablations trains the four ablations from each judged seed's base at IFT's lr and pairs
    them with IFT; --mechanism then measures SFT, IFT and the ablations."""
    r = run_cli("--ablations", "--workers", "2", "--out-dir", str(tiny.out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    abl = json.loads((tiny.out / "ablations.json").read_text())
    names = [a.name for a in compare.ablation_recipes(4)]
    assert [v["recipe"] for v in abl["verdicts"]] == names
    runs = {(x["recipe"], x["seed"]): x for x in abl["runs"]}
    for s in SEEDS:
        assert run_config(runs[("ift, lam 0", s)])["init_from"] == tiny.res["bases"][str(s)]["ckpt"]
        assert runs[("ift, gamma 0", s)]["lr"] == tiny.res["tuning"]["ift"]["lr"]
    assert abl["verdicts"][0]["diffs"] == pytest.approx(
        [runs[("ift, lam 0", s)]["test"]["exact_match"]
         - tiny.runs[("ift", s)]["test"]["exact_match"] for s in SEEDS])
    r = run_cli("--mechanism", "--out-dir", str(tiny.out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    mech = json.loads((tiny.out / "mechanism.json").read_text())
    assert list(mech["recipes"]) == ["sft", "ift", *names]
    gap = mech["recipes"]["ift"]["gap"]  # per seed, per distance (+ all distances)
    assert len(gap) == 2 and len(gap[0]) == compare.MAX_DISTANCE + 1
    sft = mech["recipes"]["sft"]["gap"]
    assert mech["verdicts"][0]["diffs"] == pytest.approx([s[-1] - i[-1] for s, i in zip(sft, gap)])
    assert (tiny.out / "mechanism.png").read_bytes()[:4] == b"\x89PNG"
    assert "| ift, noisy lam |" in (tiny.out / "mechanism.md").read_text()


def test_one_worker_reuses_the_bases_and_trains_as_two_workers_did(tiny, tmp_path):
    """A second comparison beside the same bases reuses them; one run at a time, in this
    process, it tunes and trains seed 1337 exactly as the two worker processes did."""
    shutil.copytree(tiny.out / "base", tmp_path / "base")
    r = run_cli("--seeds", "1", "--workers", "1", *TINY, "--out-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    again = json.loads((tmp_path / "compare.json").read_text())
    base, before = again["bases"]["1337"], tiny.res["bases"]["1337"]
    assert base["reused"] and "reused" not in before
    assert Path(base["ckpt"]).relative_to(tmp_path) == Path(before["ckpt"]).relative_to(tiny.out)
    assert {k: (t["grid"], t["lr"], t["lr_margin"]) for k, t in again["tuning"].items()} == {
        k: (t["grid"], t["lr"], t["lr_margin"]) for k, t in tiny.res["tuning"].items()}
    for x in again["runs"]:
        want = tiny.runs[(x["recipe"], 1337)]
        assert x["lr"] == want["lr"]
        assert x["test"]["nll"] == pytest.approx(want["test"]["nll"], abs=1e-5)


@pytest.mark.parametrize("content, message", [
    (None, "no comparison there; run python compare.py first"),
    (b"\xff\xfe not json", "not a comparison of compare.py (UnicodeDecodeError)"),
    (b'{"seeds": [1]}', "not a comparison of compare.py (keys missing)"),
])
def test_mechanism_without_a_comparison_is_one_line(tmp_path, content, message):
    """--mechanism on a folder without a (readable) compare.json stops with one line."""
    if content is not None:
        (tmp_path / "compare.json").write_bytes(content)
    r = run_cli("--mechanism", "--out-dir", str(tmp_path))
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_base_model_is_kept_per_settings_and_data(tmp_path):
    """A changed setting, pool or test file gives the base a new folder; the train split not."""
    for name in ("train", "pretrain", "val", "test"):
        (tmp_path / f"{name}.jsonl").write_text(f'{{"task": "{name}"}}\n')
    cfg = compare.config_for(compare.CompareConfig(), data=str(tmp_path))

    def folder(**fields):
        return compare.base_folder(dataclasses.replace(cfg, **fields), tmp_path / "out")[1]
    first = folder()
    assert first.parent == tmp_path / "out" / "base" and folder() == first
    assert folder(max_steps=7) != first and folder(seed=1) != first
    assert folder(eval_interval=7, out_dir="elsewhere") == first  # no effect on the model
    (tmp_path / "train.jsonl").write_text('{"task": "other"}\n')
    assert folder() == first
    for name in ("pretrain", "test"):
        (tmp_path / f"{name}.jsonl").write_text('{"task": "other"}\n')
        assert folder() != first
        first = folder()


def test_compare_without_a_pretraining_pool_is_one_line(tmp_path):
    """A --data folder without pretrain.jsonl stops before training with a one-line error."""
    for name in ("train", "val", "test"):
        lines = (HERE / "data" / f"{name}.jsonl").read_text().splitlines()[:16]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    r = run_cli("--data", str(tmp_path), "--out-dir", str(tmp_path / "out"), "--device", "cpu")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().endswith("no pretraining pool for the base model; run python "
                                     "data/prepare.py, or put rows of your own there")
    assert len(r.stderr.strip().splitlines()) == 1


def test_results_quote_the_committed_summaries():
    """RESULTS.md's claims are the committed runs': every claim of the latest summary (the
    replication's, else assets/compare_summary.json) has a row in section 1's claims table with
    its interval and its verdict, and the README quotes its exact-match claims with their
    intervals. The side-by-side table (next test) holds the earlier run's."""
    latest = ([FIRST_RUN] + sorted((HERE / "assets").glob("compare_summary_*.json")))[-1]
    summary = json.loads(latest.read_text())
    text = (HERE / "RESULTS.md").read_text()
    results = text[text.index("## 1. "):text.index("## 2. ")].splitlines()  # its section 1
    readme = (HERE / "README.md").read_text()
    assert len(summary["claims"]) == 6
    for claim in summary["claims"]:
        places = 3 if claim["metric"] == "exact_match" else 2
        lo, hi = claim["mean"] - claim["ci95"], claim["mean"] + claim["ci95"]
        interval = f"[{lo:+.{places}f}, {hi:+.{places}f}]"
        rows = [line for line in results
                if line.startswith(f"| ({claim['claim']}) {claim['text']} |")]
        assert len(rows) == 1 and interval in rows[0], (claim["claim"], interval)
        assert f"**{claim['verdict']}**" in rows[0]
        if claim["metric"] == "exact_match" and claim["claim"] != "b control":
            assert f"{claim['mean']:+.3f}, {interval}" in readme, (claim["claim"], interval)


def test_results_set_the_committed_runs_side_by_side():
    """Every replication summary committed beside the first run's (assets/compare_summary_*.json)
    has its side-by-side table in RESULTS.md section 1, row for row; and the first run set beside
    itself repeats its own claims, interval and verdict, with its seeds counted twice."""
    first = json.loads(FIRST_RUN.read_text())
    text = (HERE / "RESULTS.md").read_text()
    section = text[text.index("## 1. "):text.index("## 2. ")]
    for path in sorted((HERE / "assets").glob("compare_summary_*.json")):
        later = json.loads(path.read_text())
        assert later["lrs_from"] == "assets/compare_summary.json" and later["seeds"][0] == 1343
        assert not set(later["seeds"]) & set(first["seeds"] + first["tuning_seeds"])
        for row in report.side_by_side(first, later, compare.pooled(first, later))[2:]:
            assert row in section, row
    rows = report.side_by_side(first, first, compare.pooled(first, first))[2:]
    assert len(rows) == len(first["claims"]) == 6
    for c, row in zip(first["claims"], rows):
        places = 2 if c["metric"] == "margin" else 3
        lo, hi = c["mean"] - c["ci95"], c["mean"] + c["ci95"]
        cell = f"{c['mean']:+.{places}f}, [{lo:+.{places}f}, {hi:+.{places}f}]"
        assert row.count(cell) == 2 and row.count(f"**{c['verdict']}**") == 2
        assert f"| {c['t']:.1f} |" in row and "| yes |" in row


def test_lrs_from_a_tiny_run_replicates_it_on_fresh_seeds(tiny, tmp_path):
    """--lrs-from the tiny run's summary.json, on seeds 1339-1340: no tuning run, every run at
    the summary's lr, and compare.md and summary.json say where the lrs came from."""
    source = tiny.out / "summary.json"
    r = run_cli("--seed", "1339", "--seeds", "2", "--workers", "2", *TINY, "--lrs-from",
                str(source), "--out-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "0 base models" not in r.stdout and "lrs from" in r.stdout
    res = json.loads((tmp_path / "compare.json").read_text())
    assert res["tuning_runs"] == [] and res["tuning_seeds"] == [] and res["seeds"] == [1339, 1340]
    lrs = {name: t["lr"] for name, t in tiny.res["tuning"].items()}
    for x in res["runs"]:
        r_ = next(r for r in compare.compare_recipes(4) if r.name == x["recipe"])
        assert x["lr"] == lrs[r_.lr_of or r_.name]
    md = (tmp_path / "compare.md").read_text()
    assert f"## Learning rates from {source} (not tuned here)" in md
    assert "## Beside the run the lrs came from" in md
    small = json.loads((tmp_path / "summary.json").read_text())
    assert small["lrs_from"] == str(source) and small["recipes"]["dpo"]["grid"] == tiny.res[
        "tuning"]["dpo"]["grid"]
    assert json.loads(source.read_text())["seeds"] == list(SEEDS)  # the source is untouched


def edited(path, tmp_path, edit):
    """A copy of the summary.json at path, changed by edit(summary), in tmp_path."""
    summary = json.loads(path.read_text())
    edit(summary)
    (tmp_path / "edited.json").write_text(json.dumps(summary))
    return str(tmp_path / "edited.json")


@pytest.mark.parametrize("make, args, message", [
    (lambda t: str(FIRST_RUN), ["--n-embd", "32"],
     "made with other settings: --n-embd 64 (here 32)"),
    (lambda t: str(FIRST_RUN), ["--max-steps", "800"], "sft 1000 steps (here 800)"),
    (lambda t: str(FIRST_RUN), ["--lr-grid", "0.5", "1"], "--lr-grid [0.1, 0.33, 1.0] (here "),
    (lambda t: str(FIRST_RUN), ["--seed", "1337"], "used seeds 1337, 1338"),
    (lambda t: edited(FIRST_RUN, t, lambda s: s["recipes"].pop("sft then orpo")), [],
     "from other recipes"),
    (lambda t: edited(FIRST_RUN, t, lambda s: s["recipes"]["ift"].pop("lr_margin")), [],
     "a field is missing or malformed (KeyError: 'lr_margin')"),
    (lambda t: edited(FIRST_RUN, t, lambda s: s.update(regenerate="python ift.py")), [],
     "regenerate is not a compare.py command"),
    (lambda t: edited(FIRST_RUN, t, lambda s: s.update(data_sha256={"train": "0"})), [],
     "data/train.jsonl"),
    (lambda t: edited(FIRST_RUN, t, lambda s: s.pop("claims")), [], "(missing claims)"),
    (lambda t: str(t / "none.json"), [], "not a summary.json of compare.py (FileNotFoundError)"),
    (lambda t: (t / "x.json").write_bytes(b"\xff\xfe{") and str(t / "x.json"), [],
     "not a summary.json of compare.py (UnicodeDecodeError)"),
    (lambda t: (t / "x.json").write_text("{") and str(t / "x.json"), [],
     "not a summary.json of compare.py (JSONDecodeError)"),
])
def test_lrs_from_refuses_another_runs_summary_in_one_line(tmp_path, make, args, message):
    """--lrs-from stops with one line, before training, on a summary from other settings,
    recipes, seeds or data, or one that is no summary at all."""
    r = run_cli("--seed", "1343", "--seeds", "2", "--lrs-from", make(tmp_path), *args,
                "--out-dir", str(tmp_path / "out"), "--device", "cpu")
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    assert not (tmp_path / "out" / "base").exists()
