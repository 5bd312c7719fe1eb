"""
Time one optimizer step of each loss in ift.py, and a plain language-model step, on one batch.

    python bench.py                  # the default model, batch 32 (run time: README.md)
    python bench.py --steps 30       # more timed steps per row
    python bench.py --help           # every setting (the model flags are ift.py's)

As nanoGPT keeps bench.py beside train.py, this file keeps the speed measurements out of the
lesson. The batch is the first one ift.py's training would draw. Every row steps the same model,
with the settings the flags give, exactly as ift.train() does (DPO's reference log-probs are
computed once beforehand, as there); the rows take turns, step by step, so background load slows
them alike, and ms/step is the median. The "lm (nanoGPT)" row is the plain language-model step of
nanoGPT's train.py on the same inputs (F.cross_entropy on every real position): our speed target.
Every row computes on the real tokens only (ift.py's unpadding), and "useful tok/s" counts those:
padding is neither computed nor counted.

It prints a table and the target ratios (printed, not enforced: IFT/SFT <= 1.35, DPO/SFT <= 2.1,
SFT/lm <= 1) and writes bench.json to --out-dir. On CUDA the steps run as ift.py runs them (bf16
autocast, fused AdamW, torch.compile with --compile auto) and the table adds peak memory and the
model FLOPs utilisation (MFU).
"""

import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import ift
import plumbing

ROWS = ("nanogpt", "sft", "ift", "dpo", "orpo")
WARMUP = 3  # untimed steps of each row first
# flags of ift.Config that mean nothing for one timed batch
SKIP = ("loss", "init_from", "max_steps", "warmup_steps", "min_lr_ratio", "lam_schedule",
        "log_interval", "eval_interval", "max_new_tokens")


@dataclass
class BenchConfig(ift.Config):
    out_dir: str = plumbing.arg("out/bench", "output folder (bench.json)")
    steps: int = plumbing.arg(15, "timed steps per row, after 3 warm-up steps")


def bench_problem(cfg):
    """ift.py's checks, plus the benchmark's own."""
    if ift.WORLD > 1:
        return "bench.py times one process: run it without torchrun"
    if not 1 <= cfg.steps <= 10000:
        return f"--steps must lie in [1, 10000], got {cfg.steps}"
    return ift.config_problem(cfg)


# -----------------------------------------------------------------------------
# Memory and FLOPs

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


# Model FLOPs utilisation (MFU; PaLM, Chowdhery et al. 2022, appendix B): the FLOPs the model's
# maths needs per second, as a fraction of the accelerator's peak. A forward and backward cost
# 6N + 12 L C T FLOPs per token (N = parameters less the position table, L = layers, C = width,
# T = the batch's length), counted on the real tokens only, as useful tok/s is. IFT's no-grad
# forward adds a third of that (2N + 4 L C T); DPO and ORPO cost SFT's per token, on twice the
# tokens. Peaks: dense bf16 tensor-core FLOP/s from
# NVIDIA's data sheets; on any other device MFU is left out.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_flops(device):
    """Peak dense bf16 FLOP/s of this CUDA device if we know it, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def flops_per_token(cfg, model, T, row):
    """Training FLOPs per token of one step of the row (see above)."""
    N = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    fwd_bwd = 6 * N + 12 * cfg.n_layer * cfg.n_embd * T
    return fwd_bwd * ift.IFT_COST if row == "ift" else fwd_bwd


# -----------------------------------------------------------------------------
# The benchmark

def setup(cfg):
    """The benchmark's device, out_dir, model, optimizer, step model, the first batch of training
    (a Split of its rows) and DPO's reference log-probs of it."""
    device, out_dir = ift.start(cfg)
    enc = ift.load_tokenizer(cfg.data)
    path = Path(cfg.data) / "train.jsonl"
    split = ift.Split(ift.load_rows(path, need_rejected=True, limit=cfg.limit_rows), enc,
                      cfg.block_size, str(path))
    first = next(ift.batches(len(split), cfg.batch_size, torch.Generator().manual_seed(cfg.seed)))
    first = ift.by_length(split, first)  # as compute_loss() orders it
    batch = ift.Split([split.rows[i] for i in first], enc, cfg.block_size, "bench batch")
    model = ift.build_model(cfg, enc, device)
    ref = ift.answer_logps(model.eval(), batch, device, ift.autocast_for(device))  # (B, 2)
    model.train()
    optimizer = ift.make_optimizer(cfg, model)
    return device, out_dir, model, optimizer, ift.wrap_for_training(cfg, model, device), batch, ref


def time_rows(cfg, device, model, optimizer, step_model, batch, ref):
    """Each row's first loss, real tokens, saved activations, median ms/step and peak memory:
    the rows take turns, step by step, so background load slows them alike."""
    autocast = ift.autocast_for(device)
    idx = list(range(len(batch)))
    x, y, mask = ift.make_batch(batch.chosen, device)                       # (B, T) each
    real = ift.real_tokens(mask)                            # (B, T): each row's n - 1 inputs
    plain = model if cfg.padded else ift.Unpadded(model)  # what wrap_for_training wraps

    def loss_of(name, module):
        """The loss of one step of row `name` on the batch, and the real tokens it reads."""
        if name == "nanogpt":  # nanoGPT: every real position against the next token
            net = module if cfg.padded else ift.OnRealTokens(module, mask)
            with autocast:
                return F.cross_entropy(net(x)[real], y[real]), int(real.sum())
        loss, _, ntok = ift.compute_loss(dataclasses.replace(cfg, loss=name), module, batch, idx,
                                         device, autocast, ref, cfg.lam)
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
    for name in ROWS:
        (loss, ntok[name]), saved[name] = saved_for_backward(model, lambda: loss_of(name, plain))
        first_loss[name] = loss.item()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds, peak = {name: [] for name in ROWS}, {name: 0 for name in ROWS}
    for i in range(WARMUP + cfg.steps):
        for name in ROWS:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            t = time.perf_counter()
            step(name)
            sync()
            if i >= WARMUP:
                seconds[name].append(time.perf_counter() - t)
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    ms = {name: 1000 * statistics.median(seconds[name]) for name in ROWS}
    return first_loss, ntok, saved, ms, peak, x.shape[1], int(real.sum())


def memory_note(device):
    """How peak memory was measured on this device, in words."""
    if device.type == "cuda":
        return "peak MiB: torch.cuda.max_memory_allocated during the row's steps"
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    return (f"peak MiB: not measured per row on {device.type}; the whole process peaked at "
            f"{rss_mib:.0f} MiB resident (getrusage ru_maxrss)")


def bench(cfg):
    """Time an optimizer step of each loss and of a plain LM step; print a table, write JSON."""
    device, out_dir, model, optimizer, step_model, batch, ref = setup(cfg)
    first_loss, ntok, saved, ms, peak, T, n_real = time_rows(cfg, device, model, optimizer,
                                                             step_model, batch, ref)
    peak_flop_s = peak_flops(device)
    rows = {}
    for name in ROWS:
        tok_s = ntok[name] / ms[name] * 1000
        flops = flops_per_token(cfg, model, T, name)
        rows[name] = {"first_loss": first_loss[name], "ms_per_step": ms[name],
                      "tokens_per_step": ntok[name], "tokens_per_s": tok_s,
                      "ratio_to_sft": ms[name] / ms["sft"], "saved_mib": saved[name] / 2**20,
                      "peak_mib": peak[name] / 2**20 if device.type == "cuda" else None,
                      "mfu": tok_s * flops / peak_flop_s if peak_flop_s else None}
    ratios = {"ift/sft": ms["ift"] / ms["sft"], "dpo/sft": ms["dpo"] / ms["sft"],
              "orpo/sft": ms["orpo"] / ms["sft"], "sft/nanogpt": ms["sft"] / ms["nanogpt"]}
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": str(device),
            "device_name": plumbing.device_name(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "compile": hasattr(step_model, "_orig_mod"),  # torch.compile's wrapper holds that
            "batch_size": len(batch), "seq_len": T, "real_tokens": n_real,
            "params": sum(p.numel() for p in model.parameters()),
            "warmup_steps": WARMUP, "steps": cfg.steps, "memory": memory_note(device)}
    print_table(info, rows, ratios)
    path = out_dir / "bench.json"
    path.write_text(json.dumps({**info, "rows": rows, "ratios": ratios}, indent=2))
    print(f"wrote {path}")
    return rows


def print_table(info, rows, ratios):
    """The benchmark's table, its notes and the target ratios."""
    print(f"bench | {info['date']} | {info['device']}: {info['device_name']} | torch "
          f"{info['torch']} | {info['threads']} threads | compile "
          f"{'on' if info['compile'] else 'off'}")
    share = info["real_tokens"] / (info["batch_size"] * info["seq_len"])
    print(f"{info['params'] / 1e6:.2f}M parameters | batch {info['batch_size']} rows (DPO, ORPO: "
          f"pairs) | T {info['seq_len']}, {share:.0%} of positions real | median of "
          f"{info['steps']} steps after {info['warmup_steps']} warm-up")
    print(f"{'step':<14}{'first loss':>11}{'ms/step':>10}{'useful tok/s':>14}{'x SFT':>8}"
          f"{'saved MiB':>11}{'peak MiB':>10}{'MFU':>7}")
    for name, r in rows.items():
        label = "lm (nanoGPT)" if name == "nanogpt" else name
        peak_txt = f"{r['peak_mib']:.1f}" if r["peak_mib"] is not None else "-"
        mfu_txt = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{label:<14}{r['first_loss']:>11.4f}{r['ms_per_step']:>10.1f}"
              f"{r['tokens_per_s'] / 1000:>13.1f}k{r['ratio_to_sft']:>8.2f}"
              f"{r['saved_mib']:>11.1f}{peak_txt:>10}{mfu_txt:>7}")
    print("useful tok/s: real (non-padding) tokens per second; saved MiB: activations autograd "
          "keeps for the backward (parameters left out)")
    print(info["memory"])
    print(f"targets (printed, not enforced): IFT/SFT {ratios['ift/sft']:.2f} <= 1.35, "
          f"DPO/SFT {ratios['dpo/sft']:.2f} <= 2.1, SFT/lm {ratios['sft/nanogpt']:.2f} <= 1")


def main(argv=None):
    cfg = plumbing.parse_flags(BenchConfig, argv, check=bench_problem, skip=SKIP,
                          description=__doc__.split("\n\n")[0].strip())
    cfg.lr = cfg.lr or ift.DEFAULT_LR["sft"]
    print("config: " + json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                   if k not in SKIP}), flush=True)
    try:
        bench(cfg)
    except plumbing.UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
