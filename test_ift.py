"""Tests for ift.py: the losses against closed forms, the reductions the derivations claim,
gradients, masks, the tokenizer, the data checks, and tiny end-to-end runs of the real command.

    python -m pytest -q
"""

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import ift
import plumbing

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "8",
        "--max-steps", "3", "--log-interval", "1", "--eval-interval", "2", "--limit-rows", "24",
        "--max-new-tokens", "8", "--device", "cpu"]


def tiny_model(vocab=50, seed=0):
    torch.manual_seed(seed)
    return ift.GPT(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=16)


def toy_batch(vocab=50, seed=1):
    """Two sequences: prompt then answer, the second one shorter and right-padded."""
    g = torch.Generator().manual_seed(seed)
    seqs = [(torch.randint(0, vocab, (12,), generator=g).tolist(), 5),
            (torch.randint(0, vocab, (9,), generator=g).tolist(), 3)]
    return ift.make_batch(seqs, "cpu")


def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, str(HERE / "ift.py"), *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


# -----------------------------------------------------------------------------
# log-probs and masks

def test_sequence_logps_matches_cross_entropy():
    """sequence_logps equals -F.cross_entropy on the same tokens, zero off the mask."""
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    y = torch.randint(0, 11, (3, 7))
    mask = torch.rand(3, 7) > 0.4
    token_logps, logps = ift.sequence_logps(logits, y, mask)
    ce = F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1), reduction="none").view(3, 7)
    torch.testing.assert_close(token_logps, torch.where(mask, -ce, torch.zeros_like(ce)))
    torch.testing.assert_close(logps, (-ce * mask).sum(-1))


def test_make_batch_shifts_by_one_and_masks_the_answer():
    """Targets are the inputs shifted by one; the mask covers exactly the answer tokens."""
    x, y, mask = ift.make_batch([([10, 11, 12, 13, 14], 3), ([20, 21, 22], 2)], "cpu")
    assert x.tolist() == [[10, 11, 12, 13], [20, 21, 0, 0]]
    assert y.tolist() == [[11, 12, 13, 14], [21, 22, 0, 0]]
    # row 0: prompt [10 11 12], answer [13 14] -> targets 13, 14 at positions 2, 3
    assert mask.tolist() == [[False, False, True, True], [False, True, False, False]]


@pytest.mark.parametrize("loss", ["sft", "ift"])
def test_prompt_and_padding_positions_get_zero_gradient(loss):
    """Logits at prompt and padding positions receive exactly zero gradient from SFT and IFT."""
    model = tiny_model()
    x, y, mask = toy_batch()
    captured = {}

    def keep_grad(module, args, output):
        if output.requires_grad:
            output.retain_grad()
            captured["logits"] = output
    model.register_forward_hook(keep_grad)
    if loss == "sft":
        token_logps, _ = ift.sequence_logps(model(x), y, mask)
        out, _ = ift.sft_loss(token_logps, mask)
    else:
        out, _ = ift.ift_loss(model, x, y, mask, lam=0.5, gamma=0.95)
    out.backward()
    grad = captured["logits"].grad                                          # (B, T, V)
    assert grad[~mask].abs().max() == 0
    assert grad[mask].abs().max() > 0


def shift_by_hand(x, yhat, mask):
    """eq. 17's x~ in plain Python: input t+1 is yhat[t] where target t is an answer token."""
    rows = x.tolist()
    for b, t in zip(*[i.tolist() for i in mask[:, :-1].nonzero(as_tuple=True)]):
        rows[b][t + 1] = yhat[b, t].item()
    return torch.tensor(rows)


@pytest.mark.temporal_residual
@pytest.mark.exposure_bias
def test_mix_replaces_answer_inputs_only():
    """x~ takes the prediction at answer inputs (position after a masked target), x elsewhere."""
    x = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0]])
    yhat = torch.tensor([[91, 92, 93, 94, 95, 96], [81, 82, 83, 84, 85, 86]])
    mask = torch.tensor([[False, False, True, True, True, False],   # targets 2..4 are answer
                         [False, True, True, False, False, False]])  # then padding
    x_tilde = ift.shifted_predictions(x, yhat, mask)
    # row 0: inputs 3, 4, 5 hold answer tokens y[2], y[3], y[4], predicted as yhat[2..4]
    assert x_tilde.tolist() == [[1, 2, 3, 93, 94, 95], [7, 8, 82, 83, 0, 0]]
    assert x_tilde.tolist() == shift_by_hand(x, yhat, mask).tolist()
    assert x.tolist()[0] == [1, 2, 3, 4, 5, 6]  # the input is left as it was


# -----------------------------------------------------------------------------
# the losses: closed forms

def test_sft_loss_is_mean_token_nll_per_sequence_then_mean():
    """sft_loss averages over each answer's tokens, then over sequences (hand computed)."""
    token_logps = torch.tensor([[0.0, -1.0, -3.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True], [True, False, False]])
    loss, metrics = ift.sft_loss(token_logps, mask)
    assert loss.item() == pytest.approx(((1 + 3) / 2 + 2) / 2) and metrics == {}


@pytest.mark.dpo
def test_dpo_is_ln2_at_the_reference_with_closed_form_gradient():
    """DPO at pi = pi_ref is ln 2; its gradient is -beta * sigmoid(-beta h) / B per chosen logp."""
    logps = torch.tensor([-3.0, -7.0, -1.5])
    chosen = logps.clone().requires_grad_()
    loss, metrics = ift.dpo_loss(chosen, logps - 1, logps, logps - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["margins"].abs().max() == 0 and not metrics["rewards_chosen"].requires_grad
    loss.backward()
    torch.testing.assert_close(chosen.grad, torch.full((3,), -0.1 * 0.5 / 3))
    # away from the reference: loss = -log sigmoid(beta * h)
    h = torch.tensor([2.0, -1.0])
    loss, metrics = ift.dpo_loss(h, torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=0.5)
    assert loss.item() == pytest.approx(-(math.log(1 / (1 + math.exp(-1.0)))
                                          + math.log(1 / (1 + math.exp(0.5)))) / 2)
    assert metrics["accuracy"].tolist() == [1.0, 0.0]
    # the implicit rewards beta (log pi - log pi_ref), their margins, from a reference of its own
    policy_w, policy_l = torch.tensor([-2.0, -4.0]), torch.tensor([-5.0, -1.0])
    ref_w, ref_l = torch.tensor([-3.0, -3.5]), torch.tensor([-4.0, -2.5])
    loss, metrics = ift.dpo_loss(policy_w, policy_l, ref_w, ref_l, beta=0.25)
    torch.testing.assert_close(metrics["rewards_chosen"], torch.tensor([0.25, -0.125]))
    torch.testing.assert_close(metrics["rewards_rejected"], torch.tensor([-0.25, 0.375]))
    torch.testing.assert_close(metrics["margins"], torch.tensor([0.5, -0.5]))
    assert metrics["accuracy"].tolist() == [1.0, 0.0]
    h = [(-2 + 3) - (-5 + 4), (-4 + 3.5) - (-1 + 2.5)]  # [2, -2]
    assert loss.item() == pytest.approx(
        sum(math.log(1 + math.exp(-0.25 * hi)) for hi in h) / 2, rel=1e-6)


def test_orpo_matches_independent_formula():
    """orpo_loss equals -m_w - beta log sigmoid(log odds(y_w) - log odds(y_l)) computed by hand."""
    chosen, rejected = torch.tensor([-2.0, -9.0]), torch.tensor([-6.0, -3.0])
    lc, lr = torch.tensor([4.0, 3.0]), torch.tensor([3.0, 2.0])
    loss, _ = ift.orpo_loss(chosen, rejected, lc, lr, beta=0.25)
    want = 0.0
    for c, r, nc, nr in zip(chosen.tolist(), rejected.tolist(), lc.tolist(), lr.tolist()):
        pc, pr = math.exp(c / nc), math.exp(r / nr)
        log_odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
        want += (-c / nc - 0.25 * math.log(1 / (1 + math.exp(-log_odds)))) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)


# -----------------------------------------------------------------------------
# relation propagation

@pytest.mark.relation_propagation
def test_relation_weights_closed_form_for_uniform_losses():
    """Equal answer losses: S_t = (1 - gamma^(N - t)) / (N (1 - gamma)), mean 1 (~1.64->0.13),
    whatever the losses at the prompt before and the padding after the answer."""
    N, gamma = 20, 0.95
    losses = torch.cat([torch.full((1, 3), 7.0), torch.ones(1, N), torch.full((1, 4), 5.0)], 1)
    mask = torch.zeros(1, N + 7, dtype=torch.bool)
    mask[0, 3:3 + N] = True                                    # 3 prompt, N answer, 4 padding
    w = ift.relation_weights(losses, mask, gamma)
    S = torch.tensor([(1 - gamma ** (N - t)) / (1 - gamma) for t in range(N)])
    torch.testing.assert_close(w[0, 3:3 + N], S * N / S.sum())
    assert w[0, 3].item() == pytest.approx(1.6425, abs=1e-3)
    assert w[0, 2 + N].item() == pytest.approx(0.1280, abs=1e-3)
    assert w[~mask].abs().max() == 0


@pytest.mark.relation_propagation
@pytest.mark.sft_reduction
def test_relation_weights_masks_and_special_cases():
    """Zero off the answer, mean 1 on it; gamma = 0 gives the mask exactly."""
    torch.manual_seed(0)
    losses = torch.rand(3, 9) * 3
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    w = ift.relation_weights(losses, mask, 0.9)
    assert w[~mask].abs().max() == 0
    torch.testing.assert_close((w * mask).sum(-1) / mask.sum(-1), torch.ones(3))
    assert torch.equal(ift.relation_weights(losses, mask, 0.0), mask.float())


@pytest.mark.relation_propagation
def test_relation_weights_gradient_worked_example():
    """ift.py's worked gradient example: autograd = finite differences = its closed form."""
    # the closed form: dL/dl_j = (S_j + (1/N) sum_{t<=j} gamma^(j-t) (l_t - L)) / S, some of its
    # coefficients negative; with detached weights every coefficient is w_j / N > 0
    losses = torch.tensor([[2, .1, .1, .1, 3, .1, .1, .1]], requires_grad=True)
    mask = torch.ones(1, 8, dtype=torch.bool)
    ((losses * ift.relation_weights(losses, mask, 0.95)).sum() / 8).backward()
    want = torch.tensor([[.318, .158, .105, .055, .167, -.053, -.112, -.167]])
    torch.testing.assert_close(losses.grad, want, atol=6e-4, rtol=0)
    # finite differences agree with autograd
    eps, l0 = 1e-3, losses.detach().double()
    fd = []
    for j in range(8):
        d = torch.zeros_like(l0)
        d[0, j] = eps
        f = [((l * ift.relation_weights(l, mask, 0.95)).sum() / 8).item() for l in (l0 + d, l0 - d)]
        fd.append((f[0] - f[1]) / (2 * eps))
    torch.testing.assert_close(losses.grad[0].double(), torch.tensor(fd, dtype=torch.double),
                               atol=1e-5, rtol=0)
    # the closed form, term by term in plain Python
    l, g, N = l0[0].tolist(), 0.95, 8
    S = [sum(g ** (j - t) * l[j] / N for j in range(t, N)) for t in range(N)]
    L = sum(lt * St for lt, St in zip(l, S)) / sum(S)
    assert L == pytest.approx(1.135, abs=5e-4)
    closed = [(S[j] + sum(g ** (j - t) * (l[t] - L) for t in range(j + 1)) / N) / sum(S)
              for j in range(N)]
    torch.testing.assert_close(losses.grad[0].double(), torch.tensor(closed, dtype=torch.double),
                               atol=1e-6, rtol=0)
    detached = losses.detach().clone().requires_grad_()
    w = ift.relation_weights(detached, mask, 0.95, detach=True)
    ((detached * w).sum() / 8).backward()
    assert not w.requires_grad
    torch.testing.assert_close(detached.grad, w / 8)


# -----------------------------------------------------------------------------
# IFT: the reductions

@pytest.mark.temporal_residual
@pytest.mark.sft_reduction
def test_ift_with_lam0_gamma0_is_sft_in_value_and_gradient():
    """IFT with lam = 0 and gamma = 0 equals SFT exactly, loss and every parameter gradient."""
    x, y, mask = toy_batch()
    sft_model, ift_model = tiny_model(), tiny_model()
    token_logps, _ = ift.sequence_logps(sft_model(x), y, mask)
    sft, _ = ift.sft_loss(token_logps, mask)
    sft.backward()
    loss, _ = ift.ift_loss(ift_model, x, y, mask, lam=0.0, gamma=0.0)
    loss.backward()
    torch.testing.assert_close(loss, sft, rtol=0, atol=1e-7)
    for (name, p), q in zip(sft_model.named_parameters(), ift_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.sft_reduction
def test_ift_differs_from_sft_when_lam_or_gamma_is_positive():
    """Each mechanism on its own moves the loss away from SFT's (the reduction is not trivial)."""
    model = tiny_model()
    x, y, mask = toy_batch()
    token_logps, _ = ift.sequence_logps(model(x), y, mask)
    sft = ift.sft_loss(token_logps, mask)[0].item()
    assert ift.ift_loss(model, x, y, mask, lam=0.5, gamma=0.0)[0].item() != pytest.approx(sft)
    assert ift.ift_loss(model, x, y, mask, lam=0.0, gamma=0.95)[0].item() != pytest.approx(sft)


@pytest.mark.temporal_residual
@pytest.mark.exposure_bias
def test_mix_leaves_the_first_answer_token_loss_unchanged():
    """One answer token per row: IFT equals SFT for any lam and gamma (its context is unmixed)."""
    model = tiny_model()
    x, y, _ = toy_batch()
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[0, 4] = mask[1, 2] = True  # the first answer target of each row
    token_logps, _ = ift.sequence_logps(model(x), y, mask)
    sft, _ = ift.sft_loss(token_logps, mask)
    loss, _ = ift.ift_loss(model, x, y, mask, lam=1.0, gamma=0.95)
    torch.testing.assert_close(loss, sft)


def mean_answer_nll(logits, y, mask):
    """SFT's loss by F.cross_entropy: each row's mean answer-token NLL, then the mean of rows."""
    nll = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")      # (B, T)
    return ((nll * mask).sum(-1) / mask.sum(-1)).mean()


@pytest.mark.temporal_residual
@pytest.mark.exposure_bias
@pytest.mark.sft_reduction
def test_mix_uses_the_models_own_predictions():
    """lam = 1, gamma = 0: IFT is SFT on inputs x~ rebuilt here from the model's own predictions."""
    model = tiny_model()
    x, y, mask = toy_batch()
    with torch.no_grad():
        x_tilde = shift_by_hand(x, model(x).argmax(-1), mask)                # (B, T)
    assert (x_tilde != x).sum() >= 3  # the untrained model gets several answer tokens wrong
    want = mean_answer_nll(model(x_tilde), y, mask)
    got, _ = ift.ift_loss(model, x, y, mask, lam=1.0, gamma=0.0)
    torch.testing.assert_close(got, want)


@pytest.mark.temporal_residual
def test_mix_trains_the_embeddings_through_both_terms():
    """lam = 0.3, gamma = 0: loss and every gradient equal those of (1 - lam) E(x) + lam E(x~)
    built here by hand, so neither term is detached and the weights are not swapped."""
    x, y, mask = toy_batch()
    model, reference = tiny_model(), tiny_model()
    with torch.no_grad():
        x_tilde = shift_by_hand(x, reference(x).argmax(-1), mask)          # (B, T)
    E = reference.wte
    want = mean_answer_nll(reference(tok_emb=0.7 * E(x) + 0.3 * E(x_tilde)), y, mask)
    want.backward()
    got, _ = ift.ift_loss(model, x, y, mask, lam=0.3, gamma=0.0)
    got.backward()
    torch.testing.assert_close(got, want)
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_lam_schedules():
    """constant keeps lam, warmup ramps it linearly, noisy perturbs it and clamps to [0, 1]."""
    cfg = ift.Config(lam=0.2, warmup_steps=10)
    assert ift.lam_at(cfg, 5, noise=3.0) == 0.2
    cfg.lam_schedule = "warmup"
    assert ift.lam_at(cfg, 4, 0.0) == pytest.approx(0.1)
    assert ift.lam_at(cfg, 50, 0.0) == pytest.approx(0.2)
    cfg.lam_schedule = "noisy"
    assert ift.lam_at(cfg, 0, noise=1.0) == pytest.approx(0.3)
    assert ift.lam_at(cfg, 0, noise=-5.0) == 0.0


# -----------------------------------------------------------------------------
# model and generation

def test_batched_cached_generation_equals_one_by_one_full_recompute():
    """KV-cached batch generation gives the same greedy tokens as the plain loop, row by row."""
    model = tiny_model(vocab=30, seed=3).eval()
    eot = 29
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5], [3, 4, 5, 3, 4]]
    got = ift.generate(model, torch.tensor(prompts), eot, 6, torch.autocast("cpu", enabled=False))
    for prompt, answer in zip(prompts, got):
        seq, want = list(prompt), []
        for _ in range(6):
            nxt = model(torch.tensor([seq]))[0, -1].argmax().item()
            if nxt == eot:
                break
            want.append(nxt)
            seq.append(nxt)
        assert answer == want


def test_evaluate_keeps_each_row_its_own_scores_whatever_the_batches():
    """evaluate() batches rows by prompt length; each row's answer and NLL stay its own."""
    enc = ift.load_tokenizer(DATA)
    split = ift.Split(ift.load_rows(DATA / "val.jsonl", need_rejected=True, limit=40), enc, 128,
                      "val")
    torch.manual_seed(0)
    model = ift.GPT(enc.n_vocab, 128, n_layer=1, n_head=2, n_embd=32)
    off = torch.autocast("cpu", enabled=False)
    res = ift.evaluate(model, enc, split, "cpu", off, 6, batch_size=16)
    nll = {}  # task -> each row's answer NLL, scored alone
    for (ids, prompt_len), row, output in zip(split.chosen, split.rows, res["answers"]):
        answer = ift.generate(model, torch.tensor([ids[:prompt_len]]), enc.eot_token, 6, off)[0]
        assert output == enc.decode(answer)
        x, y, mask = ift.make_batch([(ids, prompt_len)], "cpu")
        _, logps = ift.sequence_logps(model(x), y, mask)
        nll.setdefault(row["task"], []).append((-logps / mask.sum(-1)).item())
    assert res["nll_by_task"] == pytest.approx({t: sum(v) / len(v) for t, v in nll.items()})


# -----------------------------------------------------------------------------
# tokenizer and data

def test_tokenizer_round_trip_digits_and_special_tokens():
    """The built-in tokenizer round-trips text, one token per digit, and the special tokens."""
    enc = ift.load_tokenizer(DATA)
    text = "Add 4821 + 3795 step by step. Ann has a red key."
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert len(enc.encode_ordinary("4821")) == 4
    ids, prompt_len = ift.encode_row(enc, "What is 1 + 2?", "3")
    assert ids[0] == enc.encode_single_token("<|user|>")
    assert ids[prompt_len - 1] == enc.encode_single_token("<|assistant|>")
    assert ids[-1] == enc.eot_token and enc.decode(ids[prompt_len:-1]) == "3"
    assert enc.n_vocab == len((DATA / "tokenizer.tiktoken").read_text().splitlines()) + 3


def test_committed_splits_are_disjoint_and_well_formed():
    """The shipped splits and pool parse, share no prompt, and every rejected answer differs."""
    splits = {n: ift.load_rows(DATA / f"{n}.jsonl", need_rejected=True)
              for n in ("train", "val", "test", "pretrain")}
    prompts = {n: {r["prompt"] for r in rows} for n, rows in splits.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["val"]
    assert not prompts["val"] & prompts["test"]
    assert not prompts["pretrain"] & (prompts["train"] | prompts["val"] | prompts["test"])
    assert all(r["chosen"] != r["rejected"] for rows in splits.values() for r in rows)


def test_facts_answer_is_the_winning_line_at_no_fixed_position():
    """facts: chosen is the one 'won' line, rejected a 'lost' one; the winner's line is uniform."""
    counts = Counter()
    for split in ("train", "val", "test", "pretrain"):
        for row in ift.load_rows(DATA / f"{split}.jsonl", need_rejected=True):
            if row["task"] == "facts":
                lines = [line.rsplit(" ", 1) for line in row["prompt"].split("\n")[1:]]
                won = [k for k, (_, result) in enumerate(lines) if result == "won"]
                assert len(won) == 1 and {r for _, r in lines} == {"won", "lost"}
                assert row["chosen"] == lines[won[0]][0]
                assert row["rejected"] in [who for who, result in lines if result == "lost"]
                counts[len(lines), won[0]] += 1
    assert set(counts) == {(n, k) for n in (3, 4) for k in range(n)}
    # three draws (train and val, the pool, the fresh test split), each cycling through the slots
    assert max(counts.values()) - min(counts.values()) <= 3


def test_data_errors_name_file_and_line(tmp_path):
    """Bad JSON and missing fields raise a UserError naming the file and the line."""
    path = tmp_path / "train.jsonl"
    good = json.dumps({"task": "t", "prompt": "p", "chosen": "c"})
    path.write_text(good + "\n{not json\n")
    with pytest.raises(plumbing.UserError, match=r"train.jsonl line 2: not valid JSON"):
        ift.load_rows(path)
    path.write_text(good + "\n" + json.dumps({"task": "t", "prompt": "p"}) + "\n")
    with pytest.raises(plumbing.UserError, match=r"line 2: missing text field 'chosen'"):
        ift.load_rows(path)
    path.write_text(good + "\n")
    assert len(ift.load_rows(path)) == 1
    with pytest.raises(plumbing.UserError, match=r"line 1: missing text field 'rejected'"):
        ift.load_rows(path, need_rejected=True)


def test_rows_longer_than_the_context_are_skipped_and_counted(capsys):
    """Split drops rows that do not fit the context and says how many and why."""
    enc = ift.load_tokenizer(DATA)
    rows = [{"task": "t", "prompt": "a b", "chosen": "c"},
            {"task": "t", "prompt": "x " * 40, "chosen": "y"}]
    split = ift.Split(rows, enc, block_size=20, name="mine.jsonl")
    assert len(split) == 1
    assert "skipped 1 of 2 rows longer than the context of 20 tokens" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# the command line, end to end

def test_cli_every_loss_and_a_sequential_recipe(tmp_path):
    """Each loss trains and evaluates through the real CLI; DPO starts from the SFT checkpoint."""
    runs = {"sft": [], "ift": ["--lam-schedule", "noisy"], "orpo": [],
            "dpo": ["--init-from", str(tmp_path / "sft" / "ckpt.pt")]}
    for loss, extra in runs.items():
        out = tmp_path / loss
        r = run_cli("--loss", loss, "--out-dir", str(out), *TINY, *extra)
        assert r.returncode == 0, r.stderr
        for name in ("config.json", "log.csv", "loss.png", "ckpt.pt", "eval.json"):
            assert (out / name).is_file(), (loss, name)
        res = json.loads((out / "eval.json").read_text())
        assert set(res["exact_match_by_task"]) == {"add", "add_steps", "facts", "reverse"}
        assert 0 <= res["preference_accuracy"] <= 1 and res["nll"] > 0
        assert math.isfinite(res["preference_margin"])  # summed log p(chosen) - log p(rejected)
        assert "step     2 | loss" in r.stdout and "overall" in r.stdout
        assert json.loads((out / "config.json").read_text())["loss"] == loss
    assert "reference is the random initial model" not in run_cli(
        "--loss", "dpo", "--out-dir", str(tmp_path / "dpo2"), *TINY, "--init-from",
        str(tmp_path / "sft" / "ckpt.pt")).stdout


def test_cli_learns_something_on_its_own_data(tmp_path):
    """--data with only three JSONL files (no tokenizer, no rejected) trains; the NLL drops."""
    rows = [{"task": "copy", "prompt": f"say {w}", "chosen": w} for w in "abcdefgh"]
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--data", str(tmp_path), "--loss", "sft", "--device", "cpu", "--n-layer", "1",
            "--n-embd", "32", "--n-head", "2", "--batch-size", "8", "--eval-interval", "0",
            "--max-new-tokens", "4", "--lr", "1e-2", "--warmup-steps", "5"]
    before = run_cli(*args, "--max-steps", "1", "--out-dir", str(tmp_path / "a"))
    after = run_cli(*args, "--max-steps", "150", "--out-dir", str(tmp_path / "b"))
    assert before.returncode == 0 and after.returncode == 0, after.stderr
    assert f"note: {tmp_path} has no tokenizer.tiktoken: using the built-in" in after.stdout
    nll = [json.loads((tmp_path / d / "eval.json").read_text())["nll"] for d in "ab"]
    assert nll[1] < 0.5 * nll[0]
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["exact_match"] > 0.5
    r = run_cli(*args, "--loss", "dpo", "--out-dir", str(tmp_path / "c"))
    assert r.returncode == 1 and "train.jsonl line 1: missing text field 'rejected'" in r.stderr


def test_prepare_regenerates_the_committed_data_byte_for_byte(tmp_path):
    """python data/prepare.py (default flags) rewrites every committed data file exactly."""
    r = subprocess.run([sys.executable, str(DATA / "prepare.py"), "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names = ("train.jsonl", "val.jsonl", "test.jsonl", "pretrain.jsonl", "tokenizer.tiktoken")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    for name in names:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_prepare_trains_a_tokenizer_on_a_users_rows(tmp_path):
    """prepare.py --tokenizer-for DIR learns a BPE on any text; ift.py uses it; no overwrite."""
    rows = [{"task": "greet", "prompt": f"greet {name}", "chosen": f"bonjour {name}, ça va?"}
            for name in ("Zoë", "Anaïs", "Jürgen", "Noémie", "Zoltán", "Ève") * 4]
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare = [sys.executable, str(DATA / "prepare.py"), "--tokenizer-for", str(tmp_path)]
    r = subprocess.run(prepare, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "tokenizer.tiktoken"
    assert f"wrote {path}" in r.stdout and "256 bytes + " in r.stdout
    enc = ift.load_tokenizer(tmp_path)
    assert enc.n_vocab > 256 + 3 and enc.n_vocab != ift.load_tokenizer(DATA).n_vocab
    text = rows[0]["chosen"]
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert len(enc.encode_ordinary(text)) < len(text.encode("utf-8"))  # merges were learned
    before = path.read_bytes()
    again = subprocess.run(prepare, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and path.read_bytes() == before
    r = run_cli("--data", str(tmp_path), "--out-dir", str(tmp_path / "out"), *TINY)
    assert r.returncode == 0, r.stderr
    assert "no tokenizer.tiktoken" not in r.stdout and f"vocab {enc.n_vocab}" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--train", "0"], "--train must lie in [1, 20000], got 0"),
    (["--merges", "-1"], "--merges must lie in [0, 5000], got -1"),
    (["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    (["--tokenizer-for", "BAD"], "train.jsonl line 1: byte 0xff at column 11 is not UTF-8"),
])
def test_prepare_bad_input_is_one_line(tmp_path, args, message):
    """prepare.py: a size out of range, a bad number or a user's file with a bad byte gives one
    line and a non-zero exit, and writes nothing."""
    (tmp_path / "train.jsonl").write_bytes(b'{"task": "\xff"}\n')
    args = [str(tmp_path) if a == "BAD" else a for a in args]
    r = subprocess.run([sys.executable, str(DATA / "prepare.py"), *args, "--out-dir",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


def test_learning_rate_defaults_per_loss():
    """--lr 0 (the default) takes the loss's entry of DEFAULT_LR; an explicit --lr wins."""
    assert ift.parse_config(["--loss", "dpo"]).lr == ift.DEFAULT_LR["dpo"] < ift.DEFAULT_LR["sft"]
    assert ift.parse_config(["--loss", "ift", "--lr", "0"]).lr == ift.DEFAULT_LR["ift"]
    assert ift.parse_config(["--loss", "dpo", "--lr", "3e-4"]).lr == 3e-4


@pytest.mark.parametrize("args, message", [
    (["--loss", "ppo"], "argument --loss: invalid choice: 'ppo'"),
    (["--lam-schedule", "cosine"], "argument --lam-schedule: invalid choice: 'cosine'"),
    (["--lam", "1.5"], "--lam must lie in [0, 1]"),
    (["--gamma", "-0.1"], "--gamma must lie in [0, 1]"),
    (["--dpo-beta", "0"], "--dpo-beta must be > 0"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--data", "/nonexistent"], "train.jsonl: data file not found"),
    (["--init-from", "/nonexistent/ckpt.pt"], "no such checkpoint"),
    (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["--dpo-beta", "inf"], "argument --dpo-beta: must be a finite number, got inf"),
    (["--gamma", "nan"], "argument --gamma: must be a finite number, got nan"),
    (["--lam", "x"], "argument --lam: invalid finite value: 'x'"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio must lie in [0, 1]"),
    (["--seed", "-1"], "--seed must lie in [0, 2^31)"),
    (["--n-embd", "0"], "must be >= 1"),
])
def test_cli_bad_input_is_one_line_and_nonzero(args, message):
    """Bad flags and paths exit non-zero with one clear line on stderr and no traceback."""
    r = run_cli(*args, "--device", "cpu")
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name, content, message", [
    ("train.jsonl", b'{"task": "t", "prompt": "p", "chosen": "c"}\n{"task": "\xe9t\xe9"}\n',
     "train.jsonl line 2: byte 0xe9 at column 11 is not UTF-8; save the file as UTF-8"),
    ("tokenizer.tiktoken", b"YQ== 0\n\xff\xfe 1\n", "tokenizer.tiktoken line 2: expected "
     "'base64 rank', got b'\\xff\\xfe 1'"),
])
def test_cli_a_bad_byte_in_a_users_file_names_the_file_and_the_line(tmp_path, name, content,
                                                                   message):
    """Bytes that are not UTF-8 (Latin-1 here) in a data file, or not base64 in a tokenizer
    file: one line naming the file and the line, non-zero exit, no traceback."""
    row = json.dumps({"task": "t", "prompt": "p", "chosen": "c"}) + "\n"
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.jsonl").write_text(row)
    (tmp_path / name).write_bytes(content)
    r = run_cli("--data", str(tmp_path), "--out-dir", str(tmp_path / "out"), *TINY)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_incompatible_or_corrupt_checkpoint_and_nan_keep_files(tmp_path):
    """A mismatched or corrupt --init-from and a NaN run fail cleanly; the checkpoint survives."""
    out = tmp_path / "sft"
    assert run_cli("--loss", "sft", "--out-dir", str(out), *TINY).returncode == 0
    ckpt = out / "ckpt.pt"
    before = ckpt.read_bytes()
    r = run_cli("--loss", "sft", "--out-dir", str(out), *TINY, "--n-embd", "64",
                "--init-from", str(ckpt))
    assert r.returncode == 1 and "incompatible model (n_embd 32 != 64)" in r.stderr
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    r = run_cli("--loss", "sft", "--out-dir", str(out), *TINY, "--init-from", str(junk))
    assert r.returncode == 1 and "not a checkpoint of ift.py" in r.stderr
    r = run_cli("--loss", "sft", "--out-dir", str(out), *TINY, "--lr", "1e30",
                "--grad-clip", "0", "--warmup-steps", "1")
    assert r.returncode == 1 and ("NaN" in r.stderr or "nan" in r.stderr), r.stderr
    assert ckpt.read_bytes() == before


# -----------------------------------------------------------------------------
# speed and scale: the output layer on a subset, skipping padding, several processes (DDP)

# One thread per process: the torchrun test puts 2 processes on a 2-core machine, and a process
# whose threads outnumber the free cores can run many times slower (its threads spin-wait).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


FOUR_ROWS = ((13, 4), (6, 2), (10, 5), (5, 3))  # (tokens, prompt length) of each row
# 11 rows in no order: attention's 4 groups of consecutive rows (3, 3, 3, 2) mix lengths
ELEVEN_ROWS = FOUR_ROWS + ((8, 2), (12, 6), (4, 2), (9, 3), (7, 4), (11, 5), (6, 3))


def ragged_batch(vocab=50, seed=4, rows=FOUR_ROWS):
    """make_batch of rows of 4 to 13 tokens (no pad id 0 inside): much of it padding."""
    g = torch.Generator().manual_seed(seed)
    seqs = [(torch.randint(1, vocab, (n,), generator=g).tolist(), p) for n, p in rows]
    return ift.make_batch(seqs, device="cpu")


def test_real_tokens_are_each_rows_inputs_and_compute_loss_counts_them():
    """real_tokens finds each row's n - 1 inputs from the mask alone; compute_loss counts them."""
    x, y, mask = ragged_batch()
    real = ift.real_tokens(mask)
    assert real.tolist() == [[t < n for t in range(12)] for n in (12, 5, 9, 4)]
    assert torch.equal(ift.OnRealTokens(ift.Unpadded(tiny_model()), mask).real, real)
    cfg, cpu = ift.Config(loss="sft", compile="off"), torch.device("cpu")
    split = SimpleNamespace(chosen=[(list(range(1, n + 2)), 1) for n in (12, 5, 9, 4)])
    _, _, ntok = ift.compute_loss(cfg, ift.wrap_for_training(cfg, tiny_model(), cpu), split,
                                  [0, 1, 2, 3], cpu, ift.autocast_for(cpu), None, 0.0)
    assert ntok == 12 + 5 + 9 + 4


@pytest.mark.parametrize("rows", [FOUR_ROWS, ELEVEN_ROWS], ids=["4 rows", "11 rows"])
@pytest.mark.parametrize("inputs", ["ids", "tok_emb"])
def test_unpadded_forward_equals_the_plain_forward_at_real_positions(inputs, rows):
    """Unpadded gives GPT.forward's logits at the real positions, one (M, V) row each; what the
    losses read of them through OnRealTokens (logits[mask], argmax) is the plain logits'."""
    model = tiny_model()
    x, _, mask = ragged_batch(rows=rows)
    args = {"idx": x} if inputs == "ids" else {"tok_emb": torch.randn(*x.shape, 16)}
    net = ift.OnRealTokens(ift.Unpadded(model), mask)
    plain, unpadded = model(**args), net(**args)             # (B, T, V), RealLogits
    assert net.wte is model.wte
    assert unpadded.rows.shape == (int(net.real.sum()), plain.shape[-1])
    for within in (net.real, mask):  # every real token, then the answer tokens
        torch.testing.assert_close(unpadded[within], plain[within], rtol=0, atol=1e-5)
    argmax = unpadded.argmax(-1)                                            # (B, T)
    assert torch.equal(argmax[net.real], plain.argmax(-1)[net.real])
    assert not argmax[~net.real].any()


@pytest.mark.parametrize("rows", [FOUR_ROWS, ELEVEN_ROWS], ids=["4 rows", "11 rows"])
@pytest.mark.parametrize("loss", ift.LOSSES)
def test_the_fast_path_gives_the_plain_paths_losses_and_gradients(loss, rows):
    """compute_loss as training calls it (wrap_for_training), by default and with --padded: the
    same loss and every parameter gradient, for each of the four losses."""
    g = torch.Generator().manual_seed(5)
    chosen = [(torch.randint(1, 50, (n,), generator=g).tolist(), p) for n, p in rows]
    rejected = [(ids[:p] + torch.randint(1, 50, (3,), generator=g).tolist(), p)
                for ids, p in chosen]
    split = SimpleNamespace(chosen=chosen, rejected=rejected, has_pairs=True)
    ref = torch.randn(len(rows), 2, generator=g) - 20                       # (N, 2)
    idx, off = list(range(len(rows)))[::-1], torch.autocast("cpu", enabled=False)
    results = []
    for padded in (True, False):
        cfg, model = ift.Config(loss=loss, padded=padded, compile="off"), tiny_model()
        net = ift.wrap_for_training(cfg, model, torch.device("cpu"))
        value, _, _ = ift.compute_loss(cfg, net, split, idx, "cpu", off, ref, 0.5)
        value.backward()
        results.append((value, {name: p.grad for name, p in model.named_parameters()}))
    (plain, plain_grads), (fast, fast_grads) = results
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_batch_not_divisible_by_the_processes_is_one_clear_line(monkeypatch, capsys):
    """Under torchrun (3 processes) a --batch-size it cannot split evenly fails in one line."""
    monkeypatch.setattr(ift, "WORLD", 3)
    with pytest.raises(SystemExit) as exit_info:
        ift.parse_config(["--batch-size", "8"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--batch-size 8 must be divisible by the 3 processes torchrun started" in err
    assert ift.parse_config(["--batch-size", "9"]).batch_size == 9


@pytest.mark.parametrize("loss", ["ift", "dpo"])
def test_torchrun_two_processes_match_one_process(tmp_path, loss):
    """torchrun with 2 CPU processes (gloo) takes the steps of one process: the same weights."""
    args = ["ift.py", "--loss", loss, *TINY]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--standalone", *args, "--out-dir", str(tmp_path / "ddp")],
                         capture_output=True, text=True, cwd=HERE, env=ONE_THREAD, timeout=300)
    assert ddp.returncode == 0, ddp.stderr
    single = subprocess.run([sys.executable, *args, "--out-dir", str(tmp_path / "one")],
                            capture_output=True, text=True, cwd=HERE, env=ONE_THREAD, timeout=300)
    assert single.returncode == 0, single.stderr
    assert "2 processes, 4 rows each" in ddp.stdout
    assert ddp.stdout.count("step     0 | loss") == 1  # only rank 0 prints

    def read(name):
        with (tmp_path / name / "log.csv").open() as f:
            steps = [int(row["step"]) for row in csv.DictReader(f)]
        evals = json.loads((tmp_path / name / "eval.json").read_text())
        return steps, evals, torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"]
    (ddp_steps, ddp_eval, ddp_weights), (steps, evals, weights) = read("ddp"), read("one")
    assert ddp_steps == steps == [0, 1, 2]
    assert ddp_weights.keys() == weights.keys()  # the unwrapped model's names, no "module."
    for name, w in weights.items():
        torch.testing.assert_close(ddp_weights[name], w, rtol=0, atol=1e-5, msg=name)
    assert ddp_eval["nll"] == pytest.approx(evals["nll"], rel=1e-4)


# -----------------------------------------------------------------------------
# plumbing shared with the other programs

@pytest.mark.parametrize("program", ["compare.py", "report.py", "bench.py", "figures.py",
                                     "frozen_lake.py", "frozen_lake_sweep.py", "ift_hf.py",
                                     "data/prepare.py", "test_ift_hf.py"])
def test_every_name_a_program_takes_from_ift_or_plumbing_exists(program):
    """What the programs beside the lesson use of ift.py and plumbing.py (ift.X, from ift import
    X), read from their source, exists: a rename in the lesson cannot break them silently."""
    import ast
    modules = {"ift": ift, "plumbing": plumbing}
    used = set()
    for node in ast.walk(ast.parse((HERE / program).read_text())):
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) in modules:
            used.add((node.value.id, node.attr))
        if isinstance(node, ast.ImportFrom) and node.module in modules:
            used.update((node.module, alias.name) for alias in node.names)
    assert used, f"{program} uses nothing of ift.py or plumbing.py"
    missing = sorted(f"{m}.{name}" for m, name in used if not hasattr(modules[m], name))
    assert not missing, f"{program} uses {missing}"


def test_mean_std_is_the_sample_mean_and_std_along_the_first_axis():
    """plumbing.mean_std against statistics.mean / stdev: floats for 1-D, per column for 2-D."""
    values = [0.25, 0.5, 1.0, 0.125]
    mean, std = plumbing.mean_std(values)
    assert type(mean) is float and type(std) is float  # JSON-ready, as compare.py writes them
    assert mean == pytest.approx(statistics.mean(values), rel=1e-12)
    assert std == pytest.approx(statistics.stdev(values), rel=1e-12)
    assert plumbing.mean_std([0.75]) == (0.75, 0.0)
    rows = [[1.0, 2.0, 4.0], [3.0, 2.0, 0.0]]                                 # (seeds, steps)
    mean, std = plumbing.mean_std(rows)
    assert mean.tolist() == [2.0, 2.0, 2.0]
    assert std.tolist() == pytest.approx([statistics.stdev(c) for c in zip(*rows)], rel=1e-12)
    assert plumbing.mean_std([[1.0, 2.0]])[1].tolist() == [0.0, 0.0]


def test_by_length_sorts_rows_by_their_chosen_length_and_keeps_ties_in_order():
    """by_length (the unpadding precondition): shortest chosen sequence first, stable on ties."""
    split = SimpleNamespace(chosen=[([0] * n, 1) for n in (5, 3, 5, 2, 3)])
    assert ift.by_length(split, [0, 1, 2, 3, 4]) == [3, 1, 4, 0, 2]
    assert ift.by_length(split, [4, 2, 1]) == [4, 1, 2]
