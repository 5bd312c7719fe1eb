"""Tests of compare.py: the verdicts, the recipes, the defaults and one tiny end-to-end run.
Run: pytest -q"""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import compare

HERE = Path(__file__).resolve().parent


def run_cli(*args):
    return subprocess.run([sys.executable, str(HERE / "compare.py"), *args], capture_output=True,
                          text=True, timeout=600)


def test_compare_defaults_are_smaller_and_yield_to_flags():
    """compare.py shrinks the model and steps unless the command line sets them."""
    cfg = compare.parse_config([])
    assert (cfg.n_layer, cfg.n_embd, cfg.max_steps, cfg.compile) == (2, 64, 1000, "off")
    assert (cfg.seeds, cfg.base_steps, cfg.workers) == (7, 6000, 0)
    assert cfg.out_dir == "out/compare" and cfg.lr_sweep == (0.1, 0.33, 1.0)
    assert cfg.dpo_lr_sweep == (0.1, 0.33, 1.0, 3.0)
    given = compare.parse_config(["--n-layer", "3", "--max-steps", "2000", "--lr-sweep", "2"])
    assert (given.n_layer, given.n_embd, given.max_steps, given.lr_sweep) == (3, 64, 2000, (2.0,))


@pytest.mark.parametrize("args, message", [
    (["--loss", "sft"], "unrecognized arguments: --loss sft"),
    (["--lr", "1e-3"], "unrecognized arguments: --lr"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--lr-sweep", "1", "-2"], "--lr-sweep must be positive numbers"),
    (["--lr-sweep", "1", "x"], "invalid float value: 'x'"),
    (["--dpo-lr-sweep", "0"], "--dpo-lr-sweep must be positive numbers"),
    (["--workers", "-1"], "--workers must be >= 0 (0: automatic)"),
    (["--lam", "1.5"], "--lam must lie in [0, 1]"),
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
    assert recipes["ift at sft's flops"]["steps"] * compare.IFT_COST == pytest.approx(1000)
    assert recipes["sft then dpo"]["start"] == "sft (stage 1)"
    assert {recipes[n]["data"] for n in ("sft (stage 1)", "sft then sft")} == {"train_a", "train_b"}
    assert recipes["ift, lam 0"]["overrides"] == {"lam": 0.0}
    assert recipes["ift, lam 0"]["lr_of"] == "ift"


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
    copy = compare.recovery_counts(RuleModel("copy"), seqs, pad_id=0, device="cpu")
    # per distance d = 1..4: [tokens scored, right after a clean prefix, right after the mistake]
    assert copy.tolist() == [[5, 5, 0], [3, 3, 3], [2, 2, 2], [1, 1, 1]]
    blind = compare.recovery_counts(RuleModel("constant"), seqs, pad_id=0, device="cpu")
    assert blind.tolist() == [[5, 5, 5], [3, 3, 3], [2, 2, 2], [1, 1, 1]]


def test_a_side_that_did_not_move_or_moved_backwards_is_flagged():
    """The claims table flags a side whose change from its start is within noise or below 0."""
    up, flat, down = (compare.paired(d) for d in ([0.10, 0.12, 0.11], [0.01, -0.01, 0.0],
                                                   [-0.10, -0.12, -0.11]))
    assert compare.moved_cell("sft", up) == f"sft +0.110 ± {up['ci95']:.3f}"
    assert compare.moved_cell("dpo", flat).endswith(": did not move**")
    assert compare.moved_cell("dpo", down).endswith(": worse than its start**")


def test_cli_compare_end_to_end(tmp_path):
    """A tiny compare.py over two seeds: base, every recipe, the sweep, claims and all outputs."""
    out = tmp_path / "cmp"
    args = ["--seeds", "2", "--max-steps", "4", "--base-steps", "4", "--lr-sweep", "0.5", "1",
            "--dpo-lr-sweep", "0.5", "1", "--workers", "2",
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "8",
            "--eval-interval", "2", "--limit-rows", "32", "--max-new-tokens", "8",
            "--device", "cpu", "--out-dir", str(out)]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "(sweep)" in r.stdout and "left" in r.stdout and "compare.png" in r.stdout
    res = json.loads((out / "compare.json").read_text())
    names = [row["recipe"] for row in res["summary"]]
    assert names == [compare.BASE] + [r["name"] for r in compare.compare_recipes(4)]
    runs = {(run["recipe"], run["seed"]): run for run in res["runs"]}
    # every single-stage recipe and stage 1 fine-tune the one base model; DPO's reference is it
    base_ckpt = res["base"]["ckpt"]
    for name in ("sft", "dpo", "sft (stage 1)"):
        run_dir = Path(runs[(name, 1338)]["ckpt"]).parent
        assert json.loads((run_dir / "config.json").read_text())["init_from"] == base_ckpt
    assert len(runs) == 14 * 2 and res["seeds"] == [1337, 1338]
    assert not {"loss", "lr", "init_from"} & set(res["config"])  # each recipe sets its own
    # the sweep: two lrs per swept recipe on the first seed, the best validation score chosen
    swept = {s["recipe"] for s in res["sweep"]}
    assert len(swept) == 8 and len(res["sweep"]) == 16
    for name in swept:
        tried = [s for s in res["sweep"] if s["recipe"] == name]
        for metric in ("exact_match", "preference_accuracy"):
            best = max(tried, key=lambda s: (s["val_" + metric], -s["val_nll"]))
            assert [s["chosen_for_" + metric] for s in tried].count(True) == 1
            assert best["chosen_for_" + metric]
        best = next(s for s in tried if s["chosen_for_exact_match"])
        assert runs[(name, 1338)]["lr"] == best["lr"]
    lr = {row["recipe"]: row["lr"] for row in res["summary"]}
    assert lr["ift, noisy lam"] == lr["ift at sft's flops"] == lr["ift"]
    assert lr["sft (stage 1)"] == lr["sft"]
    # stage 2 starts from the same seed's stage-1 checkpoint; DPO then uses it as reference
    stage2 = Path(runs[("sft then dpo", 1338)]["ckpt"]).parent
    init = json.loads((stage2 / "config.json").read_text())["init_from"]
    assert init == runs[("sft (stage 1)", 1338)]["ckpt"]
    assert "reference is the random initial model" not in (stage2 / "train.log").read_text()
    # claims are the paired differences of the test metrics, seed by seed
    claim = next(c for c in res["claims"] if c["claim"] == "d")
    want = [runs[("sft then ift", s)]["test"]["exact_match"]
            - runs[("sft then sft", s)]["test"]["exact_match"] for s in (1337, 1338)]
    assert claim["diffs"] == pytest.approx(want)
    assert {c["claim"] for c in res["claims"]} == {"a", "a'", "b", "c", "d"}
    assert claim["moved"]["sft then ift"]["diffs"] == pytest.approx(
        [runs[("sft then ift", s)]["test"]["exact_match"]
         - runs[("sft (stage 1)", s)]["test"]["exact_match"] for s in (1337, 1338)])
    # claim (c): both sides picked on validation preference accuracy at their lr tuned for it,
    # judged on the test preference accuracy of those runs
    c = next(c for c in res["claims"] if c["claim"] == "c")
    pa = {s["recipe"]: (s["val_preference_accuracy"], -s["val_nll"]) for s in res["sweep"]
          if s["chosen_for_preference_accuracy"]}
    assert c["recipe"] == max((n for n in pa if n.endswith("dpo")), key=pa.get)
    assert c["other"] == max((n for n in pa if not n.endswith("dpo")), key=pa.get)
    c_runs = {(x["recipe"], x["seed"]): x for x in res["claim_c_runs"]}
    assert {x["lr"] for x in c_runs.values() if x["recipe"] == c["recipe"]} == {
        res["lr_for_preference_accuracy"][c["recipe"]]}
    assert c["diffs"] == pytest.approx([c_runs[(c["recipe"], s)]["test"]["preference_accuracy"]
                                        - c_runs[(c["other"], s)]["test"]["preference_accuracy"]
                                        for s in (1337, 1338)])
    md = (out / "compare.md").read_text()
    assert "python compare.py --seeds 2" in md and "| ift, gamma 0 |" in md
    lines = md.splitlines()
    for i, line in enumerate(lines):  # every markdown table: header, delimiter, rows alike
        if line.startswith("|---"):
            assert {lines[j].count("|") for j in range(i - 1, i + 2)} == {line.count("|")}
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # summary.json: the tables' numbers, as compare.json has them
    small = json.loads((out / "summary.json").read_text())
    assert small["regenerate"].startswith("python compare.py --seeds 2")
    row = next(row for row in res["summary"] if row["recipe"] == "ift, gamma 0")
    assert small["recipes"]["ift, gamma 0"]["exact_match"] == {"mean": row["exact_match"][0],
                                                             "std": row["exact_match"][1]}
    assert [c["diffs"] for c in small["claims"]] == [c["diffs"] for c in res["claims"]]
    assert small["claims"][0]["ci95"] == res["claims"][0]["ci95"]
    # the mechanism, measured on these checkpoints: one row per recipe, verdicts against SFT
    r = run_cli("--mechanism", "--out-dir", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    mech = json.loads((out / "mechanism.json").read_text())
    assert list(mech["recipes"]) == list(compare.MECHANISM_RECIPES)
    assert [v["recipe"] for v in mech["verdicts"]] == list(compare.MECHANISM_RECIPES[1:])
    gap = mech["recipes"]["ift"]["gap"]  # per seed, per distance (+ all distances)
    assert len(gap) == 2 and len(gap[0]) == compare.MAX_DISTANCE + 1
    sft, ift = mech["recipes"]["sft"]["gap"], gap
    assert mech["verdicts"][0]["diffs"] == pytest.approx([s[-1] - i[-1] for s, i in zip(sft, ift)])
    assert (out / "mechanism.png").read_bytes()[:4] == b"\x89PNG"
    assert "| ift, noisy lam |" in (out / "mechanism.md").read_text()
    # a second comparison with the same settings reuses the base model instead of training it;
    # one run at a time, in this process, it trains seed 1337 as the two worker processes did
    one = args[:args.index("--seeds")] + ["--seeds", "1"] + args[args.index("--seeds") + 2:]
    r = run_cli(*one[:one.index("--workers")], "--workers", "1", *one[one.index("--workers") + 2:])
    assert r.returncode == 0 and "base model: reusing" in r.stdout, r.stderr
    again = json.loads((out / "compare.json").read_text())
    assert again["base"] == res["base"]
    choices = ("recipe", "lr", "chosen_for_exact_match", "chosen_for_preference_accuracy")
    assert [[s[k] for k in choices] for s in again["sweep"]] == [[s[k] for k in choices]
                                                                for s in res["sweep"]]
    for x in again["runs"]:
        want = runs[(x["recipe"], 1337)]
        assert x["lr"] == want["lr"]
        assert x["test"]["nll"] == pytest.approx(want["test"]["nll"], abs=1e-5)
    r = run_cli("--mechanism", "--out-dir", str(tmp_path / "nothing"))
    assert r.returncode == 1 and "no comparison there; run python compare.py first" in r.stderr


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
