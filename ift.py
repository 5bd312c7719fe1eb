"""
Intuitive Fine-Tuning (IFT) next to SFT, DPO and ORPO, in one file you can read top to bottom.

A tiny GPT is fine-tuned on a toy instruction set (arithmetic, letter reversal, facts stated in the
prompt, long step-by-step additions) with one of four losses, then tested on a held-out split by
greedy exact match, preference accuracy and answer NLL.

    python ift.py --loss ift                 # 2-5 min on a 2-core laptop CPU, testing included
    python ift.py --loss sft                 # the baseline IFT generalises
    python ift.py --loss dpo --init-from out/sft/ckpt.pt    # a sequential recipe: SFT then DPO
    python ift.py --data DIR --loss ift      # your own train/val/test.jsonl (see README.md)
    torchrun --nproc_per_node=2 ift.py --loss ift           # data parallel (DDP), same steps
    python ift.py --help                     # every setting, with its meaning

On a GPU the same commands use bf16 autocast, fused AdamW and torch.compile. Outputs go to
--out-dir (default out/<loss>): config.json, log.csv, loss.png, ckpt.pt, eval.json. Beside this
file, compare.py runs the paper's comparison over seeds and bench.py times each loss's step.

Reference: Hua et al., "Intuitive Fine-Tuning: Towards Simplifying Alignment into a Single
Process", arXiv:2405.11870 (ACL 2025); equation numbers are those of v3. Official code:
github.com/TsinghuaC3I/Intuitive-Fine-Tuning. IFT in four steps (Algorithm 1):
  1. a no-grad forward on the ground truth gives the model's greedy one-step-ahead predictions;
  2. the temporal residual connection (eq. 17) mixes the embedding of each answer token with the
     embedding of the model's own prediction of it: e_t = (1 - lam) E(y_t) + lam E(yhat_t);
  3. a second forward, with gradient, on the mixed embeddings scores the ground-truth tokens;
  4. relation propagation (eq. 21, Algorithm 1 step 3) re-weights each token loss by a discounted
     sum of the losses after it, so early tokens, whose errors derail the rest, weigh more.

Where this code departs from the paper or the official code (the one list; README links here):
  1. Relation propagation follows the official code, a discounted SUFFIX sum of the token losses
     that weights EARLY tokens more, not eq. 21 read literally (a double sum that weights later
     tokens more). The code's form is the one behind the paper's numbers.
  2. As in the official code the relation weights are NOT detached: gradient flows through them
     too and can push late, low-loss tokens UP (see relation_weights). --detach-weights: constants.
  3. gamma = 0 is special-cased to weights of exactly 1, as in the official code; so IFT with
     lam = 0 and gamma = 0 is SFT exactly.
  4. The mix uses the model's own embedding table E (the paper's wording); the official code uses
     a frozen copy of E, re-copied after every step.
  5. The official code's lam schedules are offered (--lam-schedule); its other relation-propagation
     variants (position-only weights, L2 / softmax / log norms) are left out.
  6. Toy scale: a 0.4M-parameter GPT trained from scratch on synthetic tasks with AdamW, not
     Mistral-7B on UltraFeedback with RMSprop. The comparisons are about the losses, not the scale.
"""

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# Config: one dataclass, every field a command-line flag

LOSSES = ("sft", "dpo", "orpo", "ift")
# Peak learning rates, chosen on validation exact match (RESULTS.md). DPO pushes whole answers'
# summed log-probs apart; as hot as SFT it drives the chosen answer's likelihood down too.
DEFAULT_LR = {"sft": 5e-3, "ift": 5e-3, "orpo": 5e-3, "dpo": 2e-5}
# torchrun sets these in each process it starts (see "Training loop"); one process without it
RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def arg(default, help, choices=None):
    """A config field: its default, and the help text (and allowed values) of its --flag."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # what to train
    loss: str = arg("ift", "training loss", LOSSES)
    data: str = arg(str(HERE / "data"), "folder with train.jsonl, val.jsonl and test.jsonl "
                    "(rows: task, prompt, chosen, rejected) and maybe tokenizer.tiktoken")
    init_from: str = arg("", "checkpoint to start from (e.g. SFT then DPO); empty = random")
    out_dir: str = arg("", "output folder; empty = out/<loss>")
    seed: int = arg(1337, "seed of the initial model and of the batch order")
    # model
    n_layer: int = arg(3, "transformer blocks")
    n_head: int = arg(4, "attention heads per block")
    n_embd: int = arg(96, "width C of the residual stream")
    block_size: int = arg(128, "context length in tokens")
    # optimisation
    max_steps: int = arg(2000, "optimizer steps")
    batch_size: int = arg(32, "sequences per step (DPO, ORPO: pairs)")
    lr: float = arg(0.0, "peak learning rate (AdamW); 0 = the loss's entry in DEFAULT_LR")
    min_lr_ratio: float = arg(0.1, "final lr as a fraction of the peak")
    warmup_steps: int = arg(50, "linear warm-up steps, then cosine decay")
    weight_decay: float = arg(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = arg(1.0, "clip the gradient norm (0 = off)")
    # IFT
    lam: float = arg(0.2, "IFT lambda: weight of the model's own predictions in its inputs")
    gamma: float = arg(0.95, "IFT relation-propagation decay; 0 = uniform token weights")
    detach_weights: bool = arg(False, "IFT: constant relation weights (the official code: not)")
    lam_schedule: str = arg("constant", "IFT lambda schedule: constant, warmup (0 -> lam over "
                            "the warm-up) or noisy (lam + N(0, 1) lam / 2 per step)",
                            ("constant", "warmup", "noisy"))
    # preference losses
    dpo_beta: float = arg(0.1, "DPO beta (inverse temperature)")
    orpo_beta: float = arg(0.25, "ORPO weight of the odds-ratio term")
    # logging, evaluation, hardware
    log_interval: int = arg(25, "steps between log lines")
    eval_interval: int = arg(500, "steps between validation evaluations (0 = only at the end)")
    max_new_tokens: int = arg(64, "generation budget per answer")
    limit_rows: int = arg(0, "use only the first N rows of each split (0 = all; for tests)")
    device: str = arg("auto", "auto picks cuda, then mps, then cpu", ("auto", "cpu", "cuda", "mps"))
    compile: str = arg("auto", "torch.compile the training step (auto = on for cuda)",
                       ("auto", "on", "off"))


class UserError(Exception):
    """A problem with the user's input: main() prints it as one line and exits with status 1."""


# -----------------------------------------------------------------------------
# Tokenizer: tiktoken, built offline from a rank file that data/prepare.py trains

# Pre-tokenisation regex: every digit is its own chunk (so "478" is 3 tokens and arithmetic stays
# learnable), words keep one leading space, punctuation runs and whitespace are chunks of their own.
PAT_STR = r"\d| ?[A-Za-z]+| ?[^\sA-Za-z\d]+|\s+(?!\S)|\s+"
SPECIAL_TOKENS = ("<|endoftext|>", "<|user|>", "<|assistant|>")
BUILTIN_TOKENIZER = HERE / "data" / "tokenizer.tiktoken"


def load_tokenizer(data_dir):
    """A tiktoken.Encoding from <data_dir>/tokenizer.tiktoken, plus the three special tokens.

    A folder without one gets the built-in data/tokenizer.tiktoken: a byte-level BPE (ranks
    0..255 are the single bytes), so it encodes any text. The file has one "base64(token bytes)
    rank" line per token, tiktoken's own format; we parse it here (tiktoken.load caches by path
    and would return stale merges after data/prepare.py rewrites the file).
    """
    import base64
    import tiktoken
    path = Path(data_dir) / "tokenizer.tiktoken"
    if not path.is_file() and BUILTIN_TOKENIZER.is_file():
        print(f"note: {data_dir} has no tokenizer.tiktoken: using the built-in byte-level BPE "
              f"(python data/prepare.py --tokenizer-for {data_dir} trains one on your data)")
        path = BUILTIN_TOKENIZER
    if not path.is_file():
        raise UserError(f"{path}: tokenizer file not found; run python data/prepare.py")
    ranks = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise UserError(f"{path} line {lineno}: expected 'base64 rank', got "
                            f"'{line[:40]}'") from None
    if not ranks:
        raise UserError(f"{path}: the file holds no tokens; run python data/prepare.py")
    n = max(ranks.values()) + 1
    return tiktoken.Encoding(name="ift-bpe", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={t: n + i for i, t in enumerate(SPECIAL_TOKENS)})


# -----------------------------------------------------------------------------
# Data: JSON-lines rows -> token ids -> padded batches

FIELDS = ("task", "prompt", "chosen")  # "rejected" is optional: SFT and IFT never read it


def load_rows(path, need_rejected=False, limit=0):
    """Read one split, checking every row; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found (pass --data with a folder holding "
                        f"train.jsonl, val.jsonl and test.jsonl)")
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {lineno}: expected a JSON object")
            for key in FIELDS + (("rejected",) if need_rejected else ()):
                if not isinstance(row.get(key), str):
                    hint = " (DPO and ORPO need preference pairs)" if key == "rejected" else ""
                    raise UserError(f"{path} line {lineno}: missing text field '{key}'{hint}")
            rows.append(row)
            if limit and len(rows) == limit:
                break
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def encode_row(enc, prompt, answer):
    """Token ids of <|user|> prompt <|assistant|> answer <|endoftext|>, and the prompt length."""
    eot, user, assistant = (enc.encode_single_token(t) for t in SPECIAL_TOKENS)
    prompt_ids = [user] + enc.encode_ordinary(prompt) + [assistant]
    return prompt_ids + enc.encode_ordinary(answer) + [eot], len(prompt_ids)


class Split:
    """One split, tokenised. Rows longer than the context are dropped, and we say how many."""

    def __init__(self, rows, enc, block_size, name):
        self.rows, self.chosen, self.rejected = [], [], []  # chosen, rejected: (ids, prompt_len)
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
            raise UserError(f"{name}: every row is longer than --block-size {block_size}")
        self.has_pairs = all(r is not None for r in self.rejected)

    def __len__(self):
        return len(self.rows)


def load_splits(cfg, enc, need_rejected=()):
    """train, val and test from --data, tokenised; need_rejected: the splits that need pairs."""
    splits = {}
    for name in ("train", "val", "test"):
        path = Path(cfg.data) / f"{name}.jsonl"
        rows = load_rows(path, need_rejected=name in need_rejected, limit=cfg.limit_rows)
        splits[name] = Split(rows, enc, cfg.block_size, str(path))
    return splits


def collate(seqs, pad_id):
    """Right-pad sequences into a batch of (inputs x, targets y, answer mask).

    THE SHIFT BY ONE happens here, once: x = seq[:-1] and y = seq[1:], so the logits at position t
    predict y[t] = seq[t+1]. mask[t] is True when y[t] is an answer token (the answer and its
    <|endoftext|>), False on the prompt and on padding. Every loss below reads x, y, mask.
    Padding is pad_id; see make_batch for how training finds it and skips it.
    """
    T = max(len(ids) for ids, _ in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)     # (B, T)
    y = torch.full((len(seqs), T), pad_id, dtype=torch.long)     # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)         # (B, T)
    for i, (ids, prompt_len) in enumerate(seqs):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(ids[1:])
        mask[i, prompt_len - 1:n] = True  # y[prompt_len - 1] is the first answer token
    return x, y, mask


def make_batch(seqs, pad_id, device):
    """collate() on device, plus real (B, T): True at the real input tokens, False on padding.

    Training and evaluation pad with pad_id = <|endoftext|>, and x = seq[:-1] holds no real one
    (a sequence's only <|endoftext|> is its last token, which x leaves out; encode_ordinary never
    makes one), so the padding is exactly where x == pad_id. GPT(x, real=real) skips it.
    """
    x, y, mask = collate(seqs, pad_id)
    return tuple(t.to(device) for t in (x, y, mask, x != pad_id))     # (B, T) each


# -----------------------------------------------------------------------------
# Model: a tiny GPT (nanoGPT's shape) that can also take input embeddings directly
# B = batch, T = time (tokens), C = channels (n_embd), V = vocabulary, H = heads,
# M = the real (non-padding) tokens of a batch
#
# Unpadding. A training batch mixes rows of 17 to 75 tokens right-padded to the longest, so only
# about half of its B x T positions hold real tokens. Given real, the (B, T) mask of those,
# GPT.forward gathers the M real tokens into one (M, C) tensor after the embeddings and runs the
# per-token layers on them alone: LayerNorms, the qkv and proj linears, MLPs, the output layer.
# Attention, the one layer that mixes positions, scatters q, k, v back into the padded layout
# (zeros at padding) for scaled_dot_product_attention and gathers its output again. It is exact:
# each per-token layer computes each real token as before, and with causal attention and right
# padding a real token never attends to padding (padding only comes after it). The logits go
# back to (B, T, V), zeros at padding, so sequence_logps and the losses are unchanged. What it
# reclaims: every layer but attention skips the padding; a step takes ~30% less time (bench.py).


def pad_rows(rows, real):
    """The inverse of rows = t[real]: (M, D) -> (B, T, D), zeros at the padding."""
    return rows.new_zeros(*real.shape, rows.shape[-1]).index_put((real,), rows)


class SelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, attn_mask=None, cache=None, real=None):
        """x (B, T, C); or unpadded, x (M, C) and real (B, T) marking where its rows belong."""
        C = x.shape[-1]
        qkv = self.qkv(x)                                                # (B, T, 3C) or (M, 3C)
        if real is not None:
            qkv = pad_rows(qkv, real)                                    # (B, T, 3C)
        B, T = qkv.shape[:2]
        q, k, v = qkv.split(C, dim=2)                                    # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))                                   # 3 x (B, H, T, C/H)
        if cache is not None:  # generation: prepend the keys and values of earlier tokens
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)                    # (B, H, T_past + T, C/H)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        if attn_mask is None:  # training: plain causal attention, right padding is never seen
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        y = y.transpose(1, 2).reshape(B, T, C)                           # (B, T, C)
        return self.proj(y if real is None else y[real])                 # (B, T, C) or (M, C)


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd))

    def forward(self, x, attn_mask=None, cache=None, real=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, real)  # pre-LayerNorm residual blocks
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

    def forward(self, idx=None, tok_emb=None, pos=None, attn_mask=None, caches=None,
                only_at=None, real=None):
        """Logits (B, T, V) for token ids idx (B, T) or for given token embeddings (B, T, C).

        IFT passes tok_emb: a mix of rows of self.wte, so the positional embedding is added here,
        after the mix, exactly as for ordinary tokens. pos (B, T) defaults to 0..T-1.
        real, the (B, T) bool mask of the real tokens of a right-padded batch (make_batch), skips
        the padding (see Unpadding above); its logits are zeros. Generation passes none.
        only_at, a (B, T) bool mask (within real, if given), returns the logits (K, V) of its K
        True positions only.
        """
        x = self.wte(idx) if tok_emb is None else tok_emb                  # (B, T, C)
        if pos is None:
            pos = torch.arange(x.shape[1], device=x.device)                # (T,)
        x = x + self.wpe(pos)                                              # (B, T, C)
        if real is not None:
            x = x[real]                                                    # (M, C)
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, None if caches is None else caches[i], real)
        x = self.ln_f(x)                                                   # (B, T, C) or (M, C)
        if only_at is not None:  # among the M real rows, only_at[real] marks the K wanted
            x = x[only_at if real is None else only_at[real]]              # (K, C)
        # tied embeddings: the output layer is E itself
        logits = F.linear(x, self.wte.weight)              # (B, T, V), (M, V) or (K, V)
        if real is not None and only_at is None:
            logits = pad_rows(logits, real)                                # (B, T, V)
        return logits


# -----------------------------------------------------------------------------
# Log-probs: the one helper every loss uses

def sequence_logps(logits, y, mask):
    """Per-token log-probs of the targets on the answer, and their sum per sequence.

    logits (B, T, V) come from inputs x; y (B, T) are the targets, ALREADY shifted by one in
    collate(), so logits[:, t] scores y[:, t]. Returns token_logps (B, T), zero off the mask, and
    logps (B,) = token_logps.sum(-1): "*_logps" always means summed over answer tokens.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)                      # (B, T, V), float32
    token_logps = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1) * mask     # (B, T)
    return token_logps, token_logps.sum(-1)                                # (B, T), (B,)


# -----------------------------------------------------------------------------
# Losses, side by side. Each returns (loss, metrics): loss a scalar to minimise, metrics a dict
# of detached tensors to log (scalars or (B,)). The shapes: B sequences (DPO, ORPO: B pairs).

# SFT. The model judges its answer from ground-truth prefixes only (teacher forcing):
#   L_SFT = - 1/|D| sum_(x,y) 1/N sum_{t=1..N} log p(y_t | x, y_<t)
# mean over the N answer tokens of each sequence (so long answers do not dominate), then the mean
# over sequences. In code: token_logps = log p(y_t | .), mask marks the N answer tokens.
# The paper (sec. 3) reads this as preference estimation that "secretly sets T(s*_{n-1}|x) = 1":
# it scores token t as if the model had produced every earlier token perfectly (exposure bias).

def sft_loss(token_logps, mask):
    """token_logps (B, T) from sequence_logps, mask (B, T) -> (loss, {})."""
    n = mask.sum(-1)                                                       # (B,)
    return (-token_logps.sum(-1) / n).mean(), {}


# DPO (Rafailov et al. 2023; paper sec. 3, eq. 8). With log pi summed over answer tokens,
#   h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
#   L_DPO = - log sigmoid(beta * h)
# At pi = pi_ref, h = 0 and the loss is -log(1/2) = ln 2. The implicit rewards
# beta * (log pi - log pi_ref) of chosen and rejected are reported, detached.
# In code: policy_chosen_logps = log pi(y_w|x), ref_rejected_logps = log pi_ref(y_l|x), etc.
# The reference is frozen and has no dropout, so its log-probs are a fixed function of the row:
# train() computes them ONCE per training row before the first step, which is exact and saves
# the reference forward of every step (one model in memory, not two).

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1):
    """Four (B,) summed log-probs -> (loss, {rewards_chosen, rewards_rejected, margins,
    accuracy}), each metric (B,)."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(beta * h).mean()
    rewards_chosen = beta * (policy_chosen_logps - ref_chosen_logps).detach()      # (B,)
    rewards_rejected = beta * (policy_rejected_logps - ref_rejected_logps).detach()  # (B,)
    return loss, {"rewards_chosen": rewards_chosen, "rewards_rejected": rewards_rejected,
                  "margins": rewards_chosen - rewards_rejected,
                  "accuracy": (rewards_chosen > rewards_rejected).float()}


# ORPO (Hong et al. 2024; paper sec. 3). Reference-free; with p(y) the LENGTH-NORMALISED
# probability exp(mean_t log p(y_t|.)) and odds(y) = p / (1 - p):
#   L_ORPO = L_SFT(y_w) - beta * log sigmoid(log odds(y_w) - log odds(y_l))
#   log odds(y) = m - log(1 - exp(m)),  m = mean log-prob of y
# In code: m_chosen = policy_chosen_logps / chosen_lengths. log(1 - exp(m)) is computed as
# log(-expm1(m)), accurate for m near 0; m is capped at -1e-6 so a perfectly learned answer
# (p -> 1, odds -> inf) gives a finite loss (with zero gradient through the cap).

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


# IFT, relation propagation (eq. 21; Algorithm 1 step 3 as the official code computes it).
# For one sequence with token losses l_t on its N answer tokens:
#   1. c_t = l_t / N on the answer, 0 elsewhere
#   2. S_t = sum_{j >= t} gamma^(j - t) c_j       a discounted SUFFIX sum ("reward-to-go")
#   3. w_t = S_t * N / S,  S = sum_k S_k          rescaled so the weights average 1 on the answer
#   4. gamma = 0 is special-cased to w_t = 1 (the formula would give w_t = l_t / mean(l)), as in
#      the official code; then IFT's loss is SFT's.
# With equal losses the weights fall along the answer (20 tokens, gamma .95: ~1.6 -> ~0.1): an
# early token's error propagates to every later one, so it weighs more.
# Eq. 21 read literally is a linear double sum that weights LATER tokens more; we follow the code.
# The gradient, worked out. The sequence's loss is L = (1/N) sum_t l_t w_t = sum_t l_t S_t / S,
# a weighted mean of its token losses. Since dS_t/dl_j = gamma^(j-t) / N for t <= j,
#   dL/dl_j = ( S_j + (1/N) sum_{t <= j} gamma^(j-t) (l_t - L) ) / S
# The first term is the detached weight (w_j / N); the second, from the gradient through the
# weights, is negative when the losses up to j are mostly below L. So a late, low-loss token can
# get a NEGATIVE coefficient: training pushes its loss UP. A worked example: losses
# [2 .1 .1 .1 3 .1 .1 .1], gamma .95 give L = 1.135 and
#   dL/dl = [.318 .158 .105 .055 .167 -.053 -.112 -.167]
# (test_relation_weights_gradient_worked_example checks it three ways). detach=True makes every
# coefficient w_j / N > 0: a pure re-weighting of SFT's token losses. The official code does not
# detach. In code: token_losses (B, T) = l, mask (B, T), S_t computed as c @ G^T with the (T, T)
# upper-triangular matrix G[t, j] = gamma^(j - t) for j >= t.

def relation_weights(token_losses, mask, gamma, detach=False):
    """token_losses (B, T), mask (B, T) -> weights w (B, T): mean 1 on the mask, 0 off it."""
    mask = mask.to(token_losses.dtype)                                     # (B, T)
    if gamma == 0:
        return mask.clone()
    if detach:
        token_losses = token_losses.detach()
    n = mask.sum(-1, keepdim=True).clamp(min=1)                            # (B, 1)
    c = token_losses * mask / n                                            # (B, T)
    T = c.shape[1]
    steps = torch.arange(T, device=c.device)
    offset = (steps[None, :] - steps[:, None]).to(c.dtype)                 # (T, T): j - t
    G = torch.where(offset >= 0, gamma ** offset.clamp(min=0), torch.zeros_like(offset))
    S = (c @ G.T) * mask                                                   # (B, T)
    return S * n / S.sum(-1, keepdim=True).clamp(min=1e-12)               # (B, T)


# IFT, the whole step (Algorithm 1). x, y, mask as made by collate().
#   1. Inference one step ahead, no gradient: yhat = argmax_v logits(x)[:, t, v] predicts y[:, t].
#   2. Temporal residual connection (eq. 17): the input at position t+1 is y[:, t]; where y[:, t]
#      is an answer token, its "intuition" is the model's own prediction of it, yhat[:, t]:
#        x~[:, t+1] = yhat[:, t] if mask[:, t] else x[:, t+1];   x~[:, 0] = x[:, 0]
#        e = (1 - lam) E(x) + lam E(x~)
#      Prompt and padding positions keep the ground truth (x~ = x there). The first answer token
#      is predicted from the last prompt token, so its loss is unchanged.
#      E is the model's own wte (it gets gradient through both terms); the official code mixes
#      with a frozen copy of E instead.
#   3. Second forward WITH gradient on e; l_t = -log p(y_t | e_<=t) against the GROUND TRUTH.
#   4. loss = mean over sequences of (1/N) sum_t l_t w_t, w = relation_weights(l).
# With lam = 0 the mix is E(x) exactly and with gamma = 0 the weights are 1: SFT in value and
# gradient. Cost: one extra forward without activations kept (and through the output layer at
# the answer positions only), ~1.3x an SFT step: python bench.py measures it.

def shifted_predictions(x, yhat, mask):
    """x~ of step 2: the model's prediction at answer inputs, the ground truth everywhere else."""
    x_tilde = x.clone()                                                     # (B, T)
    x_tilde[:, 1:] = torch.where(mask[:, :-1], yhat[:, :-1], x[:, 1:])
    return x_tilde


def ift_loss(model, x, y, mask, lam=0.2, gamma=0.95, detach_weights=False, real=None):
    """x, y, mask (B, T) from collate(), maybe real (B, T) from make_batch() (then both forwards
    skip the padding) -> (loss, {"sft_nll": the SFT loss of the same batch})."""
    gpt = getattr(model, "module", model)  # under torchrun: the GPT inside DDP (its wte is E)
    with torch.no_grad():  # nothing of this pass is kept for the backward
        # only the predictions of answer tokens are used: the output layer skips the rest
        yhat = torch.zeros_like(x)                                          # (B, T)
        yhat[mask] = gpt(x, only_at=mask, real=real).argmax(-1)             # (K,) on the answer
    x_tilde = shifted_predictions(x, yhat, mask)                            # (B, T)
    tok_emb = (1 - lam) * gpt.wte(x) + lam * gpt.wte(x_tilde)               # (B, T, C)
    token_logps, _ = sequence_logps(model(tok_emb=tok_emb, real=real), y, mask)  # (B, T)
    token_losses = -token_logps                                             # (B, T)
    w = relation_weights(token_losses, mask, gamma, detach=detach_weights)  # (B, T)
    loss = ((token_losses * w).sum(-1) / mask.sum(-1)).mean()
    return loss, {"sft_nll": sft_loss(token_logps.detach(), mask)[0]}


def lam_at(cfg, step, noise):
    """lam for this step: constant, linear warm-up, or the official code's noisy lam."""
    lam = cfg.lam
    if cfg.lam_schedule == "warmup":
        lam = cfg.lam * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    elif cfg.lam_schedule == "noisy":
        lam = lam + noise * 0.5 * lam
    return min(1.0, max(0.0, lam))


# -----------------------------------------------------------------------------
# Training loop
#
# Data parallel, as in nanoGPT: `torchrun --nproc_per_node=N ift.py ...` starts N copies of this
# script with RANK and WORLD_SIZE set. Each draws the same global batch and trains on its own
# equal slice; every loss is a mean over sequences, so DDP's averaged gradient is the one a single
# process gets from the whole batch. Rank 0 alone prints (its slice's loss), tests and writes.

def pick_device(name):
    """The torch.device that --device names; auto takes cuda, then mps, then cpu."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    name = next(d for d in available if available[d]) if name == "auto" else name
    if not available[name]:
        raise UserError(f"--device {name}: not available on this machine; use --device cpu")
    return torch.device(name)


def autocast_for(device):
    """bf16 autocast on CUDA (matmuls in bf16, reductions in float32); plain float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def start(cfg, save_config=False):
    """Seed, pick the device (joining torchrun's processes if it started us), create --out-dir
    (and save the resolved config there). Returns (device, out_dir)."""
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    if WORLD > 1:
        if device.type == "cuda":  # one GPU per process
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise UserError(f"torchrun runs on cuda or cpu here, not {device.type}; "
                            f"pass --device cpu")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":
        # Tiny weights and gradients underflow into subnormal floats, which CPUs compute
        # 10-100x slower; flushing them to zero changes nothing we can measure here.
        torch.set_flush_denormal(True)
    out_dir = Path(cfg.out_dir)
    try:
        if RANK == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            if save_config:
                (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    except OSError as e:
        raise UserError(f"--out-dir {out_dir}: cannot write there ({e.strerror})") from None
    return device, out_dir


def model_args(cfg, enc):
    return {"vocab_size": enc.n_vocab, "block_size": cfg.block_size, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_embd": cfg.n_embd}


def build_model(cfg, enc, device):
    """A fresh GPT of the configured size, or the --init-from checkpoint, on device."""
    model = GPT(**model_args(cfg, enc))
    if cfg.init_from:
        model.load_state_dict(load_checkpoint(cfg.init_from, model_args(cfg, enc)))
    return model.to(device)


def load_checkpoint(path, expected_args):
    """The state dict of a checkpoint written by this script, checked against the model config."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--init-from {path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved, state = ckpt["model_args"], ckpt["model"]
    except Exception as e:
        raise UserError(f"--init-from {path}: not a checkpoint of ift.py "
                        f"({type(e).__name__})") from None
    diff = [f"{k} {saved.get(k)} != {v}" for k, v in expected_args.items() if saved.get(k) != v]
    if diff:
        raise UserError(f"--init-from {path}: incompatible model ({', '.join(diff)}); "
                        f"pass the same model flags and tokenizer it was trained with")
    return state


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def pair_batch(split, idx, pad_id, device):
    """Chosen and rejected answers of the same rows stacked into one batch of 2B sequences:
    make_batch's x, y, mask, real."""
    seqs = [split.chosen[i] for i in idx] + [split.rejected[i] for i in idx]
    return make_batch(seqs, pad_id, device)


@torch.no_grad()
def reference_logps(model, split, pad_id, device, autocast, batch_size=128):
    """Summed log-probs (N, 2) of every row's chosen and rejected answer under a frozen model."""
    out = []
    for i in range(0, len(split), batch_size):
        idx = list(range(i, min(i + batch_size, len(split))))
        x, y, mask, real = pair_batch(split, idx, pad_id, device)
        with autocast:
            logits = model(x, real=real)
        _, logps = sequence_logps(logits, y, mask)                          # (2b,)
        out.append(torch.stack(logps.split(len(idx)), dim=1))               # (b, 2)
    return torch.cat(out)                                                   # (N, 2)


def compute_loss(cfg, model, split, idx, pad_id, device, autocast, ref, lam):
    """The loss of the batch of rows idx under cfg.loss, the metrics to log, and the tokens
    read: real tokens only, the padding (which the model skips) left out."""
    if cfg.loss in ("sft", "ift"):
        x, y, mask, real = make_batch([split.chosen[i] for i in idx], pad_id, device)
        with autocast:
            if cfg.loss == "ift":
                loss, metrics = ift_loss(model, x, y, mask, lam, cfg.gamma, cfg.detach_weights,
                                         real)
            else:
                loss, metrics = sft_loss(sequence_logps(model(x, real=real), y, mask)[0], mask)
        return loss, metrics, int(real.sum())
    x, y, mask, real = pair_batch(split, idx, pad_id, device)
    with autocast:
        _, logps = sequence_logps(model(x, real=real), y, mask)             # (2B,)
    chosen, rejected = logps.split(len(idx))                                # (B,), (B,)
    lengths = mask.sum(-1).float()                                          # (2B,)
    if cfg.loss == "dpo":
        loss, m = dpo_loss(chosen, rejected, ref[idx, 0], ref[idx, 1], cfg.dpo_beta)
    else:
        loss, m = orpo_loss(chosen, rejected, *lengths.split(len(idx)), cfg.orpo_beta)
    metrics = {"acc": m["accuracy"].mean(), "chosen_nll": -(chosen / lengths[:len(idx)]).mean()}
    if cfg.loss == "dpo":
        metrics["margin"] = m["margins"].mean()
    return loss, metrics, int(real.sum())


def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def make_optimizer(cfg, model, device):
    """AdamW, weight decay on the matrices only, fused on CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.99), fused=device.type == "cuda")


def wrap_for_training(cfg, model, device):
    """What the training step calls: model, maybe compiled, inside DDP under torchrun. All share
    model's parameters, so the optimizer, evaluation and checkpoints use model itself."""
    if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"):
        # batches are padded to their longest row, so T changes from step to step, and so does
        # the count M of real tokens: dynamic=True compiles one graph for every T and M instead
        # of a new graph for each new length
        model = torch.compile(model, dynamic=True)
    if WORLD > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def train(cfg, model, enc, splits, device, out_dir):
    """Optimise cfg.loss for cfg.max_steps; log, evaluate on val, checkpoint. Returns the log
    and the seconds it took."""
    train_split, pad_id, autocast = splits["train"], enc.eot_token, autocast_for(device)
    ref = None
    if cfg.loss == "dpo":
        if not cfg.init_from:
            print("note: DPO without --init-from: the reference is the random initial model")
        model.eval()
        ref = reference_logps(model, train_split, pad_id, device, autocast)  # (N, 2)
    optimizer = make_optimizer(cfg, model, device)
    step_model = wrap_for_training(cfg, model, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    lam_noise = torch.randn(cfg.max_steps, generator=torch.Generator().manual_seed(cfg.seed + 1))
    stream = batches(len(train_split), cfg.batch_size, gen)
    log = []
    t0 = t_log = time.time()
    ntok_since = 0
    for step in range(cfg.max_steps):
        model.train()
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        lam = lam_at(cfg, step, lam_noise[step].item())
        idx = next(stream)  # every process draws the same global batch and takes its slice
        idx = idx[RANK * len(idx) // WORLD:(RANK + 1) * len(idx) // WORLD]
        loss, metrics, ntok = compute_loss(cfg, step_model, train_split, idx, pad_id, device,
                                           autocast, ref, lam)
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
            row = {"step": step, "loss": loss.item(), "lr": lr, "lam": lam}
            log.append(row)
        if log_now:
            now = time.time()
            row["tok_per_s"] = ntok_since / max(now - t_log, 1e-9)  # useful: no padding
            t_log, ntok_since = now, 0
            eta = (now - t0) / (step + 1) * (cfg.max_steps - step - 1)
            extra = "".join(f" | {k} {v.item():.4f}" for k, v in metrics.items())
            lam_txt = f" | lam {lam:.3f}" if cfg.loss == "ift" else ""
            print(f"step {step:5d} | loss {row['loss']:.4f}{extra} | lr {lr:.1e}{lam_txt} | "
                  f"{row['tok_per_s'] / 1000:.1f}k useful tok/s | eta {fmt_time(eta)}",
                  flush=True)
        if eval_now:
            t_eval = time.time()
            res = evaluate(model, enc, splits["val"], device, autocast, cfg.max_new_tokens)
            print(f"eval step {step:5d} | val exact match {res['exact_match']:.3f} | "
                  f"val answer nll {res['nll']:.4f}", flush=True)
            row.update(val_exact_match=res["exact_match"], val_nll=res["nll"])
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise UserError(f"step {step}: the weights hold NaN or inf; lower --lr (now "
                                f"{cfg.lr}); the last good checkpoint was kept")
            save_atomic({"model": model.state_dict(), "model_args": model_args(cfg, enc),
                         "config": dataclasses.asdict(cfg), "step": step}, out_dir / "ckpt.pt")
            t_log += time.time() - t_eval  # tok/s counts training time only
    if RANK == 0:
        with (out_dir / "log.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "lam", "tok_per_s",
                                                   "val_exact_match", "val_nll"])
            writer.writeheader()
            writer.writerows(log)
    return log, time.time() - t0


# -----------------------------------------------------------------------------
# Evaluation: greedy exact match (batched, KV cache), preference accuracy, answer NLL

@torch.no_grad()
def generate(model, prompts, eot, max_new_tokens, device, autocast):
    """Greedy answers for a list of prompt id lists, batched with left padding and a KV cache.

    Prompts are right-aligned: row b has pad_b padding tokens first. Its positions are counted
    from its first real token, and attention never looks at padding keys. (A padding query may
    look at itself only, so no softmax row is empty.)
    """
    model.eval()
    B, P = len(prompts), max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, model.block_size - P)
    pad = torch.tensor([P - len(p) for p in prompts], device=device)        # (B,)
    idx = torch.full((B, P), eot, dtype=torch.long, device=device)          # (B, P)
    for b, p in enumerate(prompts):
        idx[b, P - len(p):] = torch.tensor(p)
    steps = torch.arange(P, device=device)
    pos = (steps[None, :] - pad[:, None]).clamp(min=0)                      # (B, P)
    valid = steps[None, :] >= pad[:, None]                                  # (B, P) real tokens
    causal = steps[None, :, None] >= steps[None, None, :]                   # (1, P, P)
    mask = (causal & valid[:, None, :]) | torch.eye(P, dtype=torch.bool, device=device)
    caches = [{} for _ in model.blocks]
    out = torch.empty((B, 0), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    with autocast:
        logits = model(idx, pos=pos, attn_mask=mask[:, None], caches=caches)  # (B, P, V)
        for t in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)                                  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, eot), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eot
            if done.all() or t == max_new_tokens - 1:
                break
            valid = torch.cat([valid, torch.ones((B, 1), dtype=torch.bool, device=device)], 1)
            logits = model(nxt[:, None], pos=(P + t - pad)[:, None],
                           attn_mask=valid[:, None, None, :], caches=caches)  # (B, 1, V)
    return [row[:row.index(eot)] if eot in row else row for row in out.tolist()]


@torch.no_grad()
def evaluate(model, enc, split, device, autocast, max_new_tokens, batch_size=256, samples=0):
    """Exact match per task and overall, preference accuracy, answer NLL (+ a few samples)."""
    model.eval()
    eot = enc.eot_token
    # rows of similar prompt length (mostly: of one family) share a batch, so a batch of short
    # answers stops generating early instead of waiting for the longest answer in the split
    order = sorted(range(len(split)), key=lambda j: split.chosen[j][1])
    correct, nll, pref, completions = [], [], [], {}  # in that order; completions by row
    for i in range(0, len(split), batch_size):
        idx = order[i:i + batch_size]
        prompts = [split.chosen[j][0][:split.chosen[j][1]] for j in idx]
        for j, ids in zip(idx, generate(model, prompts, eot, max_new_tokens, device, autocast)):
            completions[j] = enc.decode(ids)
            correct.append(completions[j].strip() == split.rows[j]["chosen"].strip())
        x, y, mask, real = make_batch([split.chosen[j] for j in idx], eot, device)
        with autocast:
            _, logps = sequence_logps(model(x, real=real), y, mask)
        nll += (-logps / mask.sum(-1)).tolist()
        if split.has_pairs:
            x, y, mask, real = make_batch([split.rejected[j] for j in idx], eot, device)
            with autocast:
                _, rejected_logps = sequence_logps(model(x, real=real), y, mask)
            pref += (logps > rejected_logps).tolist()
    rows = [split.rows[j] for j in order]
    tasks = sorted({r["task"] for r in split.rows})

    def mean(values, task=None):  # over every row, or over the rows of one task
        picked = [v for v, r in zip(values, rows) if task in (None, r["task"])]
        return sum(picked) / len(picked)
    res = {"exact_match": mean(correct),
           "exact_match_by_task": {t: mean(correct, t) for t in tasks},
           "nll": mean(nll), "nll_by_task": {t: mean(nll, t) for t in tasks},
           "preference_accuracy": mean(pref) if pref else None,
           "preference_accuracy_by_task": {t: mean(pref, t) for t in tasks} if pref else None,
           "rows": len(correct)}
    if samples:
        step = max(1, len(split) // samples)
        res["samples"] = [{"task": split.rows[j]["task"], "prompt": split.rows[j]["prompt"],
                           "target": split.rows[j]["chosen"], "output": completions[j]}
                          for j in range(0, len(split), step)][:samples]
    return res


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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], label=f"train {loss_name} loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    evals = [r for r in log if "val_exact_match" in r]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["val_exact_match"] for r in evals], "o-",
                 color="tab:orange", label="val exact match")
        ax2.set_ylabel("val exact match (fraction)")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title(f"ift.py --loss {loss_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# main: the command line (the same flag machinery serves frozen_lake.py, compare.py, bench.py)

class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (exit status 2), not a usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_flags(cls, argv=None, check=None, skip=(), description=""):
    """An instance of the config dataclass cls from the command line.

    Every field but those in skip becomes a --flag (underscores become dashes): a bool field is a
    switch, a tuple field takes several numbers. check(cfg) returns the first problem with the
    values as one line (printed as the error), or None.
    """
    parser = ArgumentParser(description=description, allow_abbrev=False)  # --lr is not --lr-sweep
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if isinstance(f.default, bool):
            kind = {"action": "store_true"}
        elif isinstance(f.default, tuple):
            kind = {"type": float, "nargs": "+"}
        else:
            kind = {"type": type(f.default), "choices": f.metadata["choices"]}
        parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                            help=f"{f.metadata['help']} (default: {f.default})", **kind)
    given = vars(parser.parse_args(argv))
    cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    problem = check(cfg) if check else None
    if problem:
        parser.error(problem)
    return cfg


def config_problem(cfg):
    """The first problem with a Config's values, as one line, or None."""
    problems = [
        (not 0 <= cfg.lam <= 1, f"--lam must lie in [0, 1], got {cfg.lam}"),
        (not 0 <= cfg.gamma <= 1, f"--gamma must lie in [0, 1], got {cfg.gamma}"),
        (cfg.dpo_beta <= 0, f"--dpo-beta must be > 0, got {cfg.dpo_beta}"),
        (cfg.orpo_beta <= 0, f"--orpo-beta must be > 0, got {cfg.orpo_beta}"),
        (cfg.lr < 0, f"--lr must be > 0 (or 0 for the loss's default), got {cfg.lr}"),
        (min(cfg.max_steps, cfg.batch_size, cfg.n_layer, cfg.n_head, cfg.block_size,
             cfg.log_interval, cfg.max_new_tokens) < 1, "--max-steps, --batch-size, --n-layer, "
         "--n-head, --block-size, --log-interval and --max-new-tokens must be >= 1"),
        (min(cfg.eval_interval, cfg.warmup_steps, cfg.limit_rows) < 0,
         "--eval-interval, --warmup-steps and --limit-rows must be >= 0"),
        (cfg.n_embd % max(cfg.n_head, 1), f"--n-embd {cfg.n_embd} must be divisible by --n-head "
                                          f"{cfg.n_head}"),
        (cfg.batch_size % WORLD, f"--batch-size {cfg.batch_size} must be divisible by the "
                                 f"{WORLD} processes torchrun started: each takes an equal slice"),
    ]
    return next((message for bad, message in problems if bad), None)


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
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.loss} | {n_params / 1e6:.2f}M parameters | device {device} | "
          f"{len(splits['train'])} train rows | vocab {enc.n_vocab}"
          + (f" | {WORLD} processes, {cfg.batch_size // WORLD} rows each" if WORLD > 1 else ""),
          flush=True)
    log, train_time = train(cfg, model, enc, splits, device, out_dir)
    if RANK != 0:
        return None
    plot_loss_curve(log, cfg.loss, out_dir / "loss.png")
    t = time.time()
    res = evaluate(model, enc, splits["test"], device, autocast_for(device), cfg.max_new_tokens,
                   samples=4)
    res.update(train_seconds=train_time, eval_seconds=time.time() - t, loss=cfg.loss)
    print(f"\ntest split ({res['rows']} rows), after {cfg.max_steps} steps of {cfg.loss} "
          f"({fmt_time(train_time)} training, {fmt_time(res['eval_seconds'])} evaluation):")
    print_eval_table(res)
    for s in res["samples"]:
        ok = "ok " if s["output"].strip() == s["target"].strip() else "BAD"
        print(f"  [{ok}] {s['prompt']!r} -> {s['output']!r}")
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
