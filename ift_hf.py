"""
IFT on a real model: ift.py's loss on any Hugging Face causal LM, trained by transformers.Trainer.

    pip install -r requirements.txt -r requirements-hf.txt
    python ift_hf.py --model DIR --data DIR                  # IFT, lam 0.2, gamma 0.95
    python ift_hf.py --model DIR --data DIR --loss sft       # SFT: IFT with lam = 0, gamma = 0
    python ift_hf.py --model DIR --data DIR --frozen-embeddings   # as the official trainer
    torchrun --nproc_per_node=8 ift_hf.py --model DIR --data DIR  # data parallel, one GPU each
    accelerate launch ift_hf.py --model DIR --data DIR       # the same, from accelerate's config
    python ift_hf.py --model DIR --data DIR --bench 20       # time IFT's step against SFT's
    python ift_hf.py --help                                  # every setting

--model is a local folder in save_pretrained layout (config.json, the weights, the tokenizer's
files): this program never downloads. --data holds train.jsonl and test.jsonl in ift.py's schema
(task, prompt, chosen; rejected for preference accuracy). It trains on train.jsonl, writes a
folder that from_pretrained loads (--out-dir: the model, the tokenizer, ift_hf.json with this
run's settings, log.csv, eval.json) and tests on test.jsonl with ift.py's table. A prompt goes
through the tokenizer's chat template if it has one, as a user turn; the answer's tokens and an
end-of-sequence token are the targets, the prompt is masked. Rows longer than the model's
context (or --max-length) are dropped, with a note. Distribution is the Trainer's: one process
(CPU, one CUDA GPU with bf16, MPS), torchrun, accelerate launch; FSDP and DeepSpeed through
accelerate's config. This file adds no distribution code of its own.

What differs from ift.py's ift_loss, and why (everything else is ift.py's own functions:
shifted_predictions, sequence_logps, relation_weights, sft_loss, lam_at, the data rows):
  1. The mix. ift.py's GPT takes the mixed embeddings as its input (tok_emb). Here the mix
     replaces the output of the model's own input-embedding layer, get_input_embeddings(), inside
     the model's forward (a forward hook): the same tensor that inputs_embeds would carry, so any
     causal LM works, and wrappers that hold E's weight only during the forward (FSDP, DeepSpeed
     ZeRO-3) see an ordinary forward. test_ift_hf.py checks it against inputs_embeds and against
     ift.ift_loss on a transplanted lesson GPT, to float32 rounding.
  2. The no-grad pass keeps only the logits from the batch's first answer position on
     (logits_to_keep, where the model takes it): a real model's output layer over a 32k-150k
     vocabulary is a large share of a forward. ift.py computes all of them (402 tokens: cheap).
  3. lam = 0 (--loss sft) skips the no-grad pass: the mix is E(x) whatever yhat is, so the loss,
     exactly SFT's, costs what SFT costs.
  4. The attention mask is passed (real), as some models need it; positions stay 0..T-1 with
     right padding, as in ift.py.
  5. --frozen-embeddings: the official trainer's IFT, which feeds both forwards from a frozen
     copy of E (ift.py's departure 4): the mix is detached, so the input embeddings get no
     gradient from the inputs; an untied model's stay fixed (they are also frozen for the
     optimizer), a tied model's (GPT-2) still learn through the output layer.
"""

import csv
import dataclasses
import inspect
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network: a model is a local folder
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402 (after the environment above, which transformers reads on import)
import transformers  # noqa: E402
from transformers.trainer_callback import PrinterCallback, TrainerCallback  # noqa: E402

import ift  # noqa: E402

# -----------------------------------------------------------------------------
# Config


@dataclass
class HFConfig:
    model: str = ift.arg("", "local folder of a causal LM in save_pretrained layout (required)")
    data: str = ift.arg(str(ift.HERE / "data"), "folder with train.jsonl and test.jsonl")
    out_dir: str = ift.arg("", "output folder, a from_pretrained folder; empty = out/hf-<loss>")
    loss: str = ift.arg("ift", "ift, or sft (IFT with lam = 0 and gamma = 0)", ("ift", "sft"))
    lam: float = ift.arg(0.2, "IFT lambda: weight of the model's own predictions in its inputs")
    gamma: float = ift.arg(0.95, "IFT relation-propagation decay; 0 = uniform token weights")
    detach_weights: bool = ift.arg(False, "IFT: constant relation weights (the official code: not)")
    lam_schedule: str = ift.arg("constant", "IFT lambda schedule, as ift.py's",
                                ("constant", "warmup", "noisy"))
    frozen_embeddings: bool = ift.arg(False, "mix a frozen copy of the input embeddings, as the "
                                      "official trainer (their inputs get no gradient)")
    max_steps: int = ift.arg(500, "optimizer steps")
    batch_size: int = ift.arg(8, "sequences per optimizer step, over all processes")
    grad_accum: int = ift.arg(1, "micro-batches per step in each process (gradient accumulation)")
    lr: float = ift.arg(1e-5, "peak learning rate (AdamW)")
    min_lr_ratio: float = ift.arg(0.1, "final lr as a fraction of the peak (cosine decay)")
    warmup_steps: int = ift.arg(10, "linear warm-up steps")
    weight_decay: float = ift.arg(0.0, "AdamW weight decay")
    grad_clip: float = ift.arg(1.0, "clip the gradient norm (0 = off)")
    seed: int = ift.arg(1337, "seed of the batch order (and of the noisy lam)")
    max_length: int = ift.arg(0, "drop rows longer than this many tokens (0 = the model's context)")
    max_new_tokens: int = ift.arg(64, "generation budget per test answer")
    eval_batch_size: int = ift.arg(32, "test rows per generation batch")
    log_interval: int = ift.arg(10, "steps between log lines")
    limit_rows: int = ift.arg(0, "use only the first N rows of each split (0 = all; for tests)")
    device: str = ift.arg("auto", "auto picks cuda, then mps, then cpu",
                          ("auto", "cpu", "cuda", "mps"))
    bf16: str = ift.arg("auto", "bf16 mixed precision (auto = on for cuda)", ("auto", "on", "off"))
    bench: int = ift.arg(0, "instead of training: time this many IFT and SFT steps on the first "
                         "batch, taking turns, and print the ratio")


def config_problem(cfg):
    """The first problem with an HFConfig's values, as one line, or None."""
    problems = [
        (not cfg.model, "--model is required: a local folder written by save_pretrained"),
        *[(not 0 <= getattr(cfg, k) <= 1, f"--{k.replace('_', '-')} must lie in [0, 1], got "
           f"{getattr(cfg, k)}") for k in ("lam", "gamma", "min_lr_ratio")],
        (cfg.lr <= 0, f"--lr must be > 0, got {cfg.lr}"),
        (min(cfg.weight_decay, cfg.grad_clip) < 0, "--weight-decay and --grad-clip must be >= 0"),
        (not 0 <= cfg.seed < 2**31, f"--seed must lie in [0, 2^31), got {cfg.seed}"),
        (min(cfg.max_steps, cfg.batch_size, cfg.grad_accum, cfg.max_new_tokens,
             cfg.eval_batch_size, cfg.log_interval) < 1, "--max-steps, --batch-size, "
         "--grad-accum, --max-new-tokens, --eval-batch-size and --log-interval must be >= 1"),
        (min(cfg.warmup_steps, cfg.max_length, cfg.limit_rows, cfg.bench) < 0,
         "--warmup-steps, --max-length, --limit-rows and --bench must be >= 0"),
        (cfg.batch_size % (ift.WORLD * cfg.grad_accum), f"--batch-size {cfg.batch_size} must be "
         f"divisible by {ift.WORLD} process(es) x --grad-accum {cfg.grad_accum}"),
        (cfg.bench and ift.WORLD > 1, "--bench times one process: run it without torchrun"),
        (cfg.bench and cfg.loss == "sft", "--bench times IFT against SFT: leave out --loss sft"),
    ]
    return next((message for bad, message in problems if bad), None)


def parse_config(argv=None):
    """The HFConfig of `python ift_hf.py ...`: flags, checks, and the loss's defaults filled in."""
    cfg = ift.parse_flags(HFConfig, argv, check=config_problem,
                          description=__doc__.split("\n\n")[0].strip())
    if cfg.loss == "sft":  # SFT is IFT with lam = 0 and gamma = 0 (ift.py's reduction)
        cfg.lam, cfg.gamma, cfg.lam_schedule = 0.0, 0.0, "constant"
    cfg.out_dir = cfg.out_dir or str(Path("out") / f"hf-{cfg.loss}")
    return cfg


# -----------------------------------------------------------------------------
# The model and its tokenizer, from a local folder, checked

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model")


def load_model(path):
    """(model, tokenizer) from a local save_pretrained folder; a bad folder is one UserError."""
    path = Path(path)
    if not path.is_dir():
        raise ift.UserError(f"--model {path}: not a local folder; pass a folder written by "
                            f"save_pretrained (config.json, weights, tokenizer files): ift_hf.py "
                            f"never downloads")
    if not (path / "config.json").is_file():
        raise ift.UserError(f"--model {path}: no config.json; pass a folder written by "
                            f"save_pretrained")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ift.UserError(f"--model {path}: config.json is not a model config "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not causal.intersection(
            config.architectures or causal):
        raise ift.UserError(f"--model {path}: a {config.model_type} model "
                            f"({', '.join(config.architectures or ['?'])}), not a causal LM; "
                            f"pass a causal LM (GPT-2, Llama, Mistral, Qwen, ...)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ift.UserError(f"--model {path}: no tokenizer files; save the tokenizer there too "
                            f"(tokenizer.save_pretrained(DIR))")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # a corrupt or missing weights file, a tokenizer that cannot load
        raise ift.UserError(f"--model {path}: cannot load it ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]})") from None
    if tok.eos_token_id is None:
        raise ift.UserError(f"--model {path}: the tokenizer has no end-of-sequence token; set "
                            f"tokenizer.eos_token and save it")
    try:
        E = model.get_input_embeddings()
    except NotImplementedError:
        E = None
    if not isinstance(E, torch.nn.Embedding):
        raise ift.UserError(f"--model {path}: its input embeddings are not a torch.nn.Embedding "
                            f"(get_input_embeddings()); IFT mixes token embeddings")
    if len(tok) > E.num_embeddings:
        raise ift.UserError(f"--model {path}: the tokenizer has {len(tok)} tokens, the model's "
                            f"embedding {E.num_embeddings}: they do not belong together")
    return model, tok


def context_length(model, cfg):
    """The most tokens a row's input may have: the model's context, or less (--max-length)."""
    n = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None)
    if not (n or cfg.max_length):
        raise ift.UserError(f"--model {cfg.model}: its config gives no context length; pass "
                            f"--max-length")
    return min(k for k in (n, cfg.max_length) if k)


class HFSplit(ift.Split):
    """ift.Split encoded with a Hugging Face tokenizer: the prompt (in the chat template, if the
    tokenizer has one, as a user turn), then the answer and the end-of-sequence token."""

    too_long = "the model's context, or --max-length if that is lower"

    def encode(self, prompt, answer):
        tok = self.enc
        try:
            if tok.chat_template:
                text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                               add_generation_prompt=True, tokenize=False)
                prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
            else:  # the tokenizer's own special tokens (e.g. BOS), then the prompt's text
                prompt_ids = tok(prompt, split_special_tokens=True)["input_ids"]
            answer_ids = tok(answer, add_special_tokens=False, split_special_tokens=True)[
                "input_ids"]
        except (TypeError, ValueError) as e:  # e.g. an unpaired surrogate in the JSON text
            raise ift.UserError(f"the tokenizer cannot encode the row {prompt[:40]!r} -> "
                                f"{answer[:40]!r} ({type(e).__name__})") from None
        return prompt_ids + answer_ids + [tok.eos_token_id], len(prompt_ids)


# -----------------------------------------------------------------------------
# The loss: ift.ift_loss on a Hugging Face model (the docstring lists what differs, and why)

def ift_loss(model, x, y, mask, lam=0.2, gamma=0.95, detach_weights=False, real=None,
             frozen_embeddings=False):
    """ift.ift_loss's arguments (x, y, mask, real (B, T) from ift.make_batch) and result, for a
    Hugging Face causal LM (maybe inside DDP); frozen_embeddings detaches the mix."""
    hf = getattr(model, "module", model)                 # under DDP: the model inside it
    attention_mask = None if real is None else real.long()
    x_tilde = None
    if lam > 0:
        with torch.no_grad():  # 1. inference one step ahead, from the first answer position on
            first = int(mask.any(0).nonzero()[0])
            keep = ({"logits_to_keep": torch.arange(first, x.shape[1], device=x.device)}
                    if "logits_to_keep" in inspect.signature(hf.forward).parameters else {})
            logits = model(input_ids=x, attention_mask=attention_mask, **keep).logits
            yhat = torch.zeros_like(x)                                      # (B, T)
            yhat[:, first:] = logits[:, first - x.shape[1]:].argmax(-1)     # (B, T - first)
        x_tilde = ift.shifted_predictions(x, yhat, mask)                    # (B, T)

    def mix(E, args, e):  # 2. the temporal residual connection, at the output of E: (B, T, C)
        if x_tilde is not None:
            e = (1 - lam) * e + lam * E.forward(x_tilde)  # .forward: no hooks, so no recursion
        return e.detach() if frozen_embeddings else e
    hook = hf.get_input_embeddings().register_forward_hook(mix, prepend=True)
    try:  # 3. the forward with gradient, on the mixed embeddings, against the ground truth
        logits = model(input_ids=x, attention_mask=attention_mask).logits   # (B, T, V)
    finally:
        hook.remove()
    token_logps, _ = ift.sequence_logps(logits, y, mask)                    # (B, T)
    token_losses = -token_logps                                             # (B, T)
    w = ift.relation_weights(token_losses, mask, gamma, detach=detach_weights)  # 4. (B, T)
    loss = ((token_losses * w).sum(-1) / mask.sum(-1)).mean()
    return loss, {"nll": ift.sft_loss(token_logps.detach(), mask)[0]}


# -----------------------------------------------------------------------------
# Training through transformers.Trainer

class IFTTrainer(transformers.Trainer):
    """transformers.Trainer whose loss is ift_loss. Its log lines add, as TRL's trainers name
    them, nll_loss (the mean answer-token NLL of the same forward) and lam."""

    loss_is_scaled_for_ga = False  # a mean per batch: the Trainer divides it by --grad-accum

    def __init__(self, *args, ift_cfg, **kwargs):
        super().__init__(*args, **kwargs)
        self.ift_cfg = ift_cfg
        self.lam_noise = torch.randn(ift_cfg.max_steps,
                                     generator=torch.Generator().manual_seed(ift_cfg.seed + 1))
        self.since_log = {"nll_loss": [], "lam": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg, step = self.ift_cfg, min(self.state.global_step, self.ift_cfg.max_steps - 1)
        lam = ift.lam_at(cfg, step, self.lam_noise[step].item())
        loss, metrics = ift_loss(model, inputs["x"], inputs["y"], inputs["mask"], lam, cfg.gamma,
                                 cfg.detach_weights, inputs["real"], cfg.frozen_embeddings)
        self.since_log["nll_loss"].append(metrics["nll"].item())
        self.since_log["lam"].append(lam)
        return loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self.since_log["lam"]:  # means since the last log, over processes
            means = torch.tensor([sum(v) / len(v) for v in self.since_log.values()],
                                 device=self.args.device)
            if self.args.world_size > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            logs.update(zip(self.since_log, means.tolist()))
            self.since_log = {k: [] for k in self.since_log}
        super().log(logs, start_time)


class LogLine(TrainerCallback):
    """One line per logging step on the main process, as ift.py prints them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            extra = "".join(f" | {k} {logs[k]:.4f}" for k in ("nll_loss", "lam") if k in logs)
            print(f"step {state.global_step:5d} | loss {logs['loss']:.4f}{extra} | lr "
                  f"{logs.get('learning_rate', 0):.1e} | grad_norm {logs.get('grad_norm', 0):.3f}",
                  flush=True)


def training_args(cfg, device, out_dir):
    """transformers.TrainingArguments from cfg: the Trainer does the rest (devices, processes)."""
    return transformers.TrainingArguments(
        output_dir=str(out_dir), report_to="none", save_strategy="no", disable_tqdm=True,
        max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size // (
            ift.WORLD * cfg.grad_accum), gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio}, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip, adam_beta2=0.99,
        logging_steps=cfg.log_interval, seed=cfg.seed, use_cpu=device == "cpu",
        bf16=cfg.bf16 == "on" or (cfg.bf16 == "auto" and device == "cuda"),
        remove_unused_columns=False, dataloader_drop_last=True, ddp_find_unused_parameters=False)


def collate(seqs):
    """A batch of (ids, prompt length) -> ift.make_batch's x, y, mask, real, by name."""
    return dict(zip(("x", "y", "mask", "real"), ift.make_batch(seqs, "cpu")))


def train(cfg, model, tok, split, device, tmp_dir):
    """Fine-tune model on split with IFTTrainer; save it, with its tokenizer, into tmp_dir
    (every process takes part, as FSDP needs). Returns the Trainer."""
    if cfg.frozen_embeddings and model.get_output_embeddings() is not None and (
            model.get_output_embeddings().weight is not model.get_input_embeddings().weight):
        model.get_input_embeddings().requires_grad_(False)  # untied: no gradient reaches them
    trainer = IFTTrainer(model=model, args=training_args(cfg, device, tmp_dir),
                         train_dataset=split.chosen, data_collator=collate,
                         processing_class=tok, ift_cfg=cfg)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogLine())
    trainer.train()
    trainer.save_model(str(tmp_dir))
    trainer.accelerator.wait_for_everyone()
    return trainer


# -----------------------------------------------------------------------------
# Evaluation: ift.py's metrics and table, with the model's own generate()

@torch.no_grad()
def evaluate(model, tok, split, cfg, context):
    """Exact match (greedy generation), preference accuracy and answer NLL, via ift.score."""
    model.eval()
    device, eos = model.device, tok.eos_token_id
    answers, nll, preferred = {}, {}, {}
    for idx in ift.prompt_groups(split, cfg.eval_batch_size):  # one prompt length: no padding
        prompts = torch.tensor([split.chosen[j][0][:split.chosen[j][1]] for j in idx],
                               device=device)                               # (B, P)
        new = max(1, min(cfg.max_new_tokens, context - prompts.shape[1]))
        gen = transformers.GenerationConfig(max_new_tokens=new, do_sample=False,
                                            eos_token_id=eos, pad_token_id=eos)
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts),
                             generation_config=gen)[:, prompts.shape[1]:].tolist()
        for j, ids in zip(idx, out):
            answers[j] = tok.decode(ids[:ids.index(eos)] if eos in ids else ids,
                                    skip_special_tokens=True)
        x, y, mask, real = ift.pair_batch(split, idx, device)
        _, logps = ift.sequence_logps(model(input_ids=x, attention_mask=real.long()).logits,
                                      y, mask)                              # (B,) or (2B,)
        nll.update(zip(idx, (-logps / mask.sum(-1))[:len(idx)].tolist()))
        if split.has_pairs:
            preferred.update(zip(idx, (logps[:len(idx)] > logps[len(idx):]).tolist()))
    return ift.score(split, answers, nll, preferred)


# -----------------------------------------------------------------------------
# The output folder: checked first, replaced only when the new model is saved whole

def check_out_dir(cfg):
    """--out-dir as a Path, refusing one that would overwrite the model or a folder of the
    user's: it must be new, empty, or an earlier output of this program."""
    out, model = Path(cfg.out_dir).resolve(), Path(cfg.model).resolve()
    if out == model or model in out.parents or out in model.parents:
        raise ift.UserError(f"--out-dir {cfg.out_dir} holds or lies inside --model {cfg.model}; "
                            f"pass another folder, so that the model you brought stays as it is")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (
            out / "ift_hf.json").is_file():
        raise ift.UserError(f"--out-dir {cfg.out_dir} exists and was not written by ift_hf.py; "
                            f"pass a new folder")
    return out


def publish(tmp_dir, out_dir, cfg):
    """Move the saved model from tmp_dir to out_dir (an earlier output there is replaced only
    now that the new one is complete), with this run's settings in ift_hf.json."""
    (tmp_dir / "ift_hf.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    (tmp_dir / "training_args.bin").unlink(missing_ok=True)
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp_dir.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def write_log(history, path):
    """The Trainer's log lines (loss, nll_loss, lam, lr, grad norm per logging step) as CSV."""
    rows = [h for h in history if "loss" in h]
    keys = ["step", "loss", "nll_loss", "lam", "learning_rate", "grad_norm"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# -----------------------------------------------------------------------------
# The step benchmark (--bench): IFT against SFT on this model

def bench(cfg, model, split, device):
    """Median ms of N optimizer steps of IFT and of SFT (lam = 0, gamma = 0) on the first batch,
    taking turns so background load slows both alike; prints the ratio."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    first = next(ift.batches(len(split), cfg.batch_size, torch.Generator().manual_seed(cfg.seed)))
    x, y, mask, real = ift.make_batch([split.chosen[i] for i in first], device)
    settings = {"ift": (cfg.lam, cfg.gamma), "sft": (0.0, 0.0)}
    seconds = {name: [] for name in settings}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for i in range(cfg.bench + 2):  # two warm-up steps of each
        for name, (lam, gamma) in settings.items():
            sync()
            t = time.perf_counter()
            loss, _ = ift_loss(model, x, y, mask, lam, gamma, cfg.detach_weights, real,
                               cfg.frozen_embeddings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync()
            if i >= 2:
                seconds[name].append(time.perf_counter() - t)
    ms = {name: 1000 * sorted(s)[len(s) // 2] for name, s in seconds.items()}
    params = sum(p.numel() for p in model.parameters())
    print(f"bench | {type(model).__name__}, {params / 1e6:.1f}M parameters, vocab "
          f"{model.get_input_embeddings().num_embeddings} | batch {len(first)} x T {x.shape[1]} "
          f"({int(real.sum())} real tokens) | {device}, {torch.get_num_threads()} threads | "
          f"median of {cfg.bench} steps")
    print(f"sft {ms['sft']:.1f} ms/step | ift {ms['ift']:.1f} ms/step | ift/sft "
          f"{ms['ift'] / ms['sft']:.2f} (FLOP bound {ift.IFT_COST:.2f})")
    return ms


# -----------------------------------------------------------------------------
# main

def run(cfg):
    """Load, fine-tune, save and test, as cfg says; returns the test results (None off rank 0)."""
    device = ift.pick_device(cfg.device).type
    out_dir = check_out_dir(cfg)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model, tok = load_model(cfg.model)
    context = context_length(model, cfg)
    splits = {}
    for name in ("train", "test"):
        path = Path(cfg.data) / f"{name}.jsonl"
        splits[name] = HFSplit(ift.load_rows(path, limit=cfg.limit_rows), tok, context, str(path))
    if len(splits["train"]) < cfg.batch_size:
        raise ift.UserError(f"{Path(cfg.data) / 'train.jsonl'}: {len(splits['train'])} rows, "
                            f"fewer than --batch-size {cfg.batch_size}; lower it")
    if cfg.bench:
        return bench(cfg, model, splits["train"], device)
    print(f"{cfg.loss} | {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters | {len(splits['train'])} train rows | context {context} | device {device}"
          + (f" | {ift.WORLD} processes" if ift.WORLD > 1 else ""), flush=True)
    tmp_dir = out_dir.with_name(out_dir.name + ".saving")
    if ift.RANK == 0:  # a crashed run's leftovers would be saved with the model
        shutil.rmtree(tmp_dir, ignore_errors=True)
    t = time.time()
    trainer = train(cfg, model, tok, splits["train"], device, tmp_dir)
    train_seconds = time.time() - t
    if not trainer.is_world_process_zero():
        trainer.accelerator.wait_for_everyone()
        return None
    publish(tmp_dir, out_dir, cfg)
    write_log(trainer.state.log_history, out_dir / "log.csv")
    t = time.time()
    res = evaluate(trainer.model, tok, splits["test"], cfg, context)
    res.update(train_seconds=train_seconds, eval_seconds=time.time() - t, loss=cfg.loss)
    trainer.accelerator.wait_for_everyone()
    print(f"\ntest split ({res['rows']} rows), after {cfg.max_steps} steps of {cfg.loss} "
          f"({ift.fmt_time(train_seconds)} training, {ift.fmt_time(res['eval_seconds'])} "
          f"evaluation):")
    ift.print_eval_table(res)
    (out_dir / "eval.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out_dir} (from_pretrained loads it: the model, its tokenizer, ift_hf.json, "
          f"log.csv, eval.json)")
    return res


def main(argv=None):
    if ift.RANK != 0:  # under torchrun only rank 0 prints
        sys.stdout = open(os.devnull, "w")
    cfg = parse_config(argv)
    print("config: " + json.dumps(dataclasses.asdict(cfg)), flush=True)
    try:
        run(cfg)
    except ift.UserError as e:
        sys.exit(f"error: {e}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
