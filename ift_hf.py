"""
IFT on a real model: ift.py's loss as a TRL trainer. IFTTrainer is a trl.SFTTrainer whose loss is
ift_loss below; IFTConfig is trl.SFTConfig plus IFT's knobs. Everything else (the chat template,
tokenising, the collator, LoRA, quantisation, gradient checkpointing, evaluation loss,
checkpoints and resuming, the log, torchrun and accelerate) is TRL's and transformers' own.
README.md's "IFT on your own model" shows its use; `python ift_hf.py --help` lists every flag
(every TrainingArguments, SFTConfig and trl ModelConfig flag works, or is refused in one line).

What the trainer does beyond SFTTrainer, and why:
  1. The loss: ift_loss on TRL's batch made ift.py's x, y, mask (trl_batch); test_ift_hf.py
     proves it equal to ift.ift_loss on a lesson GPT copied into GPT-2. A mean per sequence,
     then over sequences, as ift.py's and the official code's (SFTTrainer's: over the batch's
     tokens), so num_items_in_batch is unused and 8 x 1 and 1 x 8 accumulated rows agree.
  2. The mix replaces the output of get_input_embeddings() inside the forward (a hook): any
     causal LM works, and FSDP or ZeRO-3, holding E only during the forward, see a plain one.
  3. The no-grad pass computes logits only from the first answer position on; lam = 0 skips it.
  4. Weights in float32 whatever the checkpoint's dtype: updates of a small lr fall below bf16's
     resolution. --dtype bfloat16 or half_weights: pure half precision, as the official recipe.
     --bf16 (autocast): on by default only on CUDA. Quantisation: CUDA, bitsandbytes and LoRA.
  5. Dropout off in both passes (disable_dropout, LoRA's too), as the official trainer.
  6. The stop token: a chat template's end-of-turn token (ChatML's <|im_end|>) becomes
     SFTConfig's eos_token, so TRL puts it in the generation config (an adapter's folder too).
  7. Messages rows: loss and mix on every assistant turn through its end-of-turn token, as the
     official code, with any template: the mask comes from rendering each conversation's
     prefixes, not from {% generation %} marks (--assistant_only_loss false: every token).
  8. Rows over --max_length are dropped, not cut (a cut row has no stop token), and counted in
     one line, as ift.py does; so are rows with no answer token.
  9. Refused in one line: what merges sequences or changes the logits (packing, padding_free,
     Liger kernels, a loss_type other than nll, label smoothing).
 10. --frozen_embeddings: the official trainer's IFT, both forwards from a frozen copy of E.
 11. The exact-match table (test.jsonl) formats each prompt as training did (messages rows: the
     last assistant turn is the answer) and generates greedily to the stop token.
 12. --eval_strategy: steps when there is an evaluation set. torchrun without an accelerator
     turns use_cpu on (gloo), so the processes train data parallel, as the header shows.
"""

import copy
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import datasets  # noqa: E402 (after the environment above, which transformers reads on import)
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from accelerate.utils import gather_object  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402
from trl.data_utils import common_prefix_length  # noqa: E402
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model  # noqa: E402

import ift  # noqa: E402
import plumbing  # noqa: E402


def first_line(e):
    """An exception as "Type: its message's first line", for one-line errors."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


# -----------------------------------------------------------------------------
# Config: trl.SFTConfig plus IFT's fields; the command line's own few


@dataclass
class IFTConfig(trl.SFTConfig):
    """trl.SFTConfig with IFT's settings. Defaults that differ from SFTConfig's: bf16 (on only
    where CUDA is), eval_strategy (steps when there is an evaluation set), assistant_only_loss
    (on for messages rows), and the dropout that disable_dropout switches off."""

    lam: float = field(default=0.2, metadata={"help": "weight of the model's own predictions"})
    gamma: float = field(default=0.95, metadata={"help": "relation-propagation decay"})
    detach_weights: bool = field(default=False, metadata={"help": "constant relation weights"})
    lam_schedule: str = field(default="constant", metadata={
        "help": "as ift.py's", "choices": ["constant", "warmup", "noisy"]})
    frozen_embeddings: bool = field(default=False, metadata={"help": "mix a frozen copy of E"})
    disable_dropout: bool = field(default=True, metadata={"help": "no dropout in either pass"})
    half_weights: bool = field(default=False, metadata={"help": "pure half precision weights"})
    bf16: bool | None = field(default=None, metadata={"help": "autocast; default: on CUDA"})
    eval_strategy: str | None = field(default=None, metadata={"help": "default: steps if eval set"})
    assistant_only_loss: bool | None = field(default=None, metadata={
        "help": "messages rows: loss on the assistant turns only (default), or on everything"})

    def __post_init__(self):
        for name in ("lam", "gamma"):
            if not 0 <= getattr(self, name) <= 1:
                raise plumbing.UserError(f"--{name} must lie in [0, 1], got {getattr(self, name)}")
        if ift.WORLD > 1 and not torch.accelerator.is_available():
            self.use_cpu = True  # else accelerate starts WORLD single processes, not DDP (gloo)
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and not self.use_cpu and not self.fp16
        self.eval_when_given = self.eval_strategy is None  # IFTTrainer turns on steps then
        self.eval_strategy = self.eval_strategy or "no"
        if self.activation_checkpointing is None:  # SFTConfig's default, under the new name
            self.activation_checkpointing = self.gradient_checkpointing  # (no FutureWarning)
            self.gradient_checkpointing = None
        super().__post_init__()


@dataclass
class ScriptArguments:
    """The command line's own settings (IFTConfig and trl.ModelConfig give the rest)."""

    model: str = field(default="", metadata={"help": "save_pretrained folder or hub id"})
    data: str = field(default=str(ift.HERE / "data"), metadata={
        "help": "folder with train.jsonl, maybe val.jsonl and test.jsonl"})
    dataset_name: str = field(default="", metadata={"help": "instead of --data: load_dataset's"})
    dataset_config: str | None = field(default=None, metadata={"help": "load_dataset's name"})
    dataset_train_split: str = field(default="train", metadata={"help": "the split to train on"})
    dataset_test_split: str = field(default="test", metadata={"help": "evaluation loss split"})
    loss: str = field(default="ift", metadata={
        "help": "ift, or sft (IFT with lam = 0 and gamma = 0)", "choices": ["ift", "sft"]})
    separator: str = field(default="\n", metadata={
        "help": "between this project's prompt and answer without a chat template"})
    limit_rows: int = field(default=0, metadata={"help": "the first N rows of each file"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation budget per test row"})
    eval_batch_size: int = field(default=32, metadata={"help": "test rows per generation batch"})
    bench: int = field(default=0, metadata={"help": "time N IFT and SFT steps instead"})


class Parser(trl.TrlParser):
    def error(self, message):  # a bad command line in one line, as ift.py's parser
        self.exit(2, f"error: {message} (see --help)\n")


def parse_config(argv=None):
    """(ScriptArguments, IFTConfig, trl.ModelConfig) of `python ift_hf.py ...`."""
    try:
        script, args, model_args = Parser((ScriptArguments, IFTConfig, trl.ModelConfig)) \
            .parse_args_and_config(argv)
    except ValueError as e:  # e.g. a flag that no dataclass has
        raise plumbing.UserError(f"{str(e).strip().splitlines()[0]} (see --help)") from None
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    bits = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit"
    problems = [(not (script.model or model_args.model_name_or_path),
                 "--model is required: a local folder written by save_pretrained, or a hub id"),
                (min(script.limit_rows, script.bench) < 0, "--limit_rows and --bench must be >= 0"),
                (min(script.max_new_tokens, script.eval_batch_size) < 1,
                 "--max_new_tokens and --eval_batch_size must be >= 1"),
                (script.bench and (ift.WORLD > 1 or script.loss == "sft"),
                 "--bench times IFT against SFT in one process: drop torchrun and --loss sft"),
                (quantized and (args.use_cpu or not torch.cuda.is_available() or
                                importlib.util.find_spec("bitsandbytes") is None),
                 f"{bits} needs CUDA and bitsandbytes (pip install bitsandbytes); leave it out"),
                (quantized and not model_args.use_peft,
                 f"{bits} freezes the quantised weights: add --use_peft (QLoRA)"),
                (not (math.isfinite(args.learning_rate) and args.learning_rate > 0),
                 f"--learning_rate must be a finite number > 0, got {args.learning_rate}"),
                (not math.isfinite(args.max_grad_norm), "--max_grad_norm must be finite"),
                (min(args.per_device_train_batch_size, args.gradient_accumulation_steps) < 1,
                 "--per_device_train_batch_size and --gradient_accumulation_steps must be >= 1")]
    for bad, message in problems:
        if bad:
            raise plumbing.UserError(message)
    script.model = script.model or model_args.model_name_or_path
    if script.loss == "sft":  # SFT is IFT with lam = 0 and gamma = 0 (ift.py's reduction)
        args.lam, args.gamma, args.lam_schedule = 0.0, 0.0, "constant"
    if args.output_dir == "trainer_output":  # TrainingArguments' default: none given
        args.output_dir = str(Path("out") / f"hf-{script.loss}")
    if model_args.dtype in ("bfloat16", "float16"):  # asked for explicitly: pure half precision
        args.half_weights = True
    if str(args.resume_from_checkpoint).lower() in ("true", "last"):
        args.resume_from_checkpoint = True  # Trainer.train: the output folder's last checkpoint
    return script, args, model_args


# -----------------------------------------------------------------------------
# Data: rows of any accepted format, this project's bridged to prompt/completion; the model

def read_rows(path, limit=0):
    """The rows of a JSON-lines file as a datasets.Dataset, each of one accepted format, all of
    the same one; errors name the file and the line, as ift.load_rows'."""
    rows, kinds = [], set()
    for lineno, row in plumbing.json_lines(path, "pass --data with a folder holding train.jsonl"):
        kind = row_format(row)
        if kind is None:
            raise plumbing.UserError(
                f"{path} line {lineno}: no accepted row format; a row is "
                '{"prompt", "completion"} (text or message lists), {"messages": [...]}, {"text"}, '
                'or this project\'s {"prompt", "chosen"} (task, rejected optional)')
        kinds.add(kind)
        if len(kinds) > 1:
            raise plumbing.UserError(f"{path} line {lineno}: a {kind} row among {kinds - {kind}} "
                                     f"rows; keep one format per file")
        rows.append(row)
        if limit and len(rows) == limit:
            break
    if not rows:
        raise plumbing.UserError(f"{path}: no rows")
    return datasets.Dataset.from_list(rows)


def row_format(row):
    """"ift", "prompt/completion", "messages", "text", or None: which format a row has."""
    def turns(v):  # a message list: [{"role": str, "content": str}, ...]
        return isinstance(v, list) and v and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and
            isinstance(m.get("content"), str) for m in v)
    row = row if isinstance(row, dict) else {}
    if isinstance(row.get("prompt"), str) and isinstance(row.get("chosen"), str) and all(
            isinstance(row.get(k) or "", str) for k in ("task", "rejected")):
        return "ift"
    p, c = row.get("prompt"), row.get("completion")
    if (isinstance(p, str) and isinstance(c, str)) or (turns(p) and turns(c)):
        return "prompt/completion"
    if turns(row.get("messages")):
        return "messages"
    return "text" if isinstance(row.get("text"), str) else None


def load_data(script, limit=0):
    """{"train", "val", "test"}: datasets.Dataset or None, from --data's files (each row checked)
    or --dataset_name (load_dataset; its test split is the evaluation set, as TRL's scripts)."""
    if not script.dataset_name:
        files = {name: Path(script.data) / f"{name}.jsonl" for name in ("train", "val", "test")}
        return {name: read_rows(path, limit) if name == "train" or path.is_file() else None
                for name, path in files.items()}
    try:
        found = datasets.load_dataset(script.dataset_name, name=script.dataset_config)
        train = found[script.dataset_train_split]
    except Exception as e:  # no such dataset, folder or split; offline; unreadable files
        raise plumbing.UserError(f"--dataset_name {script.dataset_name}: {first_line(e)}") from None
    split = {"train": train, "val": found.get(script.dataset_test_split), "test": None}
    return {k: v.select(range(min(limit, len(v)))) if v is not None and limit else v
            for k, v in split.items()}


def bridge_row(row, tok, separator):
    """This project's row as TRL's prompt/completion row: a user turn and an assistant turn if
    tok has a chat template, else strings joined by the separator (SFTTrainer adds the eos)."""
    if tok.chat_template:
        return {"prompt": [{"role": "user", "content": row["prompt"]}],
                "completion": [{"role": "assistant", "content": row["chosen"]}]}
    return {"prompt": row["prompt"] + separator, "completion": row["chosen"]}


def to_dataset(rows, tok, separator):
    """A datasets.Dataset that SFTTrainer takes, from a Dataset or a list of rows: TRL's rows as
    they are, this project's bridged by bridge_row."""
    rows = datasets.Dataset.from_list(rows) if isinstance(rows, list) else rows
    if row_format(rows[0]) != "ift":
        return rows
    return rows.map(lambda row: bridge_row(row, tok, separator), remove_columns=rows.column_names)


def render(tok, messages, generation_prompt=False):
    """The ids of messages rendered by tok's chat template."""
    return tok.apply_chat_template(messages, return_dict=True,
                                   add_generation_prompt=generation_prompt)["input_ids"]


def encode_pair(tok, prompt, completion):
    """(ids, prompt length) of one prompt/completion row, tokenised as SFTTrainer does (the
    parity test checks it): the template around message lists, the eos after a text."""
    if isinstance(prompt, list):
        prompt_ids, ids = render(tok, prompt, True), render(tok, prompt + completion)
    else:
        eos = "" if completion.endswith(tok.eos_token) else tok.eos_token
        prompt_ids = tok(text=prompt)["input_ids"]
        ids = tok(text=prompt + completion + eos)["input_ids"]
    return ids, common_prefix_length(prompt_ids, ids)


def encode_messages(tok, messages):
    """(ids, assistant mask) of a conversation rendered by the chat template: 1 on each assistant
    turn, from the end of the generation prompt through the turn's end-of-turn token. Each
    boundary is the length of a prefix rendered alone, which must start the whole rendering."""
    ids = render(tok, messages)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(tok, messages[:i], True), render(tok, messages[:i + 1])
        if ids[:len(before)] != before or ids[:len(through)] != through:
            raise plumbing.UserError(
                f"the chat template renders a conversation's first {i} turns differently from "
                f"the whole, so the assistant turns cannot be found; pass --assistant_only_loss "
                f"false (loss on every token), or give the rows as prompt/completion")
        mask[len(before):len(through)] = [1] * (len(through) - len(before))
    return ids, mask


def trl_batch(inputs):
    """SFTTrainer's collated batch (input_ids, attention_mask, labels: (B, L), right-padded)
    -> ift.make_batch's x, y, mask (B, T), T = L - 1, and the attention mask of x (B, T)."""
    ids, labels = inputs["input_ids"], inputs["labels"]                     # (B, L)
    real = inputs["attention_mask"][:, 1:].bool()                           # (B, T)
    mask = (labels[:, 1:] != -100) & real     # y[t] = ids[t + 1] is a target: labels say which
    return (ids[:, :-1].masked_fill(~real, 0), ids[:, 1:].masked_fill(~real, 0), mask, real)


def end_of_turn(tok):
    """The token that closes an assistant turn in tok's chat template: the first special token
    after the answer's text, or None."""
    text = tok.apply_chat_template([{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "ANSWER"}], tokenize=False)
    tail = tok(text[text.rindex("ANSWER") + len("ANSWER"):], add_special_tokens=False)
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items()
                                          if t.special}
    return next((tok.convert_ids_to_tokens(i) for i in tail["input_ids"] if i in special), None)


def load_model(name, model_args, trust_remote_code=False):
    """(model, tokenizer) of a causal LM by TRL's create_model_from_path with the flags TRL's
    scripts pass (quantisation included), in float32 unless --dtype says otherwise (4.); a local
    folder needs config and tokenizer files. Any problem is one UserError."""
    path = Path(name)
    if path.exists() and not (path / "config.json").is_file():
        raise plumbing.UserError(f"--model {name}: no config.json; pass a folder written by "
                                 f"save_pretrained")
    if path.exists() and not any((path / file).is_file() for file in (
            "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
            "spiece.model")):
        raise plumbing.UserError(f"--model {name}: no tokenizer files; save the tokenizer there "
                                 f"too (tokenizer.save_pretrained(DIR))")
    kwargs = {"revision": model_args.model_revision, "trust_remote_code": trust_remote_code}
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    try:
        config = transformers.AutoConfig.from_pretrained(name, **kwargs)
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not causal.intersection(
                config.architectures or causal):
            raise plumbing.UserError(f"--model {name}: a {config.model_type} model "
                                     f"({', '.join(config.architectures or ['?'])}), not a causal "
                                     f"LM; pass a causal LM (GPT-2, Llama, Mistral, Qwen, ...)")
        tok = transformers.AutoTokenizer.from_pretrained(name, **kwargs)
        model = create_model_from_path(
            name, dtype=model_args.dtype or "float32", **kwargs,
            attn_implementation=model_args.attn_implementation,
            quantization_config=trl.get_quantization_config(model_args))
    except plumbing.UserError:
        raise
    except Exception as e:  # a corrupt weights file, a tokenizer that cannot load, no network
        if not path.exists():
            raise plumbing.UserError(f"--model {name}: no such local folder, and the hub did not "
                                     f"give it (offline, HF_HUB_OFFLINE=1, or no such model); "
                                     f"where there is a network run `hf download {name} "
                                     f"--local-dir DIR`, then pass --model DIR") from None
        raise plumbing.UserError(f"--model {name}: cannot load it ({first_line(e)})") from None
    vocab = model.get_input_embeddings().weight.shape[0]
    if tok.eos_token_id is None or len(tok) > vocab:
        raise plumbing.UserError(f"--model {name}: the tokenizer ({len(tok)} tokens, eos "
                                 f"{tok.eos_token}) does not fit the model ({vocab} embeddings)")
    return model, tok


# -----------------------------------------------------------------------------
# The loss, ift.ift_loss on a Hugging Face model, and the trainer: SFTTrainer with ift_loss

def ift_loss(model, x, y, mask, lam=0.2, gamma=0.95, detach_weights=False, attention=None,
             frozen_embeddings=False):
    """ift.ift_loss's arguments (x, y, mask (B, T) as ift.make_batch's; attention (B, T), True
    on real tokens, None: all are) and result, for a Hugging Face causal LM (maybe inside DDP
    or PEFT); frozen_embeddings detaches the mix. The metrics add the scored forward's logits."""
    hf = getattr(model, "module", model)                   # under DDP: the model inside it
    inner = hf.get_base_model() if hasattr(hf, "get_base_model") else hf  # under PEFT: its model
    attention_mask = None if attention is None else attention.long()
    x_tilde = None
    if lam > 0:
        with torch.no_grad():  # 1. inference one step ahead, from the first answer position on
            first = int(mask.any(0).nonzero()[0])
            keep = ({"logits_to_keep": torch.arange(first, x.shape[1], device=x.device)}
                    if "logits_to_keep" in inspect.signature(type(inner).forward).parameters
                    else {})  # the class's forward: TRL's patch and PEFT hide it behind **kwargs
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
    return loss, {"nll": ift.sft_loss(token_logps.detach(), mask)[0], "logits": logits.detach()}


class IFTTrainer(trl.SFTTrainer):
    """trl.SFTTrainer whose loss is ift_loss, configured by IFTConfig (the module docstring
    lists what it adds to SFTTrainer). Its log adds nll_loss and lam."""

    loss_is_scaled_for_ga = False  # a mean per batch: the Trainer divides it by the accumulation
    _tag_names = ["trl", "sft", "ift"]

    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        if not isinstance(args, IFTConfig):
            raise plumbing.UserError("IFTTrainer takes an IFTConfig as args")
        refused = [*((getattr(args, flag), f"--{flag} ({flag}=True) merges sequences")
                     for flag in ("packing", "padding_free", "eval_packing")),
                   (args.use_liger_kernel, "--use_liger_kernel replaces layers and the loss"),
                   (args.loss_type != "nll", f"--loss_type {args.loss_type} is another loss"),
                   (args.label_smoothing_factor > 0, "--label_smoothing_factor changes the loss"),
                   (kwargs.get("compute_loss_func"), "compute_loss_func replaces the loss")]
        for bad, what in refused:
            if bad:
                raise plumbing.UserError(f"{what}: not with IFT (IFT needs every sequence alone, "
                                         f"padded, with the model's own logits); leave it out")
        # messages rows: masked by encode_messages (7.), not by TRL's assistant_only_loss
        self.assistant_turns = args.assistant_only_loss is not False
        args.assistant_only_loss = False
        if args.eval_when_given and eval_dataset is not None:
            args.eval_strategy = transformers.IntervalStrategy.STEPS
            args.eval_steps = args.eval_steps or args.logging_steps
        tok = getattr(processing_class, "tokenizer", processing_class)
        if args.eos_token is None and tok is not None and tok.chat_template:
            args.eos_token = end_of_turn(tok)  # the stop token (6.), into the generation config
        super().__init__(model, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        m = self.model
        if not args.half_weights and hasattr(m, "get_base_model"):  # float32 weights (4.):
            for p in m.parameters():  # under LoRA or quantisation, the trained ones
                if p.requires_grad:
                    p.data = p.data.float()
        elif not args.half_weights:
            m.float()
        if args.disable_dropout:
            disable_dropout_in_model(m)
        E, head = m.get_input_embeddings(), m.get_output_embeddings()
        if args.frozen_embeddings and (head is None or head.weight is not E.weight):
            E.requires_grad_(False)  # untied: no gradient reaches them (a tied E's still does)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func,
                         dataset_name):
        """TRL's preparation, with messages rows masked by encode_messages, and rows longer than
        max_length dropped and counted (TRL would cut them: no stop token)."""
        columns = dataset.column_names or []
        if self.assistant_turns and "messages" in columns:
            tok = self._tokenizer
            dataset = dataset.map(lambda row: dict(zip(("input_ids", "assistant_masks"),
                                                       encode_messages(tok, row["messages"]))),
                                  remove_columns=columns)
        if not isinstance(dataset, datasets.Dataset):  # streamed: TRL's own truncation
            return super()._prepare_dataset(dataset, processing_class, args, packing,
                                            formatting_func, dataset_name)
        whole = copy.copy(args)
        whole.max_length = None  # TRL's truncation off: the rows whole, so that we can count
        dataset = super()._prepare_dataset(dataset, processing_class, whole, packing,
                                           formatting_func, dataset_name)
        n, limit = len(dataset), args.max_length or float("inf")
        dataset = dataset.filter(lambda row: len(row["input_ids"]) <= limit and any(
            label != -100 for label in row["labels"]))
        if len(dataset) < n and args.process_index == 0:
            print(f"note: {dataset_name}: dropped {n - len(dataset)} of {n} rows longer than "
                  f"--max_length {args.max_length} tokens or with no answer token (raise "
                  f"--max_length to keep long ones)", flush=True)
        if not len(dataset):
            raise plumbing.UserError(f"{dataset_name}: no row left (every one is longer than "
                                     f"--max_length {args.max_length}, or has no answer token)")
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """ift_loss on the batch at this step's lam (ift.lam_at; the noise seeded by the seed
        and step); with return_outputs, the scored forward's logits (B, T, V). num_items_in_batch
        is unused: the loss is a mean per sequence."""
        x, y, mask, attention = trl_batch(inputs)
        step, args = self.state.global_step, self.args
        noise = (torch.randn(1, generator=torch.Generator().manual_seed(args.seed + 1 + step))
                 .item() if args.lam_schedule == "noisy" else 0.0)
        warmup = args.get_warmup_steps(self.state.max_steps) if self.state.max_steps else 0
        lam = ift.lam_at(SimpleNamespace(lam=args.lam, lam_schedule=args.lam_schedule,
                                         warmup_steps=warmup), step, noise)
        loss, metrics = ift_loss(model, x, y, mask, lam, args.gamma, args.detach_weights,
                                 attention, args.frozen_embeddings)
        mode = "train" if model.training else "eval"
        self._metrics[mode]["nll_loss"].append(
            self.accelerator.gather_for_metrics(metrics["nll"]).mean().item())
        self._metrics[mode]["lam"].append(lam)
        return (loss, SimpleNamespace(logits=metrics["logits"])) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """SFTTrainer's, with the labels shifted as the logits are: (B, T)."""
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only)
        return loss, logits, None if labels is None else labels[:, 1:]

    def _save(self, output_dir=None, state_dict=None):
        """The Trainer's save; an adapter's folder also gets the generation config (stop token)."""
        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model"):
            model.get_base_model().generation_config.save_pretrained(
                output_dir or self.args.output_dir)


# -----------------------------------------------------------------------------
# Evaluation: ift.py's metrics and table on test.jsonl, with the model's own generate()

class TestSplit:
    """What ift.score and ift.prompt_groups read: rows ({task, chosen}), chosen and rejected as
    (ids, prompt length), has_pairs. Each row tokenised as training does (messages rows: as the
    prompt/completion row of their last turn); rows over max_length dropped, and counted."""

    def __init__(self, dataset, tok, separator, max_length):
        self.rows, self.chosen, self.rejected = [], [], []
        kind = row_format(dataset[0])
        for row in dataset:
            if kind == "messages":
                *before, last = row["messages"]
                if last["role"] != "assistant":
                    raise plumbing.UserError("test: a messages row must end with the assistant's "
                                             "turn, the answer to score")
                pairs, answer = [{"prompt": before, "completion": [last]}], last["content"]
            elif kind == "ift":  # the chosen answer, and the rejected one if there is one
                pairs = [bridge_row({"prompt": row["prompt"], "chosen": text}, tok, separator)
                         for text in (row["chosen"], row.get("rejected")) if text]
                answer = row["chosen"]
            else:
                pairs, answer = [row], row["completion"]
                answer = answer[-1]["content"] if isinstance(answer, list) else answer
            encoded = [encode_pair(tok, pair["prompt"], pair["completion"]) for pair in pairs]
            if max(len(ids) for ids, _ in encoded) <= max_length:
                self.rows.append({"task": row.get("task") or "all", "chosen": answer})
                self.chosen.append(encoded[0])
                self.rejected.append(encoded[1] if len(encoded) > 1 else None)
        if len(self.rows) < len(dataset):
            print(f"note: test: dropped {len(dataset) - len(self.rows)} of {len(dataset)} rows "
                  f"longer than --max_length {max_length} tokens")
        if not self.rows:
            raise plumbing.UserError(f"test: every row is longer than --max_length {max_length}")
        self.has_pairs = all(r is not None for r in self.rejected)

    def __len__(self):
        return len(self.rows)


@torch.no_grad()
def evaluate(model, tok, split, max_new_tokens, batch_size, context):
    """Exact match (greedy generation to the stop tokens of the model's generation config),
    preference accuracy and answer NLL, via ift.score."""
    model.eval()
    device, stops = model.device, model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops]) | {tok.eos_token_id}
    answers, nll, preferred = {}, {}, {}
    for idx in ift.prompt_groups(split, batch_size):  # one prompt length: no padding
        prompts = torch.tensor([split.chosen[j][0][:split.chosen[j][1]] for j in idx],
                               device=device)                               # (B, P)
        gen = transformers.GenerationConfig(
            max_new_tokens=max(1, min(max_new_tokens, context - prompts.shape[1])),
            do_sample=False, eos_token_id=sorted(stops),
            pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                             generation_config=gen)[:, prompts.shape[1]:].tolist()
        for j, ids in zip(idx, out):
            end = next((k for k, i in enumerate(ids) if i in stops), len(ids))
            answers[j] = tok.decode(ids[:end], skip_special_tokens=True)
        seqs = [split.chosen[j] for j in idx] + ([split.rejected[j] for j in idx]
                                                 if split.has_pairs else [])
        x, y, mask = ift.make_batch(seqs, device)  # right padding: no real token attends to it
        _, logps = ift.sequence_logps(model(input_ids=x).logits, y, mask)   # (B,) or (2B,)
        nll.update(zip(idx, (-logps / mask.sum(-1))[:len(idx)].tolist()))
        if split.has_pairs:
            preferred.update(zip(idx, (logps[:len(idx)] > logps[len(idx):]).tolist()))
    return ift.score(split, answers, nll, preferred)


# -----------------------------------------------------------------------------
# main: the output folder checked first, so that no run writes over the model or a user's
# folder; --bench: IFT's step against SFT's

MARK = "ift_hf.json"  # this run's settings; also marks a folder as this program's


def check_out_dir(out_dir, model, resuming):
    """--output_dir as a Path: new, empty or an earlier output of ift_hf.py, apart from --model."""
    out, model = Path(out_dir).resolve(), Path(model).resolve()
    if out == model or model in out.parents or out in model.parents:
        raise plumbing.UserError(f"--output_dir {out_dir} holds or lies inside --model; pass "
                                 f"another folder, so that the model you brought stays as it is")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / MARK).is_file():
        raise plumbing.UserError(f"--output_dir {out_dir} exists and was not written by "
                                 f"ift_hf.py; pass a new folder")
    if resuming is True and not any(out.glob("checkpoint-*")):
        raise plumbing.UserError(f"--resume_from_checkpoint: no checkpoint-* in --output_dir "
                                 f"{out_dir}; pass the checkpoint's folder, or start afresh")
    return out


def bench(trainer, n):
    """Median ms of n optimizer steps of IFT and of SFT (lam = 0, gamma = 0) on the first batch,
    with the optimizer the flags configure (--optim), taking turns so that background load
    slows both alike; prints the ratio."""
    model, args = trainer.model, trainer.args
    model.train()
    if args.activation_checkpointing:  # as Trainer.train turns it on (default settings)
        model.activation_checkpointing_enable()
    optimizer = trainer.create_optimizer()
    x, y, mask, attention = trl_batch(trainer._prepare_inputs(
        next(iter(trainer.get_train_dataloader()))))
    seconds = {"ift": [], "sft": []}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for i in range(n + 2):  # two warm-up steps of each
        for name, lam, gamma in (("ift", args.lam, args.gamma), ("sft", 0.0, 0.0)):
            sync()
            t = time.perf_counter()
            with trainer.compute_loss_context_manager():  # autocast, as in training
                loss, _ = ift_loss(model, x, y, mask, lam, gamma, args.detach_weights, attention,
                                   args.frozen_embeddings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync()
            seconds[name] += [time.perf_counter() - t] if i >= 2 else []
    ms = {name: 1000 * sorted(s)[len(s) // 2] for name, s in seconds.items()}
    print(f"bench | {type(model).__name__}, {model.num_parameters() / 1e6:.1f}M parameters "
          f"({model.num_parameters(only_trainable=True) / 1e6:.2f}M trained) | batch "
          f"{x.shape[0]} x T {x.shape[1]} ({int(attention.sum())} real tokens) | "
          f"{type(optimizer).__name__} | {x.device}, {torch.get_num_threads()} threads")
    # FLOPs, a forward = 1: SFT 1 + 2 (backward), IFT one forward more: 4/3 (ift.IFT_COST);
    # LoRA's backward 1 (no weight gradients): 3/2; gradient checkpointing: a forward more.
    sft = 1 + (1 if hasattr(model, "get_base_model") else 2) + bool(args.activation_checkpointing)
    print(f"sft {ms['sft']:.1f} ms/step | ift {ms['ift']:.1f} ms/step | ift/sft "
          f"{ms['ift'] / ms['sft']:.2f} (FLOP bound {(sft + 1) / sft:.2f}"
          f"{', gradient checkpointing' if args.activation_checkpointing else ''}) | median of "
          f"{n} steps")
    return ms


def run(script, args, model_args):
    """Load, fine-tune, save and test, as the flags say; the test results (None off rank 0)."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    out = check_out_dir(args.output_dir, script.model, args.resume_from_checkpoint)
    model, tok = load_model(script.model, model_args, args.trust_remote_code)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and (args.max_length is None or args.max_length > context):
        args.max_length = context  # longer rows are dropped; learned positions end there
    data = load_data(script, script.limit_rows)
    train, val = (to_dataset(data[k], tok, script.separator) if data[k] is not None else None
                  for k in ("train", "val"))
    try:
        trainer = IFTTrainer(model, args=args, processing_class=tok, train_dataset=train,
                             eval_dataset=val, peft_config=trl.get_peft_config(model_args))
    except (ValueError, RuntimeError, TypeError) as e:  # TRL's own checks of data and options
        raise plumbing.UserError(f"TRL refused the setup: {first_line(e)}") from None
    if trainer.args.world_size != ift.WORLD:
        raise plumbing.UserError(f"torchrun started {ift.WORLD} processes, but each trains "
                                 f"alone (world size {trainer.args.world_size}); on a CPU pass "
                                 f"--use_cpu true, on GPUs give each process one")
    if script.bench:
        return bench(trainer, script.bench)
    shares = gather_object([(trainer.args.process_index, trainer.args.world_size,
                             len(trainer.get_train_dataloader()))])  # every rank's, in order
    ranks = ", ".join(f"rank {r} of {w}, {b} batches an epoch" for r, w, b in shares)
    print(f"{script.loss} | {type(model).__name__}, {model.num_parameters():,} parameters | "
          f"{len(trainer.train_dataset)} train rows | lam {args.lam}, gamma {args.gamma} | "
          f"{args.device}" + (f" | {ift.WORLD} processes: {ranks}" if ift.WORLD > 1 else ""),
          flush=True)
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        (out / MARK).write_text(json.dumps({"script": dataclasses.asdict(script),
                                            "model": dataclasses.asdict(model_args),
                                            "trainer": args.to_dict()}, indent=2, default=str))
    train_seconds = trainer.train(args.resume_from_checkpoint).metrics["train_runtime"]
    trainer.save_model(str(out))
    trainer.save_state()  # trainer_state.json: the log (log_history) beside the model
    if not trainer.is_world_process_zero():
        return None
    if data["test"] is None or row_format(data["test"][0]) == "text":
        print(f"wrote {out} (no test.jsonl with prompts and answers: no exact-match table)")
        return {}
    length = args.max_length or 1 << 20
    test = TestSplit(data["test"], tok, script.separator, length)
    t = time.time()
    res = evaluate(trainer.model, tok, test, script.max_new_tokens, script.eval_batch_size, length)
    res.update(train_seconds=train_seconds, eval_seconds=time.time() - t, loss=script.loss)
    print(f"\ntest split ({res['rows']} rows), after {trainer.state.global_step} steps of "
          f"{script.loss} ({plumbing.fmt_time(train_seconds)} training, "
          f"{plumbing.fmt_time(res['eval_seconds'])} evaluation):")
    ift.print_eval_table(res)
    (out / "eval.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out} (the model or LoRA adapter, its tokenizer, {MARK}, trainer_state.json, "
          f"eval.json)")
    return res


def main(argv=None):
    if ift.RANK != 0:  # under torchrun only rank 0 prints
        sys.stdout = open(os.devnull, "w")
    try:
        return run(*parse_config(argv))
    except plumbing.UserError as e:
        sys.exit(f"error: {e}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
