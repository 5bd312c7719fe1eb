"""Tests of bench.py: one tiny benchmark through the real command line. Run: pytest -q"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "8",
        "--limit-rows", "24", "--device", "cpu"]
# one thread: a process whose threads outnumber the free cores can run many times slower
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(HERE / "bench.py"), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_cli_bench_writes_every_row_and_ratio(tmp_path):
    """bench.py via the real CLI: bench.json has the 4 losses, the LM row and ratios; DPO = ln 2."""
    r = run_cli("--steps", "2", "--out-dir", str(tmp_path), *TINY, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "bench.json").read_text())
    assert set(res["rows"]) == {"nanogpt", "sft", "ift", "dpo", "orpo"}
    assert set(res["ratios"]) == {"ift/sft", "dpo/sft", "orpo/sft", "sft/nanogpt"}
    assert all(v > 0 for v in res["ratios"].values()) and res["threads"] >= 1
    rows = res["rows"]
    assert rows["sft"]["ratio_to_sft"] == 1 and all(r["ms_per_step"] > 0 for r in rows.values())
    # the reference is the model itself before the first step: DPO's loss is ln 2 there
    assert rows["dpo"]["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # IFT's no-grad pass keeps no activations: it saves what SFT saves, plus the embedding mix
    assert rows["sft"]["saved_mib"] < rows["ift"]["saved_mib"] < 1.1 * rows["sft"]["saved_mib"]
    assert "IFT/SFT" in r.stdout and "lm (nanoGPT)" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must lie in [1, 10000]"),
    (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["--loss", "sft"], "unrecognized arguments: --loss"),
    (["--lam", "2"], "--lam must lie in [0, 1]"),
])
def test_bench_bad_input_is_one_line(args, message):
    """Bad flags exit with status 2 and one line naming the problem, no traceback."""
    r = run_cli(*args)
    assert r.returncode == 2 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
