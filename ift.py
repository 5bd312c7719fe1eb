"""
Intuitive Fine-Tuning (IFT) next to SFT, DPO and ORPO, in one file you can read top to bottom.

A tiny GPT is fine-tuned on a toy instruction set (arithmetic, letter reversal, facts stated in the
prompt, and long step-by-step additions) with one of four losses, then evaluated on a held-out test
split by greedy exact match, preference accuracy and answer NLL.

    python ift.py --loss ift                 # ~3 min on a 2-core laptop CPU, evaluation included
    python ift.py --loss sft                 # the baseline IFT generalises
    python ift.py --loss dpo --init-from out/sft/ckpt.pt    # a sequential recipe: SFT then DPO
    python ift.py --bench                    # ms/step of SFT, IFT, DPO, ORPO on one batch
    python ift.py --compare                  # the paper's comparison: 14 recipes x 5 seeds,
                                             # paired verdicts on its claims (~50 min on 2 cores)
    torchrun --nproc_per_node=2 ift.py --loss ift           # data parallel (DDP), same result
    python ift.py --help                     # every setting, with its meaning

On a GPU the same command uses bf16 autocast, fused AdamW and torch.compile (--compile) and
logs the model FLOPs utilisation. Outputs go to --out-dir (default out/<loss>): config.json,
log.csv, loss.png, ckpt.pt, eval.json; --compare writes compare.md, compare.json, compare.png
(and every run's files under runs/).

Reference: Hua et al., "Intuitive Fine-Tuning: Towards Simplifying Alignment into a Single
Process", arXiv:2405.11870 (ACL 2025); equation numbers are those of v3. Official code:
github.com/TsinghuaC3I/Intuitive-Fine-Tuning. IFT in four steps (Algorithm 1):
  1. a no-grad forward on the ground truth gives the model's greedy one-step-ahead predictions;
  2. the temporal residual connection (eq. 17) mixes the embedding of each answer token with the
     embedding of the model's own prediction of it: e_t = (1 - lam) E(y_t) + lam E(yhat_t);
  3. a second forward, with gradient, on the mixed embeddings scores the ground-truth tokens;
  4. relation propagation (eq. 21, Algorithm 1 step 3) re-weights each token loss by a discounted
     sum of the losses after it, so early tokens, whose errors derail the rest, weigh more.

Where this code departs from the paper or the official code:
  1. Relation propagation follows the official code (a discounted SUFFIX sum of token_loss / N,
     rescaled to average 1 over the answer), not eq. 21 read literally (a double sum that weights
     later tokens more). The code's form is the one behind the paper's numbers.
  2. As in the official code the weights are NOT detached, so gradient also flows through them;
     --detach-weights gives the variant where they are constants (see relation_weights).
  3. The official code special-cases gamma = 0 to weights of exactly 1; so does this code, which is
     what makes IFT with lam = 0, gamma = 0 equal to SFT.
  4. The embeddings are mixed with the model's own token-embedding table E (the paper's wording);
     the official code mixes with a frozen copy of E that it re-copies after every step.
  5. The official code's lam schedules are offered (--lam-schedule constant | warmup | noisy); its
     other propagation variants (position-only weights, L2 / softmax / log norms) are left out.
  6. Toy scale: a 0.4M-parameter GPT trained from scratch on synthetic tasks with AdamW, not
     Mistral-7B on UltraFeedback with RMSprop. The comparisons are about the losses, not the scale.
"""

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
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
# Default peak learning rates. DPO pushes whole answers' summed log-probs apart; run as hot as
# SFT on pairs that differ by one edit it drives the chosen answer's likelihood down as well
# (SFT then DPO at 5e-3: chosen NLL ~30 nats per token, exact match 0). Its literature trains
# well below SFT's learning rate; 2e-5 had the best validation exact match of 2e-5, 1e-4, 5e-4
# for SFT then DPO (README, "Choosing DPO's learning rate").
DEFAULT_LR = {"sft": 5e-3, "ift": 5e-3, "orpo": 5e-3, "dpo": 2e-5}


@dataclass
class Config:
    # what to train
    loss: str = field(default="ift", metadata={"help": "training loss: sft, dpo, orpo or ift"})
    data: str = field(default=str(HERE / "data"),
                      metadata={"help": "folder with train/val/test.jsonl (rows: task, prompt, "
                                        "chosen, rejected)"})
    tokenizer: str = field(default="toy", metadata={
        "help": "'toy' = data/tokenizer.tiktoken (BPE trained on the train split); "
                "'gpt2' = tiktoken's GPT-2 encoding (needs it cached or a network)"})
    init_from: str = field(default="", metadata={
        "help": "checkpoint to start from (sequential recipes, e.g. SFT then DPO); empty = random"})
    out_dir: str = field(default="", metadata={"help": "output folder; empty = out/<loss>"})
    seed: int = field(default=1337, metadata={"help": "seed of the initial model and batch order"})
    # model
    n_layer: int = field(default=3, metadata={"help": "transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads per block"})
    n_embd: int = field(default=96, metadata={"help": "width C of the residual stream"})
    block_size: int = field(default=128, metadata={"help": "context length in tokens"})
    # optimisation
    max_steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "sequences per step (DPO/ORPO: pairs)"})
    lr: float = field(default=0.0, metadata={
        "help": "peak learning rate (AdamW); 0 = the loss's default in DEFAULT_LR"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of --lr"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps, then cosine"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm (0 = off)"})
    # IFT
    lam: float = field(default=0.2, metadata={
        "help": "IFT lambda: weight of the model's own predictions in the input embeddings"})
    gamma: float = field(default=0.95, metadata={
        "help": "IFT relation-propagation decay; 0 = uniform token weights"})
    detach_weights: bool = field(default=False, metadata={
        "help": "IFT: treat the relation weights as constants (the official code does not)"})
    lam_schedule: str = field(default="constant", metadata={
        "help": "IFT lambda schedule: constant, warmup (0 -> lam over the warm-up), or noisy "
                "(lam + N(0,1) * 0.5 * lam per step, clamped to [0, 1])"})
    # preference losses
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO beta (inverse temperature)"})
    orpo_beta: float = field(default=0.25, metadata={"help": "ORPO weight of the odds-ratio term"})
    # logging and evaluation
    log_interval: int = field(default=25, metadata={"help": "steps between log lines"})
    eval_interval: int = field(default=500, metadata={
        "help": "steps between validation evaluations (0 = only at the end)"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation budget per answer"})
    limit_rows: int = field(default=0, metadata={
        "help": "use only the first N rows of each split (0 = all; for quick tests)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    # speed
    compile: str = field(default="auto", metadata={
        "help": "torch.compile the model for the training step: on, off, or auto (on for cuda)"})
    bench: bool = field(default=False, metadata={
        "help": "instead of training, time one optimizer step of each loss on one fixed batch "
                "and print a table (also bench.json in --out-dir, default out/bench)"})
    bench_steps: int = field(default=15, metadata={
        "help": "--bench: timed steps per loss, after 3 warm-up steps"})
    # the comparison
    compare: bool = field(default=False, metadata={
        "help": "instead of one recipe, train and test every recipe of the paper's comparison "
                "over --seeds seeds and write compare.md, compare.json and compare.png to "
                "--out-dir (default out/compare)"})
    seeds: int = field(default=5, metadata={
        "help": "--compare: seeds --seed, --seed + 1, ...; a seed gives every recipe the same "
                "initial model and batch order, so recipes are compared seed by seed"})
    lr_sweep: str = field(default="0.33,1,3", metadata={
        "help": "--compare: multipliers of each recipe's default lr (DEFAULT_LR) tried on the "
                "first seed; each recipe keeps the one with the best validation exact match"})


# --compare trains about 70 models, so its defaults are smaller than one recipe's (flags given on
# the command line still win). A 2x64 model takes 2.4x less time per step than 3x96 on a 2-core
# CPU; in pilot runs (SFT, seed 1337, 1000 steps) it reached validation exact match 0.258 at lr
# 5e-3 (0.160 at 1e-2, 0.110 at 2e-2). Each recipe's lr is swept around DEFAULT_LR (--lr-sweep).
# torch.compile is off: it would compile anew for every one of the short runs.
COMPARE_DEFAULTS = {"n_layer": 2, "n_embd": 64, "max_steps": 1000, "warmup_steps": 30,
                    "eval_interval": 250, "log_interval": 250, "compile": "off"}
RECIPE_FIELDS = ("loss", "lr", "init_from")  # set by each recipe of --compare, not by flags


def parse_config(argv=None):
    """Turn every Config field into a --flag (underscores become dashes) and validate the values."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    # one line per mistake instead of argparse's full usage block
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        # flags left out stay out of the namespace, so --compare can tell them from defaults
        default = f" (default: {f.default}" + (f"; with --compare: {COMPARE_DEFAULTS[f.name]})"
                                              if f.name in COMPARE_DEFAULTS else ")")
        kind = {"action": "store_true"} if f.type is bool else {"type": f.type}  # int, float, str
        parser.add_argument(flag, default=argparse.SUPPRESS, help=f.metadata["help"] + default,
                            **kind)
    given = vars(parser.parse_args(argv))
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    if given.get("compare"):
        defaults.update(COMPARE_DEFAULTS)
    cfg = Config(**{**defaults, **given})
    world = int(os.environ.get("WORLD_SIZE", "1"))  # processes, when torchrun started us
    problems = [
        (cfg.loss not in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got '{cfg.loss}'"),
        (not 0 <= cfg.lam <= 1, f"--lam must lie in [0, 1], got {cfg.lam}"),
        (not 0 <= cfg.gamma <= 1, f"--gamma must lie in [0, 1], got {cfg.gamma}"),
        (cfg.dpo_beta <= 0, f"--dpo-beta must be > 0, got {cfg.dpo_beta}"),
        (cfg.orpo_beta <= 0, f"--orpo-beta must be > 0, got {cfg.orpo_beta}"),
        (cfg.lam_schedule not in ("constant", "warmup", "noisy"),
         f"--lam-schedule must be constant, warmup or noisy, got '{cfg.lam_schedule}'"),
        (cfg.n_embd % cfg.n_head != 0, f"--n-embd ({cfg.n_embd}) must be divisible by "
                                       f"--n-head ({cfg.n_head})"),
        (min(cfg.max_steps, cfg.batch_size, cfg.n_layer, cfg.n_head, cfg.block_size,
             cfg.log_interval, cfg.max_new_tokens) < 1,
         "--max-steps, --batch-size, --n-layer, --n-head, --block-size, --log-interval and "
         "--max-new-tokens must be >= 1"),
        (cfg.lr < 0, f"--lr must be > 0 (or 0 for the loss's default), got {cfg.lr}"),
        (cfg.device not in ("auto", "cpu", "cuda", "mps"),
         f"--device must be auto, cpu, cuda or mps, got '{cfg.device}'"),
        (cfg.compile not in ("auto", "on", "off"),
         f"--compile must be auto, on or off, got '{cfg.compile}'"),
        (cfg.bench_steps < 1, f"--bench-steps must be >= 1, got {cfg.bench_steps}"),
        (cfg.batch_size % world != 0,
         f"--batch-size {cfg.batch_size} must be divisible by the {world} processes torchrun "
         f"started: each takes an equal slice of the batch"),
        (cfg.bench and world > 1, "--bench times one process: run it without torchrun"),
        (cfg.compare and (cfg.bench or world > 1),
         "--compare runs alone in one process: drop --bench and run it without torchrun"),
        (cfg.compare and bool(set(RECIPE_FIELDS) & set(given)),
         "--compare trains every recipe with learning rates from its sweep: drop --loss, --lr "
         "and --init-from (use --lr-sweep)"),
        (cfg.seeds < 1, f"--seeds must be >= 1, got {cfg.seeds}"),
        (cfg.compare and cfg.max_steps < 2, "--compare needs --max-steps >= 2 (two stages)"),
        (sweep_multipliers(cfg.lr_sweep) is None,
         f"--lr-sweep must be positive numbers separated by commas, got '{cfg.lr_sweep}'"),
    ]
    for bad, message in problems:
        if bad:
            parser.error(message)
    cfg.lr = cfg.lr or DEFAULT_LR.get(cfg.loss, 0.0)
    if not cfg.out_dir:
        cfg.out_dir = str(Path("out") / ("bench" if cfg.bench else
                                         "compare" if cfg.compare else cfg.loss))
    return cfg


def sweep_multipliers(text):
    """'0.33,1,3' -> [0.33, 1.0, 3.0]; None if it is not a list of positive numbers."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        return None
    return values if all(v > 0 and math.isfinite(v) for v in values) else None


def shown_config(cfg):
    """The config as a dict for logs; --compare leaves out what each of its recipes sets."""
    fields = dataclasses.asdict(cfg)
    return {k: v for k, v in fields.items()
            if not (cfg.compare and k in RECIPE_FIELDS)}


def arg(default, help, choices=None):
    """A config field: its default, and the help text (and allowed values) of its --flag."""
    return field(default=default, metadata={"help": help, "choices": choices})


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
    parser = ArgumentParser(description=description)
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


class UserError(Exception):
    """A problem with the user's input: main() prints it as one line and exits with status 1."""


# -----------------------------------------------------------------------------
# Tokenizer: tiktoken, built offline from a rank file that data/prepare.py trains

# Pre-tokenisation regex: every digit is its own chunk (so "478" is 3 tokens and arithmetic stays
# learnable), words keep one leading space, punctuation runs and whitespace are chunks of their own.
PAT_STR = r"\d| ?[A-Za-z]+| ?[^\sA-Za-z\d]+|\s+(?!\S)|\s+"
SPECIAL_TOKENS = ("<|endoftext|>", "<|user|>", "<|assistant|>")


def load_tokenizer(name, data_dir):
    """Return a tiktoken.Encoding with the three chat special tokens.

    'toy' reads <data_dir>/tokenizer.tiktoken: one "base64(token bytes) rank" line per token,
    tiktoken's own format. We parse it here rather than with tiktoken.load.load_tiktoken_bpe,
    which caches by path and would return stale merges after data/prepare.py rewrites the file.
    """
    import base64
    import tiktoken
    if name == "gpt2":
        try:
            base = tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline and not cached: tiktoken raises a network error
            raise UserError(f"--tokenizer gpt2: could not load tiktoken's GPT-2 encoding "
                            f"({type(e).__name__}); it needs a network or a warm tiktoken "
                            f"cache; use --tokenizer toy") from None
        ranks, pat_str = base._mergeable_ranks, base._pat_str
    elif name == "toy":
        path = Path(data_dir) / "tokenizer.tiktoken"
        if not path.is_file():
            raise UserError(f"{path}: tokenizer file not found; run python data/prepare.py "
                            f"or pass --data with a folder that has one")
        ranks = {}
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise UserError(f"{path} line {lineno}: expected 'base64 rank', got "
                                f"'{line[:40]}'") from None
        pat_str = PAT_STR
    else:
        raise UserError(f"--tokenizer must be toy or gpt2, got '{name}'")
    n = max(ranks.values()) + 1
    return tiktoken.Encoding(name=f"ift-{name}", pat_str=pat_str, mergeable_ranks=ranks,
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
        keep, self.rows = [], []
        self.chosen, self.rejected = [], []  # lists of (ids, prompt_len)
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


# -----------------------------------------------------------------------------
# Model: a tiny GPT (nanoGPT's shape) that can also take input embeddings directly
# B = batch, T = time (tokens), C = channels (n_embd), V = vocabulary, H = heads

class SelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, attn_mask=None, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                            # 3 x (B, T, C)
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
        return self.proj(y.transpose(1, 2).reshape(B, T, C))            # (B, T, C)


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd))

    def forward(self, x, attn_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache)  # pre-LayerNorm residual blocks
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
                only_at=None):
        """Logits (B, T, V) for token ids idx (B, T) or for given token embeddings (B, T, C).

        IFT passes tok_emb: a mix of rows of self.wte, so the positional embedding is added here,
        after the mix, exactly as for ordinary tokens. pos (B, T) defaults to 0..T-1.
        only_at, a (B, T) bool mask, returns the logits (M, V) of its M True positions only.
        """
        x = self.wte(idx) if tok_emb is None else tok_emb                  # (B, T, C)
        if pos is None:
            pos = torch.arange(x.shape[1], device=x.device)                # (T,)
        x = x + self.wpe(pos)                                              # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, None if caches is None else caches[i])
        x = self.ln_f(x)                                                   # (B, T, C)
        if only_at is not None:
            x = x[only_at]                                                 # (M, C)
        # tied embeddings: the output layer is E itself
        return F.linear(x, self.wte.weight)                                # (B, T, V) or (M, V)


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
# Losses, side by side

# SFT. The model judges its answer from ground-truth prefixes only (teacher forcing):
#   L_SFT = - 1/|D| sum_(x,y) 1/N sum_{t=1..N} log p(y_t | x, y_<t)
# mean over the N answer tokens of each sequence (so long answers do not dominate), then the mean
# over sequences. In code: token_logps = log p(y_t | .), mask marks the N answer tokens.
# The paper (sec. 3) reads this as preference estimation that "secretly sets T(s*_{n-1}|x) = 1":
# it scores token t as if the model had produced every earlier token perfectly (exposure bias).

def sft_loss(token_logps, mask):
    n = mask.sum(-1)                                                       # (B,)
    return (-token_logps.sum(-1) / n).mean()


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
#   3. w_t = S_t * N / sum_k S_k                   rescaled so the weights average 1 on the answer
#   4. gamma = 0 is special-cased to w_t = 1 (the formula would give w_t = l_t / mean(l)), as in
#      the official code; then IFT's loss is SFT's.
# With equal losses the weights fall along the answer (20 tokens, gamma .95: ~1.6 -> ~0.1): an
# early token's error propagates to every later one, so it weighs more.
# Eq. 21 read literally is a linear double sum that weights LATER tokens more; we follow the code.
# Gradient: the official code does not detach w, so dL/dl_j = (w_j + sum_t l_t dw_t/dl_j) / N.
# The second term can be negative: raising a large early loss raises every S_t before it and
# shrinks the normalised weight of the rest, so late low-loss tokens can get a NEGATIVE
# coefficient, i.e. training pushes their loss up (PAPER.md: losses [2 .1 .1 .1 3 .1 .1 .1],
# gamma .95 -> dL/dl = [.318 .158 .105 .055 .167 -.053 -.112 -.167]). detach=True makes every
# coefficient w_j / N > 0: a pure re-weighting of SFT's token losses.
# In code: token_losses (B, T) = l, mask (B, T), S is computed as c @ G^T with the (T, T)
# upper-triangular matrix G[t, j] = gamma^(j - t) for j >= t.

def relation_weights(token_losses, mask, gamma, detach=False):
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
# the answer positions only), ~1.3x an SFT step: python ift.py --bench measures it.

def shifted_predictions(x, yhat, mask):
    """x~ of step 2: the model's prediction at answer inputs, the ground truth everywhere else."""
    x_tilde = x.clone()                                                     # (B, T)
    x_tilde[:, 1:] = torch.where(mask[:, :-1], yhat[:, :-1], x[:, 1:])
    return x_tilde


def ift_loss(model, x, y, mask, lam=0.2, gamma=0.95, detach_weights=False):
    # Under torchrun, model is the DDP wrapper and gpt = model.module the GPT it wraps (otherwise
    # gpt = model). The no-grad pass calls gpt directly: DDP's hooks only matter for a backward,
    # and no_sync() would be wrong here (it skips the gradient all-reduce of the NEXT backward).
    # The graded pass goes through model, so DDP averages the gradient over the processes; the
    # wte lookups outside it still feed the same wte.weight, whose gradient is summed before
    # DDP's hook for it fires.
    gpt = getattr(model, "module", model)
    with torch.no_grad():  # nothing of this pass is kept for the backward
        # only the predictions of answer tokens are used: the output layer skips the rest
        yhat = torch.zeros_like(x)                                          # (B, T)
        yhat[mask] = gpt(x, only_at=mask).argmax(-1)                        # (M,) on the answer
    x_tilde = shifted_predictions(x, yhat, mask)                            # (B, T)
    tok_emb = (1 - lam) * gpt.wte(x) + lam * gpt.wte(x_tilde)               # (B, T, C)
    token_logps, _ = sequence_logps(model(tok_emb=tok_emb), y, mask)        # (B, T)
    token_losses = -token_logps                                             # (B, T)
    w = relation_weights(token_losses, mask, gamma, detach=detach_weights)  # (B, T)
    loss = ((token_losses * w).sum(-1) / mask.sum(-1)).mean()
    return loss, {"sft_nll": sft_loss(token_logps.detach(), mask)}


def lam_at(cfg, step, noise):
    """lam for this step: constant, linear warm-up, or the official code's noisy lam."""
    lam = cfg.lam
    if cfg.lam_schedule == "warmup":
        lam = cfg.lam * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    elif cfg.lam_schedule == "noisy":
        lam = lam + noise * 0.5 * lam
    return min(1.0, max(0.0, lam))


# -----------------------------------------------------------------------------
# Speed and scale: torch.compile, model FLOPs utilisation, several processes (DDP)
#
# Data parallel: torchrun --nproc_per_node=N ift.py ... starts N copies of this script with RANK,
# LOCAL_RANK and WORLD_SIZE set. Each builds the same model and draws the same global batch of
# --batch-size rows (same seed), then takes its own equal slice of it; its loss is a mean over
# its slice (true of all four losses: each is a mean over sequences) and DDP averages the
# gradients, so the step is the one a single process takes on the whole batch. Only rank 0
# prints, evaluates and writes files; the others wait for it at a barrier.

def init_distributed(device):
    """Join torchrun's process group when it started us; returns this process's device."""
    if "RANK" not in os.environ:
        return device
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"torchrun: DDP here runs on cuda or cpu, not {device.type}; "
                        f"pass --device cpu")
    if device.type == "cuda":  # one GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def rank_and_world():
    """(this process's rank, number of processes); (0, 1) without torchrun."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_slice(idx, rank, world):
    """This process's equal share of a global batch of row indices."""
    n = len(idx)
    return idx[rank * n // world:(rank + 1) * n // world]


def mean_over_ranks(values):
    """The mean of a tensor over all processes (the tensor itself without torchrun)."""
    if not dist.is_initialized():
        return values
    values = values.detach().clone()
    dist.all_reduce(values)  # a sum: gloo has no average
    return values / dist.get_world_size()


def wrap_for_training(cfg, model, device):
    """What the training step calls: model, maybe compiled (--compile), inside DDP (torchrun).

    All of them share model's parameters, so the optimizer, evaluation and checkpoints use model.
    """
    if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"):
        # Batches are padded to their longest row, so T changes from step to step: dynamic=True
        # compiles one graph for every T instead of a new graph for each new length.
        model = torch.compile(model, dynamic=True)
    if dist.is_initialized():
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


# Model FLOPs utilisation (MFU; PaLM, Chowdhery et al. 2022, appendix B): the FLOPs the model's
# maths needs per second, as a fraction of the accelerator's peak. A forward and backward cost
# 6N + 12 L C T FLOPs per token (N = parameters less the position table, L = layers, C = width,
# T = context, here --block-size: an upper bound, batches are often shorter). IFT's no-grad
# forward adds a third: 2N + 4 L C T. Peaks: dense bf16 tensor-core FLOP/s from NVIDIA's data
# sheets; on any other device MFU is left out of the log line.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
IFT_COST = 4 / 3  # IFT's FLOPs per token over SFT's: (6N + 2N) / 6N, and likewise for L C T


def peak_flops(device):
    """Peak dense bf16 FLOP/s of this CUDA device if we know it, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def flops_per_token(cfg, model):
    """Training FLOPs per token of one step of cfg.loss (see above)."""
    N = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    fwd_bwd = 6 * N + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    return fwd_bwd * IFT_COST if cfg.loss == "ift" else fwd_bwd


# -----------------------------------------------------------------------------
# Training loop

def pick_device(name):
    if name != "auto":
        if name == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available; use --device cpu")
        if name == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps: MPS is not available; use --device cpu")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_for(device):
    """bf16 autocast on CUDA (matmuls in bf16, reductions in float32); plain float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def model_args(cfg, enc):
    return {"vocab_size": enc.n_vocab, "block_size": cfg.block_size, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_embd": cfg.n_embd}


def start(cfg, save_config=False):
    """Seed, pick the device (joining torchrun's group if it started us), create --out-dir
    (and save the resolved config there)."""
    torch.manual_seed(cfg.seed)
    device = init_distributed(pick_device(cfg.device))  # unchanged without torchrun
    if device.type == "cpu":
        # Tiny weights and gradients underflow into subnormal floats, which CPUs compute
        # 10-100x slower; flushing them to zero changes nothing we can measure here.
        torch.set_flush_denormal(True)
    out_dir = Path(cfg.out_dir)
    try:
        if rank_and_world()[0] == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            if save_config:
                (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    except OSError as e:
        raise UserError(f"--out-dir {out_dir}: cannot write there ({e.strerror})") from None
    return device, out_dir


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
        saved = ckpt["model_args"]
        state = ckpt["model"]
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
    """Chosen and rejected answers of the same rows stacked into one batch of 2B sequences."""
    x, y, mask = collate([split.chosen[i] for i in idx] + [split.rejected[i] for i in idx], pad_id)
    return x.to(device), y.to(device), mask.to(device)


@torch.no_grad()
def reference_logps(model, split, pad_id, device, autocast, batch_size=128):
    """Summed log-probs (N, 2) of every row's chosen and rejected answer under a frozen model."""
    out = []
    for i in range(0, len(split), batch_size):
        idx = list(range(i, min(i + batch_size, len(split))))
        x, y, mask = pair_batch(split, idx, pad_id, device)
        with autocast:
            logits = model(x)
        _, logps = sequence_logps(logits, y, mask)                          # (2b,)
        out.append(torch.stack(logps.split(len(idx)), dim=1))               # (b, 2)
    return torch.cat(out)                                                   # (N, 2)


def compute_loss(cfg, model, split, idx, pad_id, device, autocast, ref, lam):
    """The loss of one batch under cfg.loss, and the metrics to log."""
    if cfg.loss in ("sft", "ift"):
        x, y, mask = (t.to(device) for t in collate([split.chosen[i] for i in idx], pad_id))
        ntok = x.numel()
        with autocast:
            if cfg.loss == "ift":
                loss, metrics = ift_loss(model, x, y, mask, lam, cfg.gamma, cfg.detach_weights)
            else:
                token_logps, _ = sequence_logps(model(x), y, mask)
                loss, metrics = sft_loss(token_logps, mask), {}
        return loss, metrics, ntok
    x, y, mask = pair_batch(split, idx, pad_id, device)
    with autocast:
        _, logps = sequence_logps(model(x), y, mask)                        # (2B,)
    chosen, rejected = logps.split(len(idx))                                # (B,), (B,)
    lengths = mask.sum(-1).float()                                          # (2B,)
    if cfg.loss == "dpo":
        loss, m = dpo_loss(chosen, rejected, ref[idx, 0], ref[idx, 1], cfg.dpo_beta)
    else:
        loss, m = orpo_loss(chosen, rejected, *lengths.split(len(idx)), cfg.orpo_beta)
    metrics = {"acc": m["accuracy"].mean(), "chosen_nll": -(chosen / lengths[:len(idx)]).mean()}
    if cfg.loss == "dpo":
        metrics["margin"] = m["margins"].mean()
    return loss, metrics, x.numel()


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


def train(cfg, model, enc, splits, device, out_dir):
    """Optimise cfg.loss for cfg.max_steps; log, evaluate on val, checkpoint. Returns the log."""
    train_split = splits["train"]
    pad_id = enc.eot_token
    rank, world = rank_and_world()
    autocast = autocast_for(device)
    ref = None
    if cfg.loss == "dpo":
        if not cfg.init_from:
            print("note: DPO without --init-from: the reference is the random initial model")
        model.eval()  # under torchrun every process scores every row: simple, and identical
        ref = reference_logps(model, train_split, pad_id, device, autocast)  # (N, 2)
    optimizer = make_optimizer(cfg, model, device)
    step_model = wrap_for_training(cfg, model, device)  # model, or compiled, or inside DDP
    peak, step_flops = peak_flops(device), flops_per_token(cfg, model)
    gen = torch.Generator().manual_seed(cfg.seed)
    lam_noise = torch.randn(cfg.max_steps, generator=torch.Generator().manual_seed(cfg.seed + 1))
    stream = batches(len(train_split), cfg.batch_size, gen)
    log_path = out_dir / "log.csv"
    log, columns = [], ["step", "loss", "lr", "lam", "tok_per_s", "val_exact_match", "val_nll"]
    t0 = t_log = time.time()
    ntok_since = 0
    for step in range(cfg.max_steps):
        model.train()
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        lam = lam_at(cfg, step, lam_noise[step].item())
        idx = rank_slice(next(stream), rank, world)  # every process draws the same global batch
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
        ntok_since += ntok * world  # tokens of the global batch
        last = step == cfg.max_steps - 1
        row = None
        if step % cfg.log_interval == 0 or last:
            # the loss and metrics of the global batch: means over the processes' equal slices
            means = mean_over_ranks(torch.stack([loss.detach().float()]
                                                + [v.float() for v in metrics.values()]))
            loss_value, *metric_values = means.tolist()
            now = time.time()
            tok_s = ntok_since / max(now - t_log, 1e-9)
            t_log, ntok_since = now, 0
            eta = (now - t0) / (step + 1) * (cfg.max_steps - step - 1)
            extra = "".join(f" | {k} {v:.4f}" for k, v in zip(metrics, metric_values))
            lam_txt = f" | lam {lam:.3f}" if cfg.loss == "ift" else ""
            mfu = f" | mfu {tok_s * step_flops / (peak * world):.1%}" if peak else ""
            print(f"step {step:5d} | loss {loss_value:.4f}{extra} | lr {lr:.1e}{lam_txt} | "
                  f"{tok_s / 1000:.1f}k tok/s{mfu} | eta {fmt_time(eta)}", flush=True)
            row = {"step": step, "loss": loss_value, "lr": lr, "lam": lam, "tok_per_s": tok_s}
        if (cfg.eval_interval and step > 0 and step % cfg.eval_interval == 0) or last:
            row = row or {"step": step, "loss": mean_over_ranks(loss).item(), "lr": lr, "lam": lam}
            t_eval = time.time()
            if rank == 0:
                res = evaluate(model, enc, splits["val"], device, autocast, cfg.max_new_tokens)
                print(f"eval step {step:5d} | val exact match {res['exact_match']:.3f} | "
                      f"val answer nll {res['nll']:.4f}", flush=True)
                row.update(val_exact_match=res["exact_match"], val_nll=res["nll"])
                if not all(torch.isfinite(p).all() for p in model.parameters()):
                    raise UserError(f"step {step}: the weights hold NaN or inf; lower --lr (now "
                                    f"{cfg.lr}); the last good checkpoint was kept")
                save_atomic({"model": model.state_dict(), "model_args": model_args(cfg, enc),
                             "config": dataclasses.asdict(cfg), "step": step}, out_dir / "ckpt.pt")
            if world > 1:
                dist.barrier()  # the other processes wait while rank 0 evaluates
            t_log += time.time() - t_eval  # tok/s and MFU count training time only
        if row:
            log.append(row)
    if rank == 0:
        with log_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
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
    answers = []
    for row in out.tolist():
        answers.append(row[:row.index(eot)] if eot in row else row)
    return answers


@torch.no_grad()
def evaluate(model, enc, split, device, autocast, max_new_tokens, batch_size=256, samples=0):
    """Exact match per task and overall, preference accuracy, answer NLL (+ a few samples)."""
    model.eval()
    eot = enc.eot_token
    correct, nll, pref = [], [], []
    completions = []
    for i in range(0, len(split), batch_size):
        idx = list(range(i, min(i + batch_size, len(split))))
        prompts = [split.chosen[j][0][:split.chosen[j][1]] for j in idx]
        for j, ids in zip(idx, generate(model, prompts, eot, max_new_tokens, device, autocast)):
            text = enc.decode(ids)
            correct.append(text.strip() == split.rows[j]["chosen"].strip())
            completions.append(text)
        x, y, mask = (t.to(device) for t in collate([split.chosen[j] for j in idx], eot))
        with autocast:
            token_logps, logps = sequence_logps(model(x), y, mask)
        nll += (-logps / mask.sum(-1)).tolist()
        if split.has_pairs:
            x, y, mask = (t.to(device) for t in collate([split.rejected[j] for j in idx], eot))
            with autocast:
                _, rejected_logps = sequence_logps(model(x), y, mask)
            pref += (logps > rejected_logps).tolist()
    tasks = sorted({r["task"] for r in split.rows})
    by_task = {t: [c for c, r in zip(correct, split.rows) if r["task"] == t] for t in tasks}
    res = {"exact_match": sum(correct) / len(correct),
           "exact_match_by_task": {t: sum(v) / len(v) for t, v in by_task.items()},
           "nll": sum(nll) / len(nll),
           "nll_by_task": {t: sum(n for n, r in zip(nll, split.rows) if r["task"] == t)
                           / len(by_task[t]) for t in tasks},
           "preference_accuracy": sum(pref) / len(pref) if pref else None,
           "preference_accuracy_by_task": (
               {t: sum(p for p, r in zip(pref, split.rows) if r["task"] == t) / len(by_task[t])
                for t in tasks} if pref else None),
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
# Benchmark: one optimizer step of each loss on the same batch, timed (python ift.py --bench)
#
# The batch is the first one train() would draw. Every loss steps the same model, with the
# settings the flags give, exactly as train() does (DPO's reference log-probs are computed once
# beforehand, as in train()); the rows take turns, step by step, so background load slows them
# alike, and ms/step is the median. The "lm (nanoGPT)" row is the plain language-model step of
# nanoGPT's train.py on the same inputs: F.cross_entropy on every position, our speed target.

BENCH_ROWS = ("nanogpt", "sft", "ift", "dpo", "orpo")


def device_name(device):
    """A human name of the device: the GPU's, or the CPU's model name on Linux."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def saved_for_backward(model, fn):
    """fn()'s result, and the bytes of tensors that autograd keeps for fn's backward.

    Each tensor saved for a backward goes through the pack hook; we count each storage once and
    leave out the parameters (they exist anyway). A pass under torch.no_grad() adds nothing.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


def bench(cfg):
    """Time an optimizer step of each loss and of a plain LM step; print a table, write JSON."""
    device, out_dir = start(cfg)
    enc = load_tokenizer(cfg.tokenizer, cfg.data)
    pad_id = enc.eot_token
    path = Path(cfg.data) / "train.jsonl"
    split = Split(load_rows(path, need_rejected=True, limit=cfg.limit_rows), enc, cfg.block_size,
                  str(path))
    first = next(batches(len(split), cfg.batch_size, torch.Generator().manual_seed(cfg.seed)))
    batch = Split([split.rows[i] for i in first], enc, cfg.block_size, "bench batch")
    idx = list(range(len(batch)))
    model = build_model(cfg, enc, device)
    autocast = autocast_for(device)
    model.eval()
    ref = reference_logps(model, batch, pad_id, device, autocast)          # (B, 2)
    model.train()
    optimizer = make_optimizer(cfg, model, device)
    step_model = wrap_for_training(cfg, model, device)
    x, y, _ = (t.to(device) for t in collate(batch.chosen, pad_id))       # (B, T) each

    def loss_of(name, module):
        """The loss of one step of row `name` on the batch, and the tokens it reads."""
        if name == "nanogpt":  # nanoGPT: logits of every position against the next token
            with autocast:
                logits = module(x)                                          # (B, T, V)
                return F.cross_entropy(logits.flatten(0, 1), y.flatten()), x.numel()
        loss, _, ntok = compute_loss(dataclasses.replace(cfg, loss=name), module, batch, idx,
                                     pad_id, device, autocast, ref, cfg.lam)
        return loss, ntok

    def step(name):
        loss, _ = loss_of(name, step_model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

    # first, on the initial weights: each row's loss, tokens, and the activations it keeps
    first_loss, ntok, saved = {}, {}, {}
    for name in BENCH_ROWS:
        (loss, ntok[name]), saved[name] = saved_for_backward(model, lambda: loss_of(name, model))
        first_loss[name] = loss.item()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warmup = 3
    seconds = {name: [] for name in BENCH_ROWS}
    peak = {name: 0 for name in BENCH_ROWS}
    for i in range(warmup + cfg.bench_steps):
        for name in BENCH_ROWS:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            t = time.perf_counter()
            step(name)
            sync()
            if i >= warmup:
                seconds[name].append(time.perf_counter() - t)
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    if device.type == "cuda":
        memory = "peak MiB: torch.cuda.max_memory_allocated during the row's steps"
    else:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
        memory = (f"peak MiB: not measured per row on {device.type}; the whole process peaked "
                  f"at {rss_mib:.0f} MiB resident (getrusage ru_maxrss)")
    ms = {name: 1000 * statistics.median(seconds[name]) for name in BENCH_ROWS}
    rows = {name: {"first_loss": first_loss[name], "ms_per_step": ms[name],
                   "tokens_per_step": ntok[name], "tokens_per_s": ntok[name] / ms[name] * 1000,
                   "ratio_to_sft": ms[name] / ms["sft"], "saved_mib": saved[name] / 2**20,
                   "peak_mib": peak[name] / 2**20 if device.type == "cuda" else None}
            for name in BENCH_ROWS}
    ratios = {"ift/sft": ms["ift"] / ms["sft"], "dpo/sft": ms["dpo"] / ms["sft"],
              "orpo/sft": ms["orpo"] / ms["sft"], "sft/nanogpt": ms["sft"] / ms["nanogpt"]}
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": str(device),
            "device_name": device_name(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "compile": step_model is not model,
            "batch_size": len(batch), "seq_len": x.shape[1],
            "params": sum(p.numel() for p in model.parameters()),
            "warmup_steps": warmup, "steps": cfg.bench_steps, "memory": memory}
    print(f"bench | {info['date']} | {device}: {info['device_name']} | torch {torch.__version__} "
          f"| {info['threads']} threads | compile {'on' if info['compile'] else 'off'}")
    print(f"{info['params'] / 1e6:.2f}M parameters | batch {len(batch)} rows (DPO, ORPO: pairs) "
          f"| T {x.shape[1]} | median of {cfg.bench_steps} steps after {warmup} warm-up")
    print(f"{'step':<14}{'first loss':>11}{'ms/step':>10}{'tok/s':>10}{'x SFT':>8}"
          f"{'saved MiB':>11}{'peak MiB':>10}")
    for name, r in rows.items():
        label = "lm (nanoGPT)" if name == "nanogpt" else name
        peak_txt = f"{r['peak_mib']:.1f}" if r["peak_mib"] is not None else "-"
        print(f"{label:<14}{r['first_loss']:>11.4f}{r['ms_per_step']:>10.1f}"
              f"{r['tokens_per_s'] / 1000:>9.1f}k{r['ratio_to_sft']:>8.2f}"
              f"{r['saved_mib']:>11.1f}{peak_txt:>10}")
    print("saved MiB: activations autograd keeps for the backward (parameters left out)")
    print(memory)
    print(f"targets (printed, not enforced): IFT/SFT {ratios['ift/sft']:.2f} <= 1.35, "
          f"DPO/SFT {ratios['dpo/sft']:.2f} <= 2.1, SFT/lm {ratios['sft/nanogpt']:.2f} <= 1")
    path = out_dir / "bench.json"
    path.write_text(json.dumps({**info, "rows": rows, "ratios": ratios}, indent=2))
    print(f"wrote {path}")
    return rows


# -----------------------------------------------------------------------------
# The comparison: every recipe of the paper over several seeds, seed by seed (--compare)
#
# One seed trains these models, all from the same initial weights and batch order (S = --max-steps):
#   single stage   SFT, IFT, ORPO and DPO on the whole train split for S steps (the paper's
#                  "+ SFT", "+ DPO", ... rows, PAPER.md section 4). The starting model is the
#                  random one, so DPO alone has no language model to rank with, and its reference
#                  is that random model.
#   sequential     stage 1: SFT on half A of the train split for S/2 steps; stage 2, from that
#                  model, on half B for S/2 steps: SFT (the paper's control: restarting a schedule
#                  alone can move results), IFT, ORPO, and DPO with the stage-1 model as reference.
#   ablations      IFT with lam = 0 (relation propagation only), gamma = 0 (temporal residual
#                  connection only), detached relation weights, noisy lam.
#   equal compute  IFT for S / IFT_COST steps: the FLOPs of SFT's S steps.
# Learning rates: on the first seed each recipe with an lr of its own (lr_of = its name) trains
# once per --lr-sweep multiplier of DEFAULT_LR[loss] and keeps the lr with the best validation
# exact match (ties: the lower validation NLL). The test split is never used to choose. Stage 1
# takes SFT's lr; the ablations and the equal-compute run take IFT's. Every later seed reuses the
# choices.
#
# A claim is judged on paired differences d_s = metric(recipe, seed s) - metric(other, seed s):
# reproduced if the 95% t-interval of their mean lies above 0, not reproduced if it lies below,
# within noise if it contains 0.

def compare_recipes(steps):
    """The recipes of one seed, in training order (a recipe's lr and start come before it)."""
    half = steps // 2
    recipes = []

    def add(name, group, loss, data="train", n=steps, start="", lr_of=None, **overrides):
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
    add("ift at sft's flops", "equal compute", "ift", n=round(steps / IFT_COST), lr_of="ift")
    return recipes


def step_cost(loss):
    """Rough cost of one step relative to SFT's (pair losses score two answers per row)."""
    return {"sft": 1.0, "ift": IFT_COST, "orpo": 2.0, "dpo": 2.0}[loss]


def compare_run(cfg, recipe, seed, lr, init_from, enc, data, device, out_dir):
    """Train one recipe for one seed and test it. Its folder gets config.json, train.log (what
    a plain run prints), log.csv and ckpt.pt."""
    slug = "".join(c if c.isalnum() else "_" for c in recipe["name"])  # "ift, lam 0" -> ift__lam_0
    run_dir = out_dir / "runs" / f"seed{seed}" / f"{slug}_lr{lr:.2g}"
    rcfg = dataclasses.replace(cfg, loss=recipe["loss"], seed=seed, lr=lr, init_from=init_from,
                               max_steps=recipe["steps"], out_dir=str(run_dir), compare=False,
                               **recipe["overrides"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(rcfg), indent=2))
    t = time.time()
    torch.manual_seed(seed)
    model = build_model(rcfg, enc, device)
    splits = {"train": data[recipe["data"]], "val": data["val"]}
    with (run_dir / "train.log").open("w") as f, contextlib.redirect_stdout(f):
        log, train_seconds = train(rcfg, model, enc, splits, device, run_dir)
    res = evaluate(model, enc, data["test"], device, autocast_for(device), cfg.max_new_tokens)
    evals = [r for r in log if "val_exact_match" in r]
    return {"recipe": recipe["name"], "seed": seed, "lr": lr, "steps": recipe["steps"],
            "ckpt": str(run_dir / "ckpt.pt"), "seconds": time.time() - t,
            "ms_per_step": 1000 * train_seconds / recipe["steps"],
            "val_curve": [[r["step"], r["val_exact_match"]] for r in evals],
            "val_exact_match": evals[-1]["val_exact_match"], "val_nll": evals[-1]["val_nll"],
            "test": {k: res[k] for k in ("exact_match", "exact_match_by_task", "nll",
                                         "preference_accuracy")}}


# two-sided 95% quantiles of Student's t by degrees of freedom; past 9, 1.96 + 2.4 / df is
# within 0.03 of them
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def paired(diffs):
    """Mean, sample std and 95% t-interval half-width of paired differences, and the verdict."""
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return {"diffs": diffs, "mean": mean, "std": None, "ci95": None,
                "verdict": "one seed: no spread (use --seeds 2 or more)"}
    std = statistics.stdev(diffs)
    df = len(diffs) - 1
    half = T95.get(df, 1.96 + 2.4 / df) * std / math.sqrt(len(diffs))
    verdict = ("reproduced" if mean - half > 0 else "not reproduced" if mean + half < 0
               else "within noise")
    return {"diffs": diffs, "mean": mean, "std": std, "ci95": half, "verdict": verdict}


def judge_claims(runs, seeds):
    """The four claims of the issue, each on paired differences over the seeds."""
    def values(recipe, metric):
        return [runs[(recipe, s)]["test"][metric] for s in seeds]

    def mean_of(recipe, metric):
        return statistics.mean(values(recipe, metric))
    claims = [("a", "IFT > SFT on exact match", "ift", "sft", "exact_match"),
              ("a'", "IFT at SFT's FLOPs > SFT on exact match", "ift at sft's flops", "sft",
               "exact_match"),
              ("b", "IFT >= SFT then DPO on exact match", "ift", "sft then dpo", "exact_match"),
              ("c", "DPO best on preference accuracy", "dpo", None, "preference_accuracy"),
              ("d", "SFT then IFT > SFT then SFT on exact match", "sft then ift", "sft then sft",
               "exact_match")]
    names = sorted({name for name, _ in runs})
    out = []
    for key, text, recipe, other, metric in claims:
        if other is None:  # the better DPO recipe against the best recipe without DPO
            dpo = [r for r in names if r.endswith("dpo")]
            recipe = max(dpo, key=lambda r: mean_of(r, metric))
            other = max((r for r in names if r not in dpo), key=lambda r: mean_of(r, metric))
        diffs = [a - b for a, b in zip(values(recipe, metric), values(other, metric))]
        out.append({"claim": key, "text": text, "recipe": recipe, "other": other,
                    "metric": metric, **paired(diffs)})
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


def compare(cfg, command):
    """Train and test every recipe over the seeds; write compare.md, compare.json, compare.png."""
    t_start = time.time()
    device, out_dir = start(cfg)
    enc = load_tokenizer(cfg.tokenizer, cfg.data)
    data = load_splits(cfg, enc, need_rejected=("train", "val", "test"))
    n = len(data["train"])
    data["train_a"] = Split(data["train"].rows[:n // 2], enc, cfg.block_size, "train half A")
    data["train_b"] = Split(data["train"].rows[n // 2:], enc, cfg.block_size, "train half B")
    recipes = compare_recipes(cfg.max_steps)
    multipliers = sweep_multipliers(cfg.lr_sweep)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    swept = [r for r in recipes if r["lr_of"] == r["name"]]
    total = sum(r["steps"] * step_cost(r["loss"]) for r in recipes) * len(seeds) + sum(
        r["steps"] * step_cost(r["loss"]) for r in swept) * (len(multipliers) - 1)
    print(f"compare | {len(recipes)} recipes x {len(seeds)} seeds, plus a {len(multipliers)}-"
          f"point lr sweep of {len(swept)} recipes on seed {seeds[0]} | device {device} | "
          f"{n} train rows | outputs in {out_dir}", flush=True)
    runs, lrs, sweep, done = {}, {}, [], 0.0
    for seed in seeds:
        for r in recipes:
            start_ckpt = runs[(r["start"], seed)]["ckpt"] if r["start"] else ""
            sweeping = r["lr_of"] == r["name"] and r["name"] not in lrs  # on the first seed
            candidates = ([DEFAULT_LR[r["loss"]] * m for m in multipliers] if sweeping
                          else [lrs[r["lr_of"]]])
            results = []
            for lr in candidates:
                try:
                    res = compare_run(cfg, r, seed, lr, start_ckpt, enc, data, device, out_dir)
                except UserError as e:  # a diverged candidate of the sweep loses, nothing more
                    if not sweeping:
                        raise UserError(f"--compare {r['name']}, seed {seed}: {e}") from None
                    res = {"recipe": r["name"], "lr": lr, "diverged": str(e),
                           "val_exact_match": -1.0, "val_nll": math.inf}
                results.append(res)
                done += r["steps"] * step_cost(r["loss"])
                elapsed = time.time() - t_start
                test = (f"test exact {res['test']['exact_match']:.3f} | val exact "
                        f"{res['val_exact_match']:.3f} | {res['seconds']:.0f}s"
                        if "test" in res else "diverged")
                print(f"[{done / total:4.0%}] seed {seed} | {r['name']:<22} | lr {lr:.1e}"
                      f"{' (sweep)' if sweeping else ''} | {test} | elapsed "
                      f"{fmt_time(elapsed)}, about {fmt_time(elapsed / done * (total - done))} "
                      f"left", flush=True)
            best = min(results, key=lambda x: (-x["val_exact_match"], x["val_nll"]))
            if sweeping:
                lrs[r["name"]] = best["lr"]
                sweep += [{"recipe": r["name"], "lr": x["lr"], "val_exact_match":
                           x["val_exact_match"], "val_nll": x["val_nll"],
                           "chosen": x is best, "diverged": "diverged" in x} for x in results]
            if "diverged" in best:
                raise UserError(f"--compare {r['name']}: every lr of --lr-sweep diverged; "
                                f"try smaller multipliers")
            runs[(r["name"], seed)] = best
    tasks = sorted({row["task"] for row in data["test"].rows})
    summary = summarize(recipes, runs, seeds, lrs, tasks)
    claims = judge_claims(runs, seeds)
    runtime = time.time() - t_start
    model = GPT(**model_args(cfg, enc))
    info = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
            "device": str(device), "device_name": device_name(device),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "runtime_seconds": runtime,
            "seed_seconds": {s: sum(runs[(r["name"], s)]["seconds"] for r in recipes)
                             for s in seeds},
            "params": sum(p.numel() for p in model.parameters()), "seeds": seeds,
            "tasks": tasks, "config": shown_config(cfg)}
    paths = [out_dir / "compare.json", out_dir / "compare.md", out_dir / "compare.png"]
    paths[0].write_text(json.dumps({**info, "summary": summary, "claims": claims, "sweep": sweep,
                                    "runs": [runs[(r["name"], s)] for s in seeds
                                             for r in recipes]}, indent=2))
    report = compare_report(info, summary, claims, sweep, cfg)
    paths[1].write_text(report)
    plot_compare(summary, runs, recipes, seeds, tasks, paths[2])
    print("\n" + report)
    print("wrote " + ", ".join(str(p) for p in paths))
    return summary, claims


def pm(pair):
    """'0.123 ± 0.045' from a (mean, std) pair."""
    return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def compare_report(info, summary, claims, sweep, cfg):
    """compare.md: the table, the claims, the sweep, and how and where it was made."""
    tasks, n = info["tasks"], len(info["seeds"])
    seed_times = list(info["seed_seconds"].values())
    lines = [
        "# IFT, SFT, ORPO and DPO at toy scale (`python ift.py --compare`)", "",
        f"Regenerate: `{info['command']}`", "",
        f"Machine: {info['device_name']} ({info['device']}, {info['threads']} threads), torch "
        f"{info['torch']}; {info['date']}. Runtime {fmt_time(info['runtime_seconds'])} in all; "
        f"one seed's {len(summary)} runs took {fmt_time(min(seed_times))} to "
        f"{fmt_time(max(seed_times))} (the lr sweep on seed {info['seeds'][0]} comes on top).", "",
        f"Settings: GPT {cfg.n_layer}x{cfg.n_embd} ({info['params'] / 1e6:.2f}M parameters), "
        f"batch {cfg.batch_size}, {cfg.max_steps} steps per single-stage run (each sequential "
        f"stage half), warm-up {cfg.warmup_steps} then cosine to {cfg.min_lr_ratio} x lr, "
        f"lam {cfg.lam}, gamma {cfg.gamma}, DPO beta {cfg.dpo_beta}, ORPO beta {cfg.orpo_beta}; "
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
        "Paired difference per seed (recipe minus the other, same initial model and batches); "
        "verdict from the 95% t-interval of the mean difference: above 0 reproduced, below 0 "
        "not reproduced, containing 0 within noise.", "",
        "| claim | recipe - other | per-seed differences | mean ± std | 95% interval | verdict |",
        "|---|---|---|---|---|---|"]
    for c in claims:
        diffs = ", ".join(f"{d:+.3f}" for d in c["diffs"])
        spread = f"{c['mean']:+.3f} ± {c['std']:.3f}" if c["std"] is not None else \
            f"{c['mean']:+.3f}"
        interval = (f"[{c['mean'] - c['ci95']:+.3f}, {c['mean'] + c['ci95']:+.3f}]"
                    if c["ci95"] is not None else "-")
        lines.append(f"| ({c['claim']}) {c['text']} | {c['recipe']} - {c['other']} "
                     f"({c['metric']}) | {diffs} | {spread} | {interval} | **{c['verdict']}** |")
    lines += ["", f"## Learning-rate sweep (seed {info['seeds'][0]}, validation split, last "
              "step)", "", "| recipe | lr | val exact | val NLL | chosen |",
              "|---|---|---|---|---|"]
    for s in sweep:
        scores = ("diverged | -" if s["diverged"] else
                  f"{s['val_exact_match']:.3f} | {s['val_nll']:.4f}")
        lines.append(f"| {s['recipe']} | {s['lr']:.1e} | {scores} | "
                     f"{'yes' if s['chosen'] else ''} |")
    return "\n".join(lines) + "\n"


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


def plot_compare(summary, runs, recipes, seeds, tasks, path):
    """Top: test exact match per family and recipe (error bars: std over seeds). Bottom: mean
    validation exact match against the optimizer step (sequential runs: counted from stage 1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(14, 8))
    ax = fig.add_subplot(2, 1, 1)
    cmap = plt.get_cmap("tab20")
    width = 0.8 / len(summary)
    groups = tasks + ["mean"]
    for i, row in enumerate(summary):
        cells = [row[t] for t in tasks] + [row["exact_match"]]
        ax.bar([g + (i - len(summary) / 2 + 0.5) * width for g in range(len(groups))],
               [c[0] for c in cells], width, yerr=[c[1] for c in cells], capsize=1.5,
               color=cmap(i % 20), label=row["recipe"])
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("test exact match")
    ax.set_ylim(0, 1)
    ax.legend(ncol=5, fontsize=8, loc="upper left")
    ax.set_title(f"python ift.py --compare: mean ± std over {len(seeds)} seeds")
    curves = {}  # recipe -> (steps, mean validation exact match over the seeds)
    for r in recipes:
        per_seed = [runs[(r["name"], s)]["val_curve"] for s in seeds]
        steps = [step for step, _ in per_seed[0]]
        means = [statistics.mean(c[j][1] for c in per_seed) for j in range(len(steps))]
        if r["start"]:  # stage 2 goes on from where its stage 1 ended
            before_steps, before = curves[r["start"]]
            steps = [before_steps[-1]] + [before_steps[-1] + 1 + step for step in steps]
            means = [before[-1]] + means
        curves[r["name"]] = steps, means
    for k, groups_here in enumerate((("single stage", "ablation", "equal compute"),
                                     ("sequential",))):
        ax = fig.add_subplot(2, 2, 3 + k)
        for i, r in enumerate(recipes):
            if r["group"] in groups_here:
                ax.plot(*curves[r["name"]], "o-", color=cmap(i % 20), label=r["name"],
                        markersize=3)
        ax.set_xlabel("optimizer step" + (" (stage 2 continues stage 1)" if k else ""))
        ax.set_ylabel("validation exact match (mean)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -----------------------------------------------------------------------------
# main

def run(cfg):
    """Train and evaluate one recipe as cfg describes; returns the test results."""
    device, out_dir = start(cfg, save_config=True)
    rank, world = rank_and_world()
    enc = load_tokenizer(cfg.tokenizer, cfg.data)
    splits = load_splits(cfg, enc, need_rejected=("train",) if cfg.loss in ("dpo", "orpo") else ())
    model = build_model(cfg, enc, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.loss} | {n_params / 1e6:.2f}M parameters | device {device} | "
          f"{len(splits['train'])} train rows | vocab {enc.n_vocab}"
          + (f" | {world} processes, {cfg.batch_size // world} rows each" if world > 1 else ""),
          flush=True)
    log, train_time = train(cfg, model, enc, splits, device, out_dir)
    if rank != 0:  # rank 0 alone tests and writes the results
        return None
    plot_loss_curve(log, cfg.loss, out_dir / "loss.png")
    autocast = autocast_for(device)
    t = time.time()
    res = evaluate(model, enc, splits["test"], device, autocast, cfg.max_new_tokens, samples=4)
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
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 prints
        sys.stdout = open(os.devnull, "w")
    cfg = parse_config(argv)
    print("config: " + json.dumps(shown_config(cfg)), flush=True)
    try:
        if cfg.bench:
            bench(cfg)
        elif cfg.compare:
            compare(cfg, "python ift.py " + shlex.join(sys.argv[1:] if argv is None else argv))
        else:
            run(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
