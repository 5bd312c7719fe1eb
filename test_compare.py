"""Tests of compare.py: the verdicts, the recipes, the phases, the defaults and one tiny
comparison through the real command line, run once and checked by several tests.
Run: pytest -q"""

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

HERE = Path(__file__).resolve().parent
SEEDS = (1337, 1338)
TINY = ["--max-steps", "4", "--base-steps", "4", "--lr-sweep", "0.5", "1",
        "--dpo-lr-sweep", "0.5", "1", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--batch-size", "8", "--eval-interval", "2", "--limit-rows", "32",
        "--max-new-tokens", "8", "--device", "cpu"]


def run_cli(*args):
    return subprocess.run([sys.executable, str(HERE / "compare.py"), *args], capture_output=True,
                          text=True, timeout=600)


def test_compare_defaults_are_smaller_and_yield_to_flags():
    """compare.py shrinks the model and steps unless the command line sets them."""
    cfg = compare.parse_config([])
    assert (cfg.n_layer, cfg.n_embd, cfg.max_steps, cfg.compile) == (2, 64, 1000, "off")
    assert (cfg.seeds, cfg.base_steps, cfg.workers) == (4, 6000, 0)
    assert cfg.out_dir == "out/compare" and cfg.lr_sweep == (0.1, 0.33, 1.0)
    assert cfg.dpo_lr_sweep == (0.1, 0.33, 1.0, 3.0)
    given = compare.parse_config(["--n-layer", "3", "--max-steps", "2000", "--lr-sweep", "2"])
    assert (given.n_layer, given.n_embd, given.max_steps, given.lr_sweep) == (3, 64, 2000, (2.0,))


@pytest.mark.parametrize("args, message", [
    (["--loss", "sft"], "unrecognized arguments: --loss sft"),
    (["--lr", "1e-3"], "unrecognized arguments: --lr"),
    (["--seeds", "0"], "--seeds must lie in [1, 1000]"),
    (["--lr-sweep", "1", "-2"], "--lr-sweep must be distinct positive numbers"),
    (["--lr-sweep", "1", "1"], "--lr-sweep must be distinct positive numbers"),
    (["--lr-sweep", "1", "x"], "argument --lr-sweep: invalid finite value: 'x'"),
    (["--lr-sweep", "1", "nan"], "argument --lr-sweep: must be a finite number, got nan"),
    (["--dpo-lr-sweep", "0"], "--dpo-lr-sweep must be distinct positive numbers"),
    (["--workers", "-1"], "--workers must lie in [0, 64] (0: automatic)"),
    (["--lam", "1.5"], "--lam must lie in [0, 1]"),
    (["--dpo-beta", "inf"], "argument --dpo-beta: must be a finite number, got inf"),
])
def test_compare_bad_input_is_one_line(args, message):
    """Bad flags exit with status 2 and one line naming the problem, no traceback."""
    r = run_cli(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_paired_verdicts_from_the_t_interval():
    """Mean, sample std and 95% t half-width of paired differences decide the verdict."""
    p = compare.paired([0.10, 0.11, 0.12, 0.13, 0.14])
    assert p["mean"] == pytest.approx(0.12) and p["std"] == pytest.approx(math.sqrt(2.5e-4))
    assert p["ci95"] == pytest.approx(2.78 * math.sqrt(2.5e-4) / math.sqrt(5))
    assert p["verdict"] == "reproduced"
    # the same std needs 5 seeds for a half-width <= 0.02: 4 give 3.18 * 0.0158 / 2 = 0.025
    assert p["seeds_needed"] == 5 and compare.half_width(p["std"], 4) > compare.POWER
    assert compare.paired([-0.10, -0.11, -0.12, -0.13, -0.14])["verdict"] == "not reproduced"
    # mean 0.2 but t(2) = 4.30: half-width 4.30 * 0.1 / sqrt(3) = 0.248 > 0.2
    assert compare.paired([0.1, 0.2, 0.3])["verdict"] == "within noise"
    one = compare.paired([0.05])
    assert one["std"] is None and "no spread" in one["verdict"]


def test_compare_recipes_share_the_step_budget():
    """Both sequential stages add up to one single-stage run; IFT at SFT's FLOPs gets 3/4 of it."""
    recipes = {r["name"]: r for r in compare.compare_recipes(1000)}
    assert len(recipes) == 14
    assert recipes["sft (stage 1)"]["steps"] + recipes["sft then ift"]["steps"] == 1000
    assert recipes["ift at sft's flops"]["steps"] * ift.IFT_COST == pytest.approx(1000)
    assert recipes["sft then dpo"]["start"] == "sft (stage 1)"
    assert {recipes[n]["data"] for n in ("sft (stage 1)", "sft then sft")} == {"train_a", "train_b"}
    assert recipes["ift, lam 0"]["overrides"] == {"lam": 0.0}
    assert recipes["ift, lam 0"]["lr_of"] == "ift"


def fake_result(job):
    """A finished run whose validation scores are a fixed function of its recipe and lr: exact
    match peaks at 1x the default lr (DPO: 0.5x), preference accuracy at 1x (SFT: 0.5x), where
    SFT and SFT then DPO reach 1.0 and the others 0.9."""
    name, m = job.recipe["name"], job.lr / ift.DEFAULT_LR[job.recipe["loss"]]
    exact = 1 - abs(math.log(m / (0.5 if "dpo" in name else 1.0)))
    pref = (1.0 if name in ("sft", "sft then dpo") else 0.9) - abs(
        math.log(m / (0.5 if name == "sft" else 1.0)))
    return {"recipe": name, "seed": job.seed, "lr": job.lr, "ckpt": f"{name}|{job.seed}|{job.lr:g}",
            "seconds": 1.0, "val_exact_match": exact, "val_nll": 1 - exact,
            "val_preference_accuracy": pref,
            "test": {"exact_match": exact, "preference_accuracy": pref, "nll": 1 - exact,
                     "exact_match_by_task": {}}}


def test_phases_start_every_run_from_its_checkpoint_at_its_chosen_lr():
    """train_all's four phases, with a fake trainer: what each runs, from where, at what lr."""
    cfg = compare.parse_config(["--lr-sweep", "0.5", "1", "--dpo-lr-sweep", "0.5", "1"])
    recipes, seeds = compare.compare_recipes(4), [1337, 1338, 1339]
    base = {"recipe": compare.BASE, "lr": 5e-3, "ckpt": "base", "seconds": 1.0}
    phases = []

    def run(fn, jobs):
        assert fn is compare.worker_run
        phases.append(list(jobs))
        return map(fake_result, phases[-1])
    progress = compare.Progress(1e9, 0, 0.0)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(compare.Progress, "report", lambda self, job, res: None)
        done, lrs, lrs_pa, sweep, claim_c = compare.train_all(cfg, run, progress, recipes,
                                                               seeds, base)
    assert len(phases) == 4 and len(done) == sum(len(p) for p in phases)
    # 1: the first seed's sweeps from the base, longest runs first (DPO, ORPO: pairs)
    assert {(j.recipe["name"], j.seed, j.init_from) for j in phases[0]} == {
        (n, 1337, "base") for n in ("sft", "ift", "orpo", "dpo")}
    assert all(j.sweep for j in phases[0]) and phases[0][0].recipe["loss"] in ("dpo", "orpo")
    # the lrs at which the fake scores peak
    assert lrs == {"sft": 5e-3, "ift": 5e-3, "orpo": 5e-3, "dpo": 1e-5, "sft then sft": 5e-3,
                   "sft then ift": 5e-3, "sft then orpo": 5e-3, "sft then dpo": 1e-5}
    assert lrs_pa["sft"] == 2.5e-3 and lrs_pa["dpo"] == lrs_pa["sft then dpo"] == 2e-5
    # 2: stage 1 of every seed, at SFT's lr, from the base
    assert [(j.recipe["name"], j.seed, j.lr) for j in phases[1]] == [
        ("sft (stage 1)", s, 5e-3) for s in seeds]
    # 3: stage-2 sweeps start from the first seed's stage 1; ablations take IFT's lr
    stage2 = [j for j in phases[2] if j.sweep]
    assert {j.init_from for j in stage2} == {"sft (stage 1)|1337|0.005"}
    assert {j.lr for j in phases[2] if j.recipe["lr_of"] == "ift" and not j.sweep} == {5e-3}
    assert {j.seed for j in phases[2] if j.recipe["name"] == "sft"} == {1338, 1339}
    # 4: later seeds' stage 2 from their own stage 1, and claim (c)'s runs at their lr
    for j in phases[3]:
        assert j.seed != 1337 and j.init_from in ("base", f"sft (stage 1)|{j.seed}|0.005")
    assert claim_c == ("sft then dpo", "sft")
    assert {(j.recipe["name"], j.lr) for j in phases[3] if j.lr != lrs[j.recipe["lr_of"]]} == {
        ("sft", 2.5e-3), ("sft then dpo", 2e-5)}
    assert len(sweep) == 16 and sum(r["chosen_for_exact_match"] for r in sweep) == 8


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
    """The claims table flags a side whose change from its start is within noise or below 0."""
    up, flat, down = (compare.paired(d) for d in ([0.10, 0.12, 0.11], [0.01, -0.01, 0.0],
                                                   [-0.10, -0.12, -0.11]))
    assert compare.moved_cell("sft", up) == f"sft +0.110 ± {up['ci95']:.3f}"
    assert compare.moved_cell("dpo", flat).endswith(": did not move**")
    assert compare.moved_cell("dpo", down).endswith(": worse than its start**")


# -----------------------------------------------------------------------------
# one tiny comparison through the command line, checked by the tests below

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """python compare.py over two seeds, two runs at a time: its folder, output and records."""
    out = tmp_path_factory.mktemp("cmp")
    r = run_cli("--seeds", "2", "--workers", "2", *TINY, "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "compare.json").read_text())
    return SimpleNamespace(out=out, stdout=r.stdout, res=res,
                           runs={(x["recipe"], x["seed"]): x for x in res["runs"]})


def run_config(run):
    """The config.json of a run's folder."""
    return json.loads((Path(run["ckpt"]).parent / "config.json").read_text())


def test_every_recipe_fine_tunes_the_one_base_model(tiny):
    """Every recipe of every seed is in the table; single stages and stage 1 start from the base."""
    names = [row["recipe"] for row in tiny.res["summary"]]
    assert names == [compare.BASE] + [r["name"] for r in compare.compare_recipes(4)]
    assert len(tiny.runs) == 14 * 2 and tiny.res["seeds"] == list(SEEDS)
    for name in ("sft", "dpo", "sft (stage 1)"):
        assert run_config(tiny.runs[(name, 1338)])["init_from"] == tiny.res["base"]["ckpt"]
    assert not {"loss", "lr", "init_from"} & set(tiny.res["config"])  # each recipe sets its own
    assert "(sweep)" in tiny.stdout and "left" in tiny.stdout


def test_sweep_keeps_the_best_validation_lr_for_each_metric(tiny):
    """Two lrs per swept recipe on the first seed; the best validation score is chosen."""
    sweep = tiny.res["sweep"]
    swept = {s["recipe"] for s in sweep}
    assert len(swept) == 8 and len(sweep) == 16
    for name in swept:
        tried = [s for s in sweep if s["recipe"] == name]
        for metric in ("exact_match", "preference_accuracy"):
            best = max(tried, key=lambda s: (s["val_" + metric], -s["val_nll"]))
            assert [s["chosen_for_" + metric] for s in tried].count(True) == 1
            assert best["chosen_for_" + metric]
        chosen = next(s for s in tried if s["chosen_for_exact_match"])
        assert tiny.runs[(name, 1338)]["lr"] == chosen["lr"]
    lr = {row["recipe"]: row["lr"] for row in tiny.res["summary"]}
    assert lr["ift, noisy lam"] == lr["ift at sft's flops"] == lr["ift"]
    assert lr["sft (stage 1)"] == lr["sft"]


def test_stage_two_starts_from_the_same_seeds_stage_one(tiny):
    """Stage 2 fine-tunes the same seed's stage-1 checkpoint; DPO then uses it as reference."""
    stage2 = tiny.runs[("sft then dpo", 1338)]
    assert run_config(stage2)["init_from"] == tiny.runs[("sft (stage 1)", 1338)]["ckpt"]
    log = (Path(stage2["ckpt"]).parent / "train.log").read_text()
    assert "reference is the random initial model" not in log


def test_claims_are_paired_test_differences(tiny):
    """Each claim's differences are the test metrics of its two recipes, seed by seed."""
    claim = next(c for c in tiny.res["claims"] if c["claim"] == "d")
    assert {c["claim"] for c in tiny.res["claims"]} == {"a", "a'", "b", "c", "d"}

    def exact(name, s):
        return tiny.runs[(name, s)]["test"]["exact_match"]
    assert claim["diffs"] == pytest.approx([exact("sft then ift", s) - exact("sft then sft", s)
                                            for s in SEEDS])
    assert claim["moved"]["sft then ift"]["diffs"] == pytest.approx(
        [exact("sft then ift", s) - exact("sft (stage 1)", s) for s in SEEDS])


def test_claim_c_is_picked_and_tuned_on_validation_preference_accuracy(tiny):
    """Claim (c): both sides picked on validation preference accuracy at their lr tuned for it,
    judged on the test preference accuracy of those runs."""
    c = next(c for c in tiny.res["claims"] if c["claim"] == "c")
    pa = {s["recipe"]: (s["val_preference_accuracy"], -s["val_nll"]) for s in tiny.res["sweep"]
          if s["chosen_for_preference_accuracy"]}
    assert c["recipe"] == max((n for n in pa if n.endswith("dpo")), key=pa.get)
    assert c["other"] == max((n for n in pa if not n.endswith("dpo")), key=pa.get)
    c_runs = {(x["recipe"], x["seed"]): x for x in tiny.res["claim_c_runs"]}
    assert {x["lr"] for x in c_runs.values() if x["recipe"] == c["recipe"]} == {
        tiny.res["lr_for_preference_accuracy"][c["recipe"]]}
    assert c["diffs"] == pytest.approx([c_runs[(c["recipe"], s)]["test"]["preference_accuracy"]
                                        - c_runs[(c["other"], s)]["test"]["preference_accuracy"]
                                        for s in SEEDS])


def test_reports_and_figures_are_written(tiny):
    """compare.md has well-formed tables and the command; the figures and summary.json exist."""
    md = (tiny.out / "compare.md").read_text()
    assert "python compare.py --seeds 2" in md and "| ift, gamma 0 |" in md
    lines = md.splitlines()
    for i, line in enumerate(lines):  # every markdown table: header, delimiter, rows alike
        if line.startswith("|---"):
            assert {lines[j].count("|") for j in range(i - 1, i + 2)} == {line.count("|")}
    for name in ("claims.png", "families.png"):
        assert (tiny.out / name).read_bytes()[:4] == b"\x89PNG"
    small = json.loads((tiny.out / "summary.json").read_text())
    assert small["regenerate"].startswith("python compare.py --seeds 2")
    row = next(row for row in tiny.res["summary"] if row["recipe"] == "ift, gamma 0")
    assert small["recipes"]["ift, gamma 0"]["exact_match"] == {"mean": row["exact_match"][0],
                                                             "std": row["exact_match"][1]}
    assert [c["diffs"] for c in small["claims"]] == [c["diffs"] for c in tiny.res["claims"]]
    assert small["claims"][0]["ci95"] == tiny.res["claims"][0]["ci95"]


def test_mechanism_on_the_comparisons_checkpoints(tiny):
    """--mechanism: one row per recipe, per seed and distance; verdicts against SFT's gap."""
    r = run_cli("--mechanism", "--out-dir", str(tiny.out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    mech = json.loads((tiny.out / "mechanism.json").read_text())
    assert list(mech["recipes"]) == list(compare.MECHANISM_RECIPES)
    assert [v["recipe"] for v in mech["verdicts"]] == list(compare.MECHANISM_RECIPES[1:])
    gap = mech["recipes"]["ift"]["gap"]  # per seed, per distance (+ all distances)
    assert len(gap) == 2 and len(gap[0]) == compare.MAX_DISTANCE + 1
    sft = mech["recipes"]["sft"]["gap"]
    assert mech["verdicts"][0]["diffs"] == pytest.approx([s[-1] - i[-1] for s, i in zip(sft, gap)])
    assert (tiny.out / "mechanism.png").read_bytes()[:4] == b"\x89PNG"
    assert "| ift, noisy lam |" in (tiny.out / "mechanism.md").read_text()


def test_one_worker_reuses_the_base_and_trains_as_two_workers_did(tiny, tmp_path):
    """A second comparison beside the same base reuses it; one run at a time, in this process,
    it trains seed 1337 exactly as the two worker processes did."""
    shutil.copytree(tiny.out / "base", tmp_path / "base")
    r = run_cli("--seeds", "1", "--workers", "1", *TINY, "--out-dir", str(tmp_path))
    assert r.returncode == 0 and "base model: reusing" in r.stdout, r.stderr
    again = json.loads((tmp_path / "compare.json").read_text())
    assert again["base"] == tiny.res["base"]
    choices = ("recipe", "lr", "chosen_for_exact_match", "chosen_for_preference_accuracy")
    assert [[s[k] for k in choices] for s in again["sweep"]] == [[s[k] for k in choices]
                                                                for s in tiny.res["sweep"]]
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
