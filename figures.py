"""
The lesson's teaching figure, drawn from ift.py's own relation_weights: what relation propagation
does to an answer's token losses, and what its gradient does with them.

    python figures.py                    # writes out/figures/relation_weights.png
    python figures.py --help

Left: the relation weights w_t along an answer of N tokens whose losses are all equal, for a few
gamma (ift.py's derivation above relation_weights: early tokens weigh more, the more so the
closer gamma is to 1; gamma = 0 gives SFT's uniform weights). Right: the worked example of that
derivation, losses [2 .1 .1 .1 3 .1 .1 .1] at gamma 0.95: the coefficient dL/dl_j with which each
token loss enters the gradient, through the weights (the official code, ift.py's default) and
with the weights detached (--detach-weights). Through the weights, the late low-loss tokens get
negative coefficients: training pushes their losses up.
"""

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import ift
import plumbing

WORKED_EXAMPLE = [2, .1, .1, .1, 3, .1, .1, .1]  # token losses, as in ift.py's derivation


@dataclass
class FigureConfig:
    out_dir: str = plumbing.arg("out/figures", "output folder")
    tokens: int = plumbing.arg(20, "answer length N of the left panel")
    gammas: tuple = plumbing.arg((0.0, 0.8, 0.9, 0.95, 0.99), "gammas of the left panel, in [0, 1]")


def figure_problem(cfg):
    if not 2 <= cfg.tokens <= 1000:
        return f"--tokens must lie in [2, 1000], got {cfg.tokens}"
    if not all(0 <= g <= 1 for g in cfg.gammas):
        return f"--gammas must lie in [0, 1], got {' '.join(map(str, cfg.gammas))}"
    return None


def weights_for_equal_losses(n, gamma):
    """relation_weights of n equal token losses: (n,)."""
    return ift.relation_weights(torch.ones(1, n), torch.ones(1, n, dtype=torch.bool), gamma)[0]


def coefficients(losses, gamma, detach):
    """dL/dl_j of one sequence's IFT loss L = (1/N) sum_t l_t w_t, by autograd: (N,)."""
    l = torch.tensor([losses], dtype=torch.float64, requires_grad=True)   # (1, N)
    mask = torch.ones_like(l, dtype=torch.bool)
    ((l * ift.relation_weights(l, mask, gamma, detach=detach)).sum() / l.shape[1]).backward()
    return l.grad[0]


def plot_relation_weights(cfg, path):
    """The figure (see the docstring); returns what it drew, for the tests."""
    plt = plumbing.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    drawn = {"weights": {}, "coefficients": {}}
    for gamma in cfg.gammas:
        w = drawn["weights"][gamma] = weights_for_equal_losses(cfg.tokens, gamma).tolist()
        left.plot(range(1, cfg.tokens + 1), w, marker="o", ms=3, label=f"gamma {gamma:g}")
    left.set(xlabel="answer token t", ylabel="relation weight w_t (mean 1)",
             title=f"equal token losses, N = {cfg.tokens}")
    left.legend(fontsize=8)
    j = list(range(1, len(WORKED_EXAMPLE) + 1))
    for k, (detach, label) in enumerate(((False, "through the weights (official code)"),
                                         (True, "weights detached (--detach-weights)"))):
        c = drawn["coefficients"][detach] = coefficients(WORKED_EXAMPLE, 0.95, detach).tolist()
        right.bar([t + (k - 0.5) * 0.38 for t in j], c, width=0.38, label=label)
    right.axhline(0, color="black", lw=0.8)
    right.set_xticks(j, [f"{t}\nl={loss:g}" for t, loss in zip(j, WORKED_EXAMPLE)], fontsize=8)
    right.set(xlabel="answer token j and its loss", ylabel="dL / dl_j",
              title="the worked example, gamma 0.95")
    right.legend(fontsize=8)
    fig.suptitle("ift.relation_weights: early tokens weigh more; through the weights, late "
                 "low-loss tokens are pushed up", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def main(argv=None):
    cfg = plumbing.parse_flags(FigureConfig, argv, check=figure_problem,
                          description=__doc__.split("\n\n")[0].strip())
    print("config: " + json.dumps(dataclasses.asdict(cfg)), flush=True)
    try:
        out_dir = Path(cfg.out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise plumbing.UserError(f"--out-dir {out_dir}: cannot write there "
                                     f"({e.strerror})") from None
        path = out_dir / "relation_weights.png"
        drawn = plot_relation_weights(cfg, path)
        c = drawn["coefficients"][False]
        print("worked example, dL/dl through the weights: " + " ".join(f"{x:+.3f}" for x in c))
        print(f"wrote {path}")
    except plumbing.UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
