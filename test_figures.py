"""Tests of figures.py: the numbers its teaching figure draws, against ift.py's derivation, and
the command line end to end. Run: pytest -q"""

import subprocess
import sys
from pathlib import Path

import pytest

import figures

HERE = Path(__file__).resolve().parent


def test_the_figure_draws_the_closed_form_and_the_worked_example(tmp_path):
    """Left panel: S_t = (1 - gamma^(N - t)) / (1 - gamma), rescaled to mean 1 (gamma 0: all 1).
    Right panel: the worked example's coefficients as ift.py's derivation states them."""
    cfg = figures.FigureConfig(tokens=10, gammas=(0.0, 0.9))
    drawn = figures.plot_relation_weights(cfg, tmp_path / "f.png")
    assert drawn["weights"][0.0] == [1.0] * 10
    S = [(1 - 0.9 ** (10 - t)) / (1 - 0.9) for t in range(10)]
    assert drawn["weights"][0.9] == pytest.approx([s * 10 / sum(S) for s in S], rel=1e-5)
    assert drawn["coefficients"][False] == pytest.approx(
        [.318, .158, .105, .055, .167, -.053, -.112, -.167], abs=6e-4)
    assert all(c > 0 for c in drawn["coefficients"][True])
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_writes_the_figure_and_refuses_bad_input_in_one_line(tmp_path):
    """python figures.py writes relation_weights.png; a bad --gammas is one line, status 2."""
    r = subprocess.run([sys.executable, str(HERE / "figures.py"), "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "relation_weights.png").stat().st_size > 0
    assert "+0.318 +0.158 +0.105 +0.055 +0.167 -0.053 -0.112 -0.167" in r.stdout
    for args, message in ((["--gammas", "0.9", "1.5"], "--gammas must lie in [0, 1]"),
                          (["--tokens", "nan"], "invalid int value: 'nan'")):
        r = subprocess.run([sys.executable, str(HERE / "figures.py"), *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
