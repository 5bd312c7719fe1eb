"""
Plumbing that ift.py and the programs beside it share, and that the IFT lesson need not show:
the one error type every program prints the same way, config dataclasses as command-line flags,
the checks of a user's files (JSON-lines rows, tokenizer ranks, checkpoints) that name the bad
byte or line, and small formatting helpers.
"""

import argparse
import base64
import dataclasses
import json
import math
import platform
from dataclasses import field
from pathlib import Path

import numpy as np
import torch


class UserError(Exception):
    """A bad input: every program's main() prints it as one line, "error: ...", and exits 1."""


def arg(default, help, choices=None):
    """A config field: its default, and the help text (and allowed values) of its --flag."""
    return field(default=default, metadata={"help": help, "choices": choices})


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (exit status 2), not a usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def finite(text):
    """The argparse type of every float flag: a finite number ("x": invalid finite value)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def parse_flags(cls, argv=None, check=None, skip=(), description=""):
    """The config dataclass cls from the command line: every field but those in skip is a --flag
    (a bool a switch, a tuple several numbers, a float finite). check(cfg) returns the first
    problem with the values as one line (printed as the error), or None."""
    parser = ArgumentParser(description=description, allow_abbrev=False)  # --lr is not --lr-sweep
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = ({"action": "store_true"} if isinstance(f.default, bool) else
                {"type": finite, "nargs": "+"} if isinstance(f.default, tuple) else
                {"type": finite if isinstance(f.default, float) else type(f.default),
                 "choices": f.metadata["choices"]})
        parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                            help=f"{f.metadata['help']} (default: {f.default})", **kind)
    given = vars(parser.parse_args(argv))
    cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    problem = check(cfg) if check else None
    if problem:
        parser.error(problem)
    return cfg




def json_lines(path, hint):
    """(line number, object) for each non-blank line of a JSON-lines file, read as bytes so that
    a line that is not UTF-8 is named, not a traceback; every error names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found ({hint})")
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {lineno}: byte {e.object[e.start]:#04x} at column "
                                f"{e.start + 1} is not UTF-8; save the file as UTF-8") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None




def load_rows(path, need_rejected=False, limit=0):
    """Read one split of ift.py's schema (task, prompt, chosen and maybe rejected: text fields),
    checking every row; errors name the file and the line."""
    rows = []
    hint = "pass --data with a folder holding train.jsonl, val.jsonl and test.jsonl"
    for lineno, row in json_lines(path, hint):
        if not isinstance(row, dict):
            raise UserError(f"{path} line {lineno}: expected a JSON object")
        for key in ("task", "prompt", "chosen", "rejected"):  # rejected: if needed or given
            if key == "rejected" and not (need_rejected or key in row):
                continue
            if not isinstance(row.get(key), str):
                hint = " (DPO and ORPO need preference pairs)" if key == "rejected" else ""
                raise UserError(f"{path} line {lineno}: missing text field '{key}'{hint}")
        rows.append(row)
        if limit and len(rows) == limit:
            break
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def read_ranks(path):
    """{token bytes: rank} from a tiktoken rank file, one "base64(token) rank" line per token
    (parsed here, not by tiktoken.load, which caches by path); a bad line is named."""
    ranks = {}
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:  # also a bad base64 or a byte that is not ASCII
            raise UserError(f"{path} line {lineno}: expected 'base64 rank', got "
                            f"{line[:40]!r}") from None
    if not ranks:
        raise UserError(f"{path}: the file holds no tokens; run python data/prepare.py")
    return ranks


def load_checkpoint(path, model, model_args):
    """Load the ift.py checkpoint at path into model, once it is checked to be one, saved from a
    model of these model_args (a dict); any failure is one UserError line, and no file changes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--init-from {path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        diff = [f"{k} {ckpt['model_args'].get(k)} != {v}"
                for k, v in model_args.items() if ckpt["model_args"].get(k) != v]
        if not diff:
            model.load_state_dict(ckpt["model"])
    except Exception as e:
        raise UserError(f"--init-from {path}: not a checkpoint of ift.py "
                        f"({type(e).__name__})") from None
    if diff:
        raise UserError(f"--init-from {path}: incompatible model ({', '.join(diff)}); "
                        f"pass the same model flags and tokenizer it was trained with")


def fmt_time(seconds):
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s" if seconds >= 60 else f"{int(seconds)}s"


def pyplot():
    """matplotlib.pyplot drawing into files only (the Agg backend, no window), imported when a
    figure is drawn, so that importing a program leaves matplotlib alone."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def mean_std(values):
    """Mean and sample standard deviation (ddof 1; 0 for a single value) along axis 0: Python
    floats for 1-D input (JSON-ready), numpy arrays for (n, ...) input (e.g. seeds x steps)."""
    values = np.asarray(values, dtype=float)                         # (n,) or (n, ...)
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1:])
    mean = values.mean(axis=0)
    return (float(mean), float(std)) if values.ndim == 1 else (mean, std)


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
