"""
Intuitive Fine-Tuning (IFT) beside SFT, DPO and ORPO, in one file to read from top to bottom.

A tiny GPT is fine-tuned on a toy instruction set (arithmetic, letter reversal, facts stated in the
prompt, long step-by-step additions) with one of four losses, then tested on a held-out split by
greedy exact match, preference accuracy and answer NLL.

    python ift.py --loss ift                 # train and test on the CPU (run time: README.md)
    python ift.py --loss sft                 # the baseline IFT generalises
    python ift.py --loss dpo --init-from out/sft/ckpt.pt    # a sequential recipe: SFT then DPO
    python ift.py --data DIR --loss ift      # your own train/val/test.jsonl (see README.md)
    torchrun --nproc_per_node=2 ift.py --loss ift           # data parallel (DDP), same steps
    python ift.py --help                     # every setting, with its meaning

On a GPU the same commands use bf16 autocast and torch.compile. Outputs go to --out-dir (default
out/<loss>): config.json, log.csv, loss.png, ckpt.pt, eval.json. The sections, in reading order:
config, model, batches and log-probs, the losses, speed (skip it on a first reading), set-up,
training loop, evaluation, main.

Reference: Hua et al., "Intuitive Fine-Tuning: Towards Simplifying Alignment into a Single
Process", arXiv:2405.11870 (ACL 2025); equation numbers are those of v3. Official code:
github.com/TsinghuaC3I/Intuitive-Fine-Tuning.

Where this code departs from the paper or the official code:
  1. Relation propagation follows the official code, a discounted SUFFIX sum of the token losses
     that weights EARLY tokens more, not eq. 21 read literally (a double sum that weights later
     tokens more). The code's form is the one behind the paper's numbers.
  2. As in the official code the relation weights are NOT detached: gradient flows through them
     too and can push late, low-loss tokens UP (see relation_weights). --detach-weights: constants.
  3. gamma = 0 is special-cased to weights of exactly 1, as in the official code; so IFT with
     lam = 0 and gamma = 0 is SFT exactly.
  4. The mix uses the model's own embedding table E (the paper's wording), trained through both
     terms. The official trainer feeds both IFT forwards from a frozen copy of E, so an untied
     model never trains its input embeddings under IFT (ift_hf.py --frozen_embeddings: the same).
  5. The official code's lam schedules are offered (--lam-schedule); its other relation-propagation
     variants (position-only weights, L2 / softmax / log norms) are left out.
  6. Toy scale: a 0.4M-parameter GPT trained from scratch on synthetic tasks with AdamW, not
     Mistral-7B on UltraFeedback with RMSprop. The comparisons are about the losses, not the scale.
"""

import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from plumbing import (UserError, arg, fmt_time, load_checkpoint, load_rows, parse_flags, pyplot,
                      read_ranks)

HERE = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# Config: one dataclass, every field a command-line flag

LOSSES = ("sft", "dpo", "orpo", "ift")
# Peak learning rates (RESULTS.md says how they were chosen). DPO pushes whole answers' summed
# log-probs apart; as hot as SFT, it drives the chosen answer's likelihood down too.
DEFAULT_LR = {"sft": 5e-3, "ift": 5e-3, "orpo": 5e-3, "dpo": 2e-5}


@dataclass
class Config:
    loss: str = arg("ift", "training loss", LOSSES)
    data: str = arg(str(HERE / "data"), "folder with train.jsonl, val.jsonl and test.jsonl "
                    "(rows: task, prompt, chosen, rejected) and maybe tokenizer.tiktoken")
    init_from: str = arg("", "checkpoint to start from (e.g. SFT then DPO); empty = random")
    out_dir: str = arg("", "output folder; empty = out/<loss>")
    seed: int = arg(1337, "seed of the initial model and of the batch order")
    n_layer: int = arg(3, "transformer blocks")
    n_head: int = arg(4, "attention heads per block")
    n_embd: int = arg(96, "width C of the residual stream")
    block_size: int = arg(128, "context length in tokens")
    max_steps: int = arg(2000, "optimizer steps")
    batch_size: int = arg(32, "sequences per step (DPO, ORPO: pairs)")
    lr: float = arg(0.0, "peak learning rate (AdamW); 0 = the loss's entry in DEFAULT_LR")
    min_lr_ratio: float = arg(0.1, "final lr as a fraction of the peak")
    warmup_steps: int = arg(50, "linear warm-up steps, then cosine decay")
    weight_decay: float = arg(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = arg(1.0, "clip the gradient norm (0 = off)")
    lam: float = arg(0.2, "IFT lambda: weight of the model's own predictions in its inputs")
    gamma: float = arg(0.95, "IFT relation-propagation decay; 0 = uniform token weights")
    detach_weights: bool = arg(False, "IFT: constant relation weights (the official code: not)")
    lam_schedule: str = arg("constant", "IFT lambda schedule: constant, warmup (0 -> lam over "
                            "the warm-up) or noisy (lam + N(0, 1) lam / 2 per step)",
                            ("constant", "warmup", "noisy"))
    dpo_beta: float = arg(0.1, "DPO beta (inverse temperature)")
    orpo_beta: float = arg(0.25, "ORPO weight of the odds-ratio term")
    log_interval: int = arg(25, "steps between log lines")
    eval_interval: int = arg(500, "steps between validation evaluations (0 = only at the end)")
    max_new_tokens: int = arg(64, "generation budget per answer")
    limit_rows: int = arg(0, "use only the first N rows of each split (0 = all; for tests)")
    device: str = arg("auto", "auto picks cuda, then mps, then cpu", ("auto", "cpu", "cuda", "mps"))
    compile: str = arg("auto", "torch.compile the step (auto: on for cuda)", ("auto", "on", "off"))
    padded: bool = arg(False, "train on padded batches, the plain path: the same numbers, slower "
                       "(see the section Speed; evaluation always skips the padding)")


# -----------------------------------------------------------------------------
# Model: a tiny GPT (nanoGPT's shape) that can also take input embeddings directly
# B = batch, T = time (tokens), C = channels (n_embd), V = vocabulary, H = heads

class SelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, cache=None):
        """x (B, T, C) -> (B, T, C); cache (generation only): this layer's keys and values."""
        return self.proj(self.attend(self.qkv(x), cache))                # (B, T, C)

    def attend(self, qkv, cache=None):
        """Causal multi-head attention: qkv (B, T, 3C) -> (B, T, C)."""
        # (B, T, 3C) -> (B, T, 3, H, C/H) -> q, k, v, each (B, H, T, C/H)
        q, k, v = qkv.unflatten(2, (3, self.n_head, -1)).permute(2, 0, 3, 1, 4)
        if cache is not None:  # generation: prepend the keys and values of earlier tokens
            if cache:
                k = torch.cat([cache["k"], k], dim=2)                    # (B, H, T_past + T, C/H)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        # causal (t sees <= t); a cached step feeds one new token, which sees every key
        y = F.scaled_dot_product_attention(q, k, v, is_causal=k.shape[2] == q.shape[2])
        return y.transpose(1, 2).flatten(2)                              # (B, T, C)


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd))

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)  # E, the paper's token-embedding table
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx=None, tok_emb=None, cache=None):
        """Logits (B, T, V) for token ids idx (B, T), or for token embeddings tok_emb (B, T, C).

        IFT passes tok_emb, a mix of rows of self.wte: positions are added after the mix, as for
        ordinary tokens. cache (generation only): one dict per block; new tokens continue it."""
        x = self.wte(idx) if tok_emb is None else tok_emb                  # (B, T, C)
        past = cache[0]["k"].shape[2] if cache and cache[0] else 0         # tokens cached so far
        x = x + self.wpe(torch.arange(past, past + x.shape[1], device=x.device))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i])
        return F.linear(self.ln_f(x), self.wte.weight)  # (B, T, V); tied: the output layer is E


# -----------------------------------------------------------------------------
# Batches and log-probs: the shift by one, and the one helper every loss uses

def make_batch(seqs, device):
    """Right-pad sequences (ids, prompt_len) into inputs x, targets y and answer mask, (B, T) each.

    THE SHIFT BY ONE happens here, once: x = seq[:-1] and y = seq[1:], so the logits at position t
    predict y[t] = seq[t+1]. mask[t] is True when y[t] is an answer token (the answer and its
    <|endoftext|>). The padding is token 0, never on the mask: no loss reads it."""
    T = max(len(ids) for ids, _ in seqs) - 1
    seq = torch.tensor([ids + [0] * (T + 1 - len(ids)) for ids, _ in seqs])  # (B, T + 1)
    n = torch.tensor([len(ids) - 1 for ids, _ in seqs])[:, None]  # (B, 1): each row's inputs
    prompt_len = torch.tensor([p for _, p in seqs])[:, None]                 # (B, 1)
    t = torch.arange(T)                                                      # (T,)
    mask = (t < n) & (t >= prompt_len - 1)  # y[prompt_len - 1] is the first answer token
    x, y = seq[:, :-1].masked_fill(t >= n, 0), seq[:, 1:]                    # (B, T) each
    return x.to(device), y.to(device), mask.to(device)


def sequence_logps(logits, y, mask):
    """Per-token log-probs of the targets on the answer, and their sum per sequence.

    logits (B, T, V) from inputs x; y (B, T) is ALREADY shifted by one (make_batch), so
    logits[:, t] scores y[:, t]. Returns token_logps (B, T), zero off the mask, and logps (B,) =
    token_logps.sum(-1): "*_logps" always means summed over answer tokens."""
    logp = torch.log_softmax(logits[mask].float(), dim=-1)  # (A, V): the A answer positions
    picked = logp.gather(-1, y[mask].unsqueeze(-1)).squeeze(-1)           # (A,)
    token_logps = picked.new_zeros(y.shape).masked_scatter(mask, picked)  # (B, T)
    return token_logps, token_logps.sum(-1)                                # (B, T), (B,)


# -----------------------------------------------------------------------------
# Losses, side by side. Each returns (loss, metrics): loss a scalar to minimise, metrics a dict
# of detached tensors to log (scalars or (B,)). The shapes: B sequences (DPO, ORPO: B pairs).

# SFT. The model judges its answer from ground-truth prefixes only (teacher forcing):
#   L_SFT = - 1/|D| sum_(x,y) 1/N sum_{t=1..N} log p(y_t | x, y_<t)                    (eq. 30)
# mean over the N answer tokens of each sequence (so long answers do not dominate), then over
# sequences. In code: token_logps = log p(y_t | .), mask marks the N answer tokens. The paper
# (eqs. 13-14) reads this as a preference estimate that "secretly sets T(s*_{n-1}|x) = 1": token t
# is scored as if the model had produced every earlier token perfectly (exposure bias).
def sft_loss(token_logps, mask):
    """token_logps (B, T) from sequence_logps, mask (B, T) -> (loss, {})."""
    n = mask.sum(-1)                                                       # (B,)
    return (-token_logps.sum(-1) / n).mean(), {}


# IFT and scheduled sampling. SFT trains on true prefixes only, yet the model answers from its own
# (exposure bias, eqs. 13-14). Scheduled sampling (Bengio et al., NeurIPS 2015), the classic fix,
# feeds the model, with a probability raised during training, its own sampled token instead of the
# true previous one. A transformer scores every position in one parallel pass, so it needs its
# predictions first: Mihaylova and Martins (ACL Student Research Workshop 2019) run a first pass on
# the true tokens and a second on a mix of true and predicted ones. IFT's temporal residual
# connection is that two-pass scheme made soft and deterministic: at every answer input the
# embedding mix (1 - lam) E(true) + lam E(predicted), not a coin flip between the two tokens.
# Mixing alone lets an early wrong prediction leak into every later input, more so on long
# answers; relation propagation adds the counterweight, weighting each token by the discounted
# losses after it, so the tokens whose errors would travel furthest count most.
#
# IFT, the whole step (Algorithm 1). x, y, mask as made by make_batch().
#   1. Inference one step ahead, no gradient: yhat = argmax_v logits(x)[:, t, v] predicts y[:, t].
#   2. Temporal residual connection (eq. 17): the input at position t+1 is y[:, t]; where y[:, t]
#      is an answer token, its "intuition" is the model's own prediction of it, yhat[:, t]:
#        x~[:, t+1] = yhat[:, t] if mask[:, t] else x[:, t+1];   x~[:, 0] = x[:, 0]
#        e = (1 - lam) E(x) + lam E(x~)
#      Prompt and padding positions keep the ground truth. The first answer token is predicted
#      from the last prompt token, so its loss is unchanged. E is the model's own wte, and the
#      gradient flows through BOTH terms (departure 4): nothing in the mix is detached.
#   3. Second forward WITH gradient on e (eqs. 19-20): l_t = -log p(y_t | e_<=t), GROUND TRUTH y.
#   4. loss = mean over sequences of (1/N) sum_t l_t w_t, w = relation_weights(l).
# lam = 0 makes the mix E(x) (eq. 18's estimate is then SFT's) and gamma = 0 the weights 1: SFT,
# in value and gradient. In code: yhat (B, T), x_tilde = x~, tok_emb = e (B, T, C), E = wte.
# Step 2's x~ is shifted_predictions, step 4's w relation_weights; ift_loss puts the steps together.
def shifted_predictions(x, yhat, mask):
    """x~ of step 2: the model's prediction at answer inputs, the ground truth everywhere else."""
    x_tilde = x.clone()                                                     # (B, T)
    x_tilde[:, 1:] = torch.where(mask[:, :-1], yhat[:, :-1], x[:, 1:])
    return x_tilde


# IFT, relation propagation (eq. 21; Algorithm 1 step 3 as the official code computes it).
# For one sequence with token losses l_t on its N answer tokens:
#   1. c_t = l_t / N on the answer, 0 elsewhere: the mask comes FIRST, so no prompt or padding
#      loss enters the sums below
#   2. S_t = sum_{j >= t} gamma^(j - t) c_j       a discounted SUFFIX sum ("reward-to-go")
#   3. w_t = S_t * N / Z,  Z = sum_k S_k          rescaled so the weights AVERAGE 1 on the answer
#   4. gamma = 0 gives w_t = 1 (departure 3; the formula would give l_t / mean(l)): SFT's loss.
# Two guards, inactive on real rows, keep a degenerate one finite: N counts at least 1 (a row
# without answer tokens) and Z at least 1e-12 (every loss 0).
# With equal losses the weights fall along the answer (20 tokens, gamma .95: ~1.6 -> ~0.1): an
# early token's error propagates to every later one (eq. 21 read literally: departure 1).
# The gradient. L = (1/N) sum_t l_t w_t = sum_t l_t S_t / Z, and dS_t/dl_j = gamma^(j-t) / N for
# t <= j, so   dL/dl_j = ( S_j + (1/N) sum_{t <= j} gamma^(j-t) (l_t - L) ) / Z.
# The first term is the detached weight w_j / N; the second, through the weights, is negative
# when the losses up to j are mostly below L: a late, low-loss token can get a NEGATIVE
# coefficient, and training pushes its loss UP. Worked example: losses [2 .1 .1 .1 3 .1 .1 .1],
# gamma .95: L = 1.135, dL/dl = [.318 .158 .105 .055 .167 -.053 -.112 -.167] (a test checks it
# three ways). detach=True makes every coefficient w_j / N > 0: a pure re-weighting of SFT's
# token losses. In code: l = token_losses (B, T); S = c @ G^T, G[t, j] = gamma^(j - t), j >= t.
def relation_weights(token_losses, mask, gamma, detach=False):
    """token_losses (B, T), mask (B, T) -> weights w (B, T): mean 1 on the mask, 0 off it."""
    mask = mask.to(token_losses.dtype)                                     # (B, T)
    if gamma == 0:
        return mask.clone()
    if detach:
        token_losses = token_losses.detach()
    n = mask.sum(-1, keepdim=True).clamp(min=1)                            # (B, 1): N
    c = token_losses * mask / n                                            # (B, T)
    steps = torch.arange(c.shape[1], device=c.device)
    offset = (steps[None, :] - steps[:, None]).to(c.dtype)                 # (T, T): j - t
    G = torch.where(offset >= 0, gamma ** offset.clamp(min=0), torch.zeros_like(offset))
    S = (c @ G.T) * mask                                                   # (B, T): S_t
    Z = S.sum(-1, keepdim=True).clamp(min=1e-12)                           # (B, 1)
    return S * n / Z                                                       # (B, T)


# IFT's loss: the four steps of Algorithm 1 above, in code.
def ift_loss(model, x, y, mask, lam=0.2, gamma=0.95, detach_weights=False):
    """x, y, mask (B, T) from make_batch() -> (loss, {"nll": the mean answer-token NLL of the
    same forward, unweighted}). model: the GPT, or a stand-in called like it (under torchrun
    DDP's wrapper, whose forward also syncs the gradients; in training, by default, the speed
    section's OnRealTokens). Both forwards call model; E is the GPT's own wte."""
    E = getattr(model, "module", model).wte  # DDP keeps the GPT at .module
    with torch.no_grad():  # 1. nothing of this pass is kept for the backward
        yhat = model(x).argmax(-1)                                          # (B, T)
    x_tilde = shifted_predictions(x, yhat, mask)                            # 2. (B, T)
    tok_emb = (1 - lam) * E(x) + lam * E(x_tilde)                           # (B, T, C)
    token_logps, _ = sequence_logps(model(tok_emb=tok_emb), y, mask)      # 3. (B, T)
    token_losses = -token_logps                                             # (B, T)
    w = relation_weights(token_losses, mask, gamma, detach=detach_weights)  # 4. (B, T)
    loss = ((token_losses * w).sum(-1) / mask.sum(-1)).mean()
    return loss, {"nll": sft_loss(token_logps.detach(), mask)[0]}


# The cost: per token a forward is ~2N FLOPs (N parameters) and a backward ~4N. The no-grad pass
# adds 2N to SFT's 6N and keeps no activations: IFT needs SFT's memory and 4/3 of its FLOPs.
IFT_COST = 4 / 3  # FLOPs of an IFT step over an SFT step on the same batch


# DPO (Rafailov et al. 2023; the paper's eqs. 34-35 write it without beta and the reference).
# With log pi summed over answer tokens,
#   h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
#   L_DPO = - mean over pairs of log sigmoid(beta * h)
# At pi = pi_ref, h = 0 and the loss is -log(1/2) = ln 2. The metrics, detached: the implicit
# rewards r_w = beta * (log pi(y_w|x) - log pi_ref(y_w|x)) and r_l likewise, their margin
# r_w - r_l = beta * h, and accuracy, 1 where the margin is positive. In code: policy_chosen_logps
# = log pi(y_w|x), ref_rejected_logps = log pi_ref(y_l|x), and so on. The frozen reference's
# log-probs are a fixed function of the row, so train() computes them ONCE.
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1):
    """Four (B,) summed log-probs -> (loss, {rewards_chosen, rewards_rejected, margins, accuracy}),
    each metric (B,)."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(beta * h).mean()
    rewards_chosen = beta * (policy_chosen_logps - ref_chosen_logps).detach()      # (B,)
    rewards_rejected = beta * (policy_rejected_logps - ref_rejected_logps).detach()  # (B,)
    margins = rewards_chosen - rewards_rejected                                     # (B,)
    return loss, {"rewards_chosen": rewards_chosen, "rewards_rejected": rewards_rejected,
                  "margins": margins, "accuracy": (margins > 0).float()}


# ORPO (Hong et al. 2024). Reference-free; with p(y) the LENGTH-NORMALISED probability
# exp(mean_t log p(y_t|.)) and odds(y) = p / (1 - p):
#   L_ORPO = L_SFT(y_w) - beta * log sigmoid(log odds(y_w) - log odds(y_l))
#   log odds(y) = m - log(1 - exp(m)),  m = mean log-prob of y
# In code: m_chosen = policy_chosen_logps / chosen_lengths; log(1 - exp(m)) = log(-expm1(m)),
# accurate near 0; m is capped at -1e-6, so a perfectly learned answer gives a finite loss.
def orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths,
              beta=0.25):
    """(B,) summed log-probs and (B,) answer lengths -> (loss, {log_odds, accuracy}), (B,) each."""
    m_chosen = (policy_chosen_logps / chosen_lengths).clamp(max=-1e-6)          # (B,)
    m_rejected = (policy_rejected_logps / rejected_lengths).clamp(max=-1e-6)    # (B,)
    log_odds = ((m_chosen - torch.log(-torch.expm1(m_chosen)))
                - (m_rejected - torch.log(-torch.expm1(m_rejected))))           # (B,)
    ratio = F.logsigmoid(log_odds)                                              # (B,)
    loss = (-m_chosen - beta * ratio).mean()
    return loss, {"log_odds": log_odds.detach(), "accuracy": (log_odds > 0).float().detach()}


def lam_at(cfg, step, noise):
    """lam for this step: constant, linear warm-up, or the official code's noisy lam."""
    lam = {"constant": cfg.lam,
           "warmup": cfg.lam * min(1.0, (step + 1) / max(1, cfg.warmup_steps)),
           "noisy": cfg.lam + noise * 0.5 * cfg.lam}[cfg.lam_schedule]
    return min(1.0, max(0.0, lam))


# -----------------------------------------------------------------------------
# Speed: skipping the padding, an exact optimisation. Skip this section on a first reading.
#
# make_batch right-pads rows to the longest, and no loss reads the padding. Unpadded runs every
# per-token layer (LayerNorms, linears, MLPs, the output layer) on the M real tokens alone, as one
# (M, C) tensor; attention, the one layer that mixes positions, pads them again in 4 groups of
# consecutive rows, each to its own longest row. Exact in any row order (with causal attention and
# right padding no real token sees padding), but fast only if a group's rows are alike in length,
# so the training loop sorts each batch's rows by length (by_length). OnRealTokens stands in for
# the GPT in the losses above, unchanged: of its logits they only ever read logits[mask] and
# logits.argmax(-1), and RealLogits answers both from the (M, V) rows, never building the
# (B, T, V) tensor. test_ift.py checks that losses and gradients equal the plain path's.
# --padded turns it off.

def by_length(split, idx):
    """The row indices idx of split, shortest chosen answer first."""
    return sorted(idx, key=lambda j: len(split.chosen[j][0]))


def pad_rows(rows, real):
    """The inverse of rows = t[real]: (M, ...) -> (B, T, ...), zeros at the padding."""
    return rows.new_zeros(*real.shape, *rows.shape[1:]).index_put((real,), rows)


class Unpadded(nn.Module):
    """The GPT on the real tokens only: forward(real, idx or tok_emb) is GPT.forward's logits at
    the real positions real (B, T), as (M, V) rows in their order. A module of its own, with the
    GPT's parameters, so that torch.compile and DDP wrap it as they would wrap the GPT."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, real, idx=None, tok_emb=None):
        gpt = self.gpt
        x = gpt.wte(idx) if tok_emb is None else tok_emb                    # (B, T, C)
        x = (x + gpt.wpe(torch.arange(x.shape[1], device=x.device)))[real]  # (M, C)
        lengths = real.sum(1).cpu().chunk(4)                              # rows' lengths, by group
        groups = [r[:, :int(n.max())] for r, n in zip(real.chunk(4), lengths)]  # (b, T_g) each
        sizes = [int(n.sum()) for n in lengths]                           # real tokens per group
        for block in gpt.blocks:  # Block.forward, with attention on each group padded alone
            parts = block.attn.qkv(block.ln_1(x)).split(sizes)            # (M_g, 3C) each
            y = torch.cat([block.attn.attend(pad_rows(p, r))[r] for p, r in zip(parts, groups)])
            x = x + block.attn.proj(y)                                    # (M, C)
            x = x + block.mlp(block.ln_2(x))
        return F.linear(gpt.ln_f(x), gpt.wte.weight)                       # (M, V)


def real_tokens(mask):
    """(B, T) True at each row's real inputs, from make_batch's answer mask alone: a row's real
    tokens end at its last answer token, the <|endoftext|>."""
    T = mask.shape[1]
    last = T - 1 - mask.flip(-1).int().argmax(-1)                           # (B,)
    return torch.arange(T, device=mask.device) <= last[:, None]             # (B, T)


class RealLogits:
    """(B, T, V) logits held as the (M, V) rows of the real tokens: logits[mask], for a mask
    within the real tokens, and logits.argmax(-1) (0 at the padding), as the losses read them."""

    def __init__(self, rows, real):
        self.rows, self.real = rows, real                                   # (M, V), (B, T)

    def __getitem__(self, mask):
        return self.rows[mask[self.real]]                                   # (A, V)

    def argmax(self, dim):
        return pad_rows(self.rows.argmax(dim), self.real)                   # (B, T)


class OnRealTokens:
    """What the losses call in place of the GPT for one batch: net(idx) or net(tok_emb=...) ->
    RealLogits through unpadded (an Unpadded, maybe compiled, maybe in DDP), and E at net.wte."""

    def __init__(self, unpadded, mask):
        self.real = real_tokens(mask)                                       # (B, T)
        self.unpadded, self.wte = unpadded, getattr(unpadded, "module", unpadded).gpt.wte

    def __call__(self, idx=None, tok_emb=None):
        return RealLogits(self.unpadded(self.real, idx, tok_emb), self.real)


# -----------------------------------------------------------------------------
# Set-up, where nanoGPT's train.py has it: device and processes, tokenizer, data files, model

# Data parallel, as in nanoGPT: `torchrun --nproc_per_node=N ift.py ...` starts N copies of this
# script and sets RANK and WORLD_SIZE in each (see "Training loop"); one process without them.
RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(name):
    """--device as a torch.device: auto picks cuda, then mps, then cpu."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    name = next(d for d in available if available[d]) if name == "auto" else name
    if not available[name]:
        raise UserError(f"--device {name}: not available on this machine; use --device cpu")
    return torch.device(name)


def start(cfg, save_config=False):
    """Seed, device (joining torchrun's processes), --out-dir (maybe with config.json) made."""
    torch.manual_seed(cfg.seed)
    device, out_dir = pick_device(cfg.device), Path(cfg.out_dir)
    if WORLD > 1 and device.type == "cuda":  # one GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if WORLD > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":  # tiny weights underflow into subnormal floats, much slower
        torch.set_flush_denormal(True)
    try:
        if RANK == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            if save_config:
                (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    except OSError as e:
        raise UserError(f"--out-dir {out_dir}: cannot write there ({e.strerror})") from None
    return device, out_dir


def autocast_for(device):
    """bf16 autocast on CUDA (matmuls in bf16, reductions in float32); plain float32 elsewhere."""
    on_cuda = device.type == "cuda"
    return torch.autocast("cuda" if on_cuda else "cpu", dtype=torch.bfloat16, enabled=on_cuda)


# The tokenizer: tiktoken, built offline from a rank file that data/prepare.py trains

# Pre-tokenisation regex: every digit is its own chunk (so "478" is 3 tokens and arithmetic stays
# learnable), words keep one leading space, punctuation runs and whitespace are chunks of their own.
PAT_STR = r"\d| ?[A-Za-z]+| ?[^\sA-Za-z\d]+|\s+(?!\S)|\s+"
SPECIAL_TOKENS = ("<|endoftext|>", "<|user|>", "<|assistant|>")
BUILTIN_TOKENIZER = HERE / "data" / "tokenizer.tiktoken"


def load_tokenizer(data_dir):
    """A tiktoken.Encoding from <data_dir>/tokenizer.tiktoken (one "base64(token) rank" line per
    token), plus the three special tokens. A folder without one gets the built-in byte-level BPE
    (ranks 0..255 are the bytes): any text encodes."""
    import tiktoken
    path = Path(data_dir) / "tokenizer.tiktoken"
    if not path.is_file() and BUILTIN_TOKENIZER.is_file():
        print(f"note: {data_dir} has no tokenizer.tiktoken: using the built-in byte-level BPE "
              f"(python data/prepare.py --tokenizer-for {data_dir} trains one on your data)")
        path = BUILTIN_TOKENIZER
    if not path.is_file():
        raise UserError(f"{path}: tokenizer file not found; run python data/prepare.py")
    ranks = read_ranks(path)  # {token bytes: rank}, every line checked
    n = max(ranks.values()) + 1
    return tiktoken.Encoding(name="ift-bpe", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={t: n + i for i, t in enumerate(SPECIAL_TOKENS)})


# The data files: JSON-lines rows -> checked rows -> token ids (make_batch pads them)

def encode_row(enc, prompt, answer):
    """Token ids of <|user|> prompt <|assistant|> answer <|endoftext|>, and the prompt length."""
    eot, user, assistant = (enc.encode_single_token(t) for t in SPECIAL_TOKENS)
    prompt_ids = [user] + enc.encode_ordinary(prompt) + [assistant]
    return prompt_ids + enc.encode_ordinary(answer) + [eot], len(prompt_ids)


class Split:
    """One split, tokenised: its rows, and each row's chosen and rejected answer as (ids, prompt
    length). Rows longer than the context are dropped, and we say how many."""

    def __init__(self, rows, enc, block_size, name):
        self.rows, self.chosen, self.rejected = [], [], []
        for row in rows:
            chosen = encode_row(enc, row["prompt"], row["chosen"])
            rejected = (encode_row(enc, row["prompt"], row["rejected"]) if "rejected" in row
                        else None)
            longest = max(len(chosen[0]), len(rejected[0]) if rejected else 0)
            if longest - 1 > block_size:  # inputs are the sequence minus its last token
                continue
            self.rows.append(row)
            self.chosen.append(chosen)
            self.rejected.append(rejected)
        dropped = len(rows) - len(self.rows)
        if dropped:
            print(f"note: {name}: skipped {dropped} of {len(rows)} rows longer than the context "
                  f"of {block_size} tokens (raise --block-size to keep them)")
        if not self.rows:
            raise UserError(f"{name}: every row is over {block_size} tokens (raise --block-size "
                            f"to keep them)")
        self.has_pairs = all(r is not None for r in self.rejected)

    def __len__(self):
        return len(self.rows)


def load_splits(cfg, enc, need_rejected=()):
    """train, val and test from --data, tokenised; need_rejected: the splits that need pairs."""
    paths = {name: Path(cfg.data) / f"{name}.jsonl" for name in ("train", "val", "test")}
    return {name: Split(load_rows(path, name in need_rejected, cfg.limit_rows), enc,
                        cfg.block_size, str(path)) for name, path in paths.items()}


def model_args(cfg, enc):
    return {"vocab_size": enc.n_vocab, "block_size": cfg.block_size, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_embd": cfg.n_embd}


def build_model(cfg, enc, device):
    """A fresh GPT of the configured size, or the --init-from checkpoint (checked), on device."""
    model = GPT(**model_args(cfg, enc))
    if cfg.init_from:  # checked: a checkpoint of ift.py, of this very model shape
        load_checkpoint(cfg.init_from, model, model_args(cfg, enc))
    return model.to(device)


# -----------------------------------------------------------------------------
# Training loop
#
# Under torchrun each process takes its equal slice of the same global batch; every loss is a mean
# over sequences, so DDP's averaged gradient is the whole batch's. Rank 0 alone prints (its
# slice's loss), tests and writes.

def batches(n_rows, batch_size, generator):
    """Endless stream of row-index batches: a fresh permutation every epoch."""
    while True:
        order = torch.randperm(n_rows, generator=generator).tolist()
        for i in range(0, n_rows - batch_size + 1, batch_size):
            yield order[i:i + batch_size]
        if n_rows < batch_size:
            yield order


def lr_at(cfg, step):
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


@torch.no_grad()
def answer_logps(model, split, device, autocast):
    """Summed log-probs (N, 2) of every row's chosen and rejected answer ((N, 1) without pairs),
    in batches of 128 rows of similar length. DPO's reference; evaluate()'s NLL."""
    out = torch.zeros(len(split), 1 + split.has_pairs, device=device)
    order = by_length(split, range(len(split)))  # alike lengths together: the speed section
    unpadded = Unpadded(model)
    for idx in (order[i:i + 128] for i in range(0, len(order), 128)):
        rejected = [split.rejected[i] for i in idx] if split.has_pairs else []
        x, y, mask = make_batch([split.chosen[i] for i in idx] + rejected, device)  # (2b, T)
        with autocast:
            logits = OnRealTokens(unpadded, mask)(x)  # = model(x), padding skipped
            _, logps = sequence_logps(logits, y, mask)                      # (2b,) or (b,)
        out[idx] = torch.stack(logps.split(len(idx)), dim=1)                # (b, 2) or (b, 1)
    return out


def compute_loss(cfg, model, split, idx, device, autocast, ref, lam):
    """cfg.loss on the batch of rows idx: (loss, metrics to log, real tokens read). model is
    what wrap_for_training returns; ref (N, 2) DPO's reference log-probs (answer_logps)."""
    idx = by_length(split, idx)  # alike lengths together: the speed section
    pairs = cfg.loss in ("dpo", "orpo")
    seqs = [split.chosen[i] for i in idx] + ([split.rejected[i] for i in idx] if pairs else [])
    x, y, mask = make_batch(seqs, device)                       # (B, T); DPO, ORPO: (2B, T)
    net = model if cfg.padded else OnRealTokens(model, mask)    # same logits, padding skipped
    with autocast:
        if cfg.loss == "ift":
            loss, metrics = ift_loss(net, x, y, mask, lam, cfg.gamma, cfg.detach_weights)
        else:
            token_logps, logps = sequence_logps(net(x), y, mask)     # (B, T), (B,); or (2B,..)
        if cfg.loss == "sft":
            loss, metrics = sft_loss(token_logps, mask)
    if pairs:
        chosen, rejected = logps.split(len(idx))                            # (B,), (B,)
        lengths = mask.sum(-1).float()                                      # (2B,)
        if cfg.loss == "dpo":
            loss, m = dpo_loss(chosen, rejected, ref[idx, 0], ref[idx, 1], cfg.dpo_beta)
        else:
            loss, m = orpo_loss(chosen, rejected, *lengths.split(len(idx)), cfg.orpo_beta)
        metrics = {"acc": m["accuracy"].mean(), "chosen_nll": -(chosen / lengths[:len(idx)]).mean()}
        if cfg.loss == "dpo":
            metrics["margin"] = m["margins"].mean()
    return loss, metrics, sum(len(ids) - 1 for ids, _ in seqs)  # tok/s counts no padding


def make_optimizer(cfg, model):
    """AdamW, weight decay on the matrices only; fused: one kernel for every parameter."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.99), fused=True)


def wrap_for_training(cfg, model, device):
    """What the step calls, with the GPT's parameters: the GPT (--padded) or its Unpadded view,
    maybe compiled, and under torchrun inside DDP, whose forward also syncs the gradients."""
    net = model if cfg.padded else Unpadded(model)
    if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"):
        net = torch.compile(net, dynamic=True)  # one graph for every T and M, not one each
    if WORLD > 1:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    return net


def train(cfg, model, enc, splits, device, out_dir):
    """Optimise cfg.loss, log, validate, checkpoint; returns (the log, the seconds it took)."""
    train_split, autocast = splits["train"], autocast_for(device)
    if cfg.loss == "dpo" and not cfg.init_from:
        print("note: DPO without --init-from: the reference is the random initial model")
    ref = answer_logps(model.eval(), train_split, device, autocast) if cfg.loss == "dpo" else None
    optimizer = make_optimizer(cfg, model)
    step_model = wrap_for_training(cfg, model, device)
    stream = batches(len(train_split), cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    lam_noise = torch.randn(cfg.max_steps, generator=torch.Generator().manual_seed(cfg.seed + 1))
    log, ntok_since = [], 0
    t0 = t_log = time.time()
    for step in range(cfg.max_steps):
        model.train()
        lr, lam = lr_at(cfg, step), lam_at(cfg, step, lam_noise[step].item())
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = next(stream)  # every process draws the same global batch and takes its slice
        idx = idx[RANK * len(idx) // WORLD:(RANK + 1) * len(idx) // WORLD]
        loss, metrics, ntok = compute_loss(cfg, step_model, train_split, idx, device, autocast,
                                           ref, lam)
        if not torch.isfinite(loss):
            raise UserError(f"step {step}: the {cfg.loss} loss is {loss.item()}; lower --lr "
                            f"(now {cfg.lr}); no checkpoint was written for this run")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        ntok_since += ntok * WORLD  # real tokens of the global batch (tok_per_s: no padding)
        last = step == cfg.max_steps - 1
        log_now = step % cfg.log_interval == 0 or last
        eval_now = RANK == 0 and (last or cfg.eval_interval and step % cfg.eval_interval == 0
                                  and step > 0)
        if log_now or eval_now:
            log.append({"step": step, "loss": loss.item(), "lr": lr, "lam": lam})
        if log_now:
            now = time.time()
            log[-1]["tok_per_s"] = ntok_since / max(now - t_log, 1e-9)  # useful: no padding
            t_log, ntok_since = now, 0
            eta = (now - t0) / (step + 1) * (cfg.max_steps - step - 1)
            extra = "".join(f" | {k} {v.item():.4f}" for k, v in metrics.items())
            extra += f" | lam {lam:.3f}" if cfg.loss == "ift" else ""
            print(f"step {step:5d} | loss {loss.item():.4f}{extra} | lr {lr:.1e} | "
                  f"{log[-1]['tok_per_s'] / 1000:.1f}k useful tok/s | eta {fmt_time(eta)}",
                  flush=True)
        if eval_now:
            t_eval = time.time()
            res = evaluate(model, enc, splits["val"], device, autocast, cfg.max_new_tokens)
            print(f"eval step {step:5d} | val exact match {res['exact_match']:.3f} | "
                  f"val answer nll {res['nll']:.4f}", flush=True)
            log[-1].update(val_exact_match=res["exact_match"], val_nll=res["nll"],
                           val_preference_accuracy=res["preference_accuracy"],
                           val_margin=res["preference_margin"])
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise UserError(f"step {step}: the weights hold NaN or inf; lower --lr (now "
                                f"{cfg.lr}); the last good checkpoint was kept")
            ckpt = {"model": model.state_dict(), "model_args": model_args(cfg, enc),
                    "config": dataclasses.asdict(cfg), "step": step}
            torch.save(ckpt, out_dir / "ckpt.tmp")  # then a rename: never a half-written file
            os.replace(out_dir / "ckpt.tmp", out_dir / "ckpt.pt")
            t_log += time.time() - t_eval  # tok/s counts training time only
    if RANK == 0:
        with (out_dir / "log.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "lam", "tok_per_s",
                                                   "val_exact_match", "val_nll",
                                                   "val_preference_accuracy", "val_margin"])
            writer.writeheader()
            writer.writerows(log)
    return log, time.time() - t0


# -----------------------------------------------------------------------------
# Evaluation: greedy exact match (batched, KV cache), preference accuracy, answer NLL

@torch.no_grad()
def generate(model, idx, eot, max_new_tokens, autocast):
    """Greedy answers to prompts of ONE length, idx (B, P), as token-id lists without the eot: no
    padding, no mask, no position offsets; the KV cache lets every step feed the newest token."""
    model.eval()
    cache = [{} for _ in model.blocks]
    out, done = [], torch.zeros(len(idx), dtype=torch.bool, device=idx.device)
    with autocast:
        logits = model(idx, cache=cache)                                    # (B, P, V)
        for _ in range(min(max_new_tokens, model.block_size - idx.shape[1])):
            nxt = torch.where(done, eot, logits[:, -1].argmax(-1))         # (B,) done: eot
            out.append(nxt)
            done |= nxt == eot
            if done.all():
                break
            logits = model(nxt[:, None], cache=cache)                       # (B, 1, V)
    rows = torch.stack(out, dim=1).tolist()                                 # (B, new tokens)
    return [row[:row.index(eot)] if eot in row else row for row in rows]


def prompt_groups(split, batch_size):
    """The split's row indices in batches of up to batch_size rows with one prompt length."""
    by_prompt_len = {}
    for j, (_, prompt_len) in enumerate(split.chosen):
        by_prompt_len.setdefault(prompt_len, []).append(j)
    return [rows[i:i + batch_size] for _, rows in sorted(by_prompt_len.items())
            for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def evaluate(model, enc, split, device, autocast, max_new_tokens, batch_size=256):
    """Exact match per task and overall, preference accuracy, answer NLL, every answer."""
    answers = {}  # by row index
    for idx in prompt_groups(split, batch_size):
        prompts = torch.tensor([split.chosen[j][0][:split.chosen[j][1]] for j in idx])  # (B, P)
        out = generate(model, prompts.to(device), enc.eot_token, max_new_tokens, autocast)
        answers.update((j, enc.decode(ids)) for j, ids in zip(idx, out))
    logps = answer_logps(model, split, device, autocast)                   # (N, 2) or (N, 1)
    rows = logps.tolist()
    nll = {j: -rows[j][0] / (len(ids) - p) for j, (ids, p) in enumerate(split.chosen)}
    preferred = {j: lp[0] > lp[1] for j, lp in enumerate(rows)} if split.has_pairs else {}
    margin = preference_margin(logps) if split.has_pairs else None
    return {**score(split, answers, nll, preferred), "preference_margin": margin}


def preference_margin(logps):
    """Mean over rows of log p(chosen) - log p(rejected), each summed over answer tokens (logps
    (N, 2) from answer_logps). Unlike preference accuracy it is not capped at 1: it keeps growing
    while a model separates pairs it already ranks right."""
    return (logps[:, 0] - logps[:, 1]).mean().item()


def score(split, answers, nll, preferred):
    """evaluate()'s results from dicts by row index: each row's greedy answer, answer NLL and
    (with pairs) whether its chosen answer is the likelier one. Means per task and overall."""
    correct = {j: answers[j].strip() == row["chosen"].strip() for j, row in enumerate(split.rows)}
    tasks = sorted({row["task"] for row in split.rows})

    def mean(values, task=None):  # over every row, or over the rows of one task
        picked = [values[j] for j, row in enumerate(split.rows) if task in (None, row["task"])]
        return sum(picked) / len(picked)
    return {"exact_match": mean(correct),
            "exact_match_by_task": {t: mean(correct, t) for t in tasks},
            "nll": mean(nll), "nll_by_task": {t: mean(nll, t) for t in tasks},
            "preference_accuracy": mean(preferred) if preferred else None,
            "preference_accuracy_by_task": ({t: mean(preferred, t) for t in tasks} if preferred
                                            else None),
            "rows": len(split), "answers": [answers[j] for j in range(len(split))]}


def print_eval_table(res):
    """The test results as a small text table: one row per task, then the overall row."""
    pref = res["preference_accuracy_by_task"]
    print(f"{'task':<12}{'exact match':>12}{'pref acc':>10}{'answer nll':>12}")
    for t, em in res["exact_match_by_task"].items():
        p = f"{pref[t]:.3f}" if pref else "-"
        print(f"{t:<12}{em:>12.3f}{p:>10}{res['nll_by_task'][t]:>12.4f}")
    p = f"{res['preference_accuracy']:.3f}" if pref else "-"
    print(f"{'overall':<12}{res['exact_match']:>12.3f}{p:>10}{res['nll']:>12.4f}")


# -----------------------------------------------------------------------------
# Plots

def plot_loss_curve(log, loss_name, path):
    """Training loss and validation exact match against the optimizer step."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log])
    ax.set(xlabel="optimizer step", ylabel=f"train {loss_name} loss (blue)",
           title=f"ift.py --loss {loss_name}")
    evals = [r for r in log if "val_exact_match" in r]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["val_exact_match"] for r in evals], "o-",
                 color="tab:orange")
        ax2.set(ylabel="val exact match (orange)", ylim=(0, 1))
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# -----------------------------------------------------------------------------
# main: the command line

def config_problem(cfg):
    """The first problem with a Config's values, as one line, or None."""
    for name in ("lam", "gamma", "min_lr_ratio"):
        if not 0 <= getattr(cfg, name) <= 1:
            return f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(cfg, name)}"
    for name in ("dpo_beta", "orpo_beta"):
        if getattr(cfg, name) <= 0:
            return f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}"
    if min(cfg.lr, cfg.weight_decay, cfg.grad_clip) < 0:
        return "--lr (0: the loss's default), --weight-decay and --grad-clip must be >= 0"
    if not 0 <= cfg.seed < 2**31:
        return f"--seed must lie in [0, 2^31), got {cfg.seed}"
    if min(cfg.max_steps, cfg.batch_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size,
           cfg.log_interval, cfg.max_new_tokens) < 1:
        return ("--max-steps, --batch-size, --n-layer, --n-head, --n-embd, --block-size, "
                "--log-interval and --max-new-tokens must be >= 1")
    if min(cfg.eval_interval, cfg.warmup_steps, cfg.limit_rows) < 0:
        return "--eval-interval, --warmup-steps and --limit-rows must be >= 0"
    if cfg.n_embd % cfg.n_head:
        return f"--n-embd {cfg.n_embd} must be divisible by --n-head {cfg.n_head}"
    if cfg.batch_size % WORLD:
        return (f"--batch-size {cfg.batch_size} must be divisible by the {WORLD} processes "
                f"torchrun started: each takes an equal slice")
    if WORLD > 1 and cfg.device == "mps":
        return "torchrun runs on cuda or cpu here: pass --device cpu"
    return None


def parse_config(argv=None):
    """The Config of `python ift.py ...`: flags, checks, and the loss's defaults filled in."""
    cfg = parse_flags(Config, argv, check=config_problem,
                      description=__doc__.split("\n\n")[0].strip())
    cfg.lr = cfg.lr or DEFAULT_LR[cfg.loss]
    cfg.out_dir = cfg.out_dir or str(Path("out") / cfg.loss)
    return cfg


def run(cfg):
    """Train and test one recipe as cfg describes; returns the test results (None off rank 0)."""
    device, out_dir = start(cfg, save_config=True)
    enc = load_tokenizer(cfg.data)
    splits = load_splits(cfg, enc, need_rejected=("train",) if cfg.loss in ("dpo", "orpo") else ())
    model = build_model(cfg, enc, device)
    print(f"{cfg.loss} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | "
          f"device {device} | {len(splits['train'])} train rows | vocab {enc.n_vocab}"
          + (f" | {WORLD} processes, {cfg.batch_size // WORLD} rows each" if WORLD > 1 else ""),
          flush=True)
    log, train_time = train(cfg, model, enc, splits, device, out_dir)
    if RANK != 0:
        return None
    plot_loss_curve(log, cfg.loss, out_dir / "loss.png")
    t, test = time.time(), splits["test"]
    res = evaluate(model, enc, test, device, autocast_for(device), cfg.max_new_tokens)
    res.update(train_seconds=train_time, eval_seconds=time.time() - t, loss=cfg.loss)
    print(f"\ntest split ({res['rows']} rows), after {cfg.max_steps} steps of {cfg.loss} "
          f"({fmt_time(train_time)} training, {fmt_time(res['eval_seconds'])} evaluation):")
    print_eval_table(res)
    for j in range(0, len(test), max(1, len(test) // 4))[:4]:  # four answers, spread out
        ok = "ok " if res["answers"][j].strip() == test.rows[j]["chosen"].strip() else "BAD"
        print(f"  [{ok}] {test.rows[j]['prompt']!r} -> {res['answers'][j]!r}")
    (out_dir / "eval.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out_dir / 'ckpt.pt'}, {out_dir / 'log.csv'}, {out_dir / 'loss.png'}, "
          f"{out_dir / 'eval.json'}")
    return res


def main(argv=None):
    if RANK != 0:  # under torchrun only rank 0 prints
        sys.stdout = open(os.devnull, "w")
    cfg = parse_config(argv)
    print("config: " + json.dumps(dataclasses.asdict(cfg)), flush=True)
    try:
        run(cfg)
        if dist.is_initialized():  # wait for rank 0's test, so all leave the group together
            dist.barrier()
    except UserError as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
