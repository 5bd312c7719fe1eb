"""
IFT on a real model: ift.py's loss as a TRL trainer. IFTTrainer is a trl.SFTTrainer whose loss is
ift_loss below; IFTConfig is trl.SFTConfig plus IFT's knobs. Everything else (the chat template,
tokenising, the collator, LoRA, quantisation, gradient checkpointing, evaluation loss,
checkpoints and resuming, the log, torchrun and accelerate) is TRL's and transformers' own.

From Python, with your own model and dataset (any dataset SFTTrainer takes):

    from ift_hf import IFTConfig, IFTTrainer
    trainer = IFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset,
                         args=IFTConfig(output_dir="out/ift", lam=0.2, gamma=0.95))
    trainer.train()

From the command line (every TrainingArguments, SFTConfig and trl ModelConfig flag works, or is
refused in one line):

    pip install -r requirements.txt -r requirements-hf.txt
    python ift_hf.py --model DIR --data DIR                  # IFT, lam 0.2, gamma 0.95
    python ift_hf.py --model DIR --dataset_name NAME_OR_DIR  # rows through datasets.load_dataset
    python ift_hf.py --model DIR --data DIR --loss sft       # IFT with lam = 0, gamma = 0
    python ift_hf.py --model DIR --data DIR --use_peft       # LoRA (--lora_r, --lora_alpha, ...)
    torchrun --nproc_per_node=8 ift_hf.py --model DIR --data DIR  # data parallel (CPU: gloo)
    accelerate launch ift_hf.py --model DIR --data DIR       # the same, from accelerate's config
    python ift_hf.py --model DIR --data DIR --bench 20       # time IFT's step against SFT's
    python ift_hf.py --help                                  # every setting

--model is a local folder in save_pretrained layout, or a hub id, loaded by TRL's own
create_model_from_path. --data holds train.jsonl and maybe val.jsonl (the evaluation loss during
training) and test.jsonl (ift.py's exact-match table at the end); --dataset_name takes a hub
dataset or a local folder of data files instead (--dataset_train_split for training,
--dataset_test_split for the evaluation loss, as TRL's scripts). A row is prompt/completion,
messages, text (TRL's formats) or this project's {task, prompt, chosen, rejected} (task and
rejected optional). Those last rows become prompt/completion rows: a user turn and an assistant
turn when the tokenizer has a chat template, else the prompt, --separator, the answer, as strings.

What the trainer does beyond SFTTrainer, and why:
  1. The loss. compute_loss turns TRL's batch (input_ids, attention_mask, labels) into ift.py's
     x, y, mask (and the attention mask) and calls ift_loss, the function test_ift_hf.py proves
     equal to ift.ift_loss on a lesson GPT copied into GPT-2. The log adds nll_loss (the mean
     answer-token NLL of the same forward) and lam. The loss is a mean per sequence, then over
     sequences, as ift.py's and the official code's (SFTTrainer's own is a mean over the batch's
     tokens); it ignores num_items_in_batch, and the Trainer divides it by the accumulation
     steps, so 8 rows in one step and 1 row in each of 8 accumulated steps agree.
  2. The mix. ift.py's GPT takes mixed embeddings as input; here the mix replaces the output of
     the model's get_input_embeddings() inside its forward (a forward hook): the tensor
     inputs_embeds would carry, so any causal LM works, and wrappers that hold E's weight only
     during the forward (FSDP, DeepSpeed ZeRO-3) see an ordinary forward.
  3. The no-grad pass keeps only the logits from the batch's first answer position on
     (logits_to_keep, asked of the model inside any PEFT or DDP wrapper): a real model's output
     layer is a large share of a forward. lam = 0 skips that pass: the loss is then SFT's. Both
     passes call the model's own forward: TRL's fused log-prob head (the "chunked_nll" of TRL
     1.7-1.15, now an alias of "nll") runs only when asked with fused_lm_head=True.
  4. Weights in float32 whatever the checkpoint's dtype (--dtype bfloat16 or half_weights keeps
     the checkpoint's half precision, as the official recipe's pure bf16): updates of a small lr
     fall below bf16's resolution and are lost. --bf16 is autocast over those weights, on by
     default only on CUDA (SFTConfig turns it on everywhere). LoRA: the adapter is float32.
     --load_in_4bit and --load_in_8bit go through TRL's get_quantization_config, on CUDA with
     bitsandbytes and LoRA only.
  5. Dropout off in both passes (disable_dropout, LoRA's dropout too), as the official trainer.
  6. The stop token. A chat template ends an assistant turn with its own token (ChatML:
     <|im_end|>, which may differ from the tokenizer's eos); it becomes SFTConfig's eos_token,
     so TRL adds it to the model's generation_config and ends text rows with it. The adapter's
     folder gets that generation_config too: load it as the README says.
  7. Messages rows: loss and mix on every assistant turn, through its end-of-turn token, as the
     official code (assistant_only_loss, on by default). The mask comes from rendering each
     conversation's prefixes with the template, so a template without {% generation %} marks
     works; one whose prefixes render differently is refused (--assistant_only_loss false trains
     on whole conversations).
  8. Rows longer than --max_length are dropped, not cut (a cut row has no stop token), and
     counted in one line, as ift.py does; so are rows with no answer token. (A streamed dataset
     is cut, by TRL.)
  9. Refused, in one line: options that merge sequences or change the forward's logits
     (packing, padding_free, Liger kernels, loss_type other than nll, label smoothing).
 10. --frozen_embeddings: the official trainer's IFT, which feeds both forwards from a frozen
     copy of E: the mix is detached, an untied model's input embeddings stay fixed, a tied
     model's (GPT-2) still learn through the output layer.
 11. The exact-match table (test.jsonl) formats each prompt exactly as training did, for every
     row format (messages rows: the last assistant turn is the answer), and generates greedily
     to the stop token. --eval_strategy defaults to steps when there is an evaluation set.
 12. Under torchrun on a machine without an accelerator, use_cpu is switched on (gloo), so the
     processes train data parallel; the header gives each rank's world size and batches.
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
from trl.data_utils import common_prefix_length  # noqa: E402
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model  # noqa: E402

import ift  # noqa: E402
import plumbing  # noqa: E402

# -----------------------------------------------------------------------------
# Config: trl.SFTConfig plus IFT's fields; the command line's own few


@dataclass
class IFTConfig(trl.SFTConfig):
    """trl.SFTConfig (so transformers.TrainingArguments) with IFT's settings. Defaults that
    differ from SFTConfig's: bf16 (on only where CUDA is), eval_strategy (steps when there is an
    evaluation set), assistant_only_loss (on for messages rows), and the dropout that
    disable_dropout switches off."""

    lam: float = field(default=0.2, metadata={"help": "IFT lambda: weight of the model's own "
                                              "predictions in its inputs (0 = SFT)"})
    gamma: float = field(default=0.95, metadata={"help": "IFT relation-propagation decay; "
                                                 "0 = uniform token weights"})
    detach_weights: bool = field(default=False, metadata={
        "help": "IFT: constant relation weights (the official code lets gradient through them)"})
    lam_schedule: str = field(default="constant", metadata={
        "help": "lam per step, as ift.py: constant, warmup (0 -> lam over the warm-up steps) or "
                "noisy (lam + N(0, 1) lam / 2, the official code's option)",
        "choices": ["constant", "warmup", "noisy"]})
    frozen_embeddings: bool = field(default=False, metadata={
        "help": "mix a frozen copy of the input embeddings, as the official trainer"})
    disable_dropout: bool = field(default=True, metadata={
        "help": "switch every dropout off (both passes), as the official trainer"})
    half_weights: bool = field(default=False, metadata={
        "help": "train the weights in the model's own half precision (pure bf16, as the "
                "official recipe); default: float32 weights"})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 autocast (mixed precision); default: on where CUDA is, else off"})
    eval_strategy: str | None = field(default=None, metadata={
        "help": "no, steps or epoch; default: steps (every --eval_steps, else --logging_steps) "
                "when there is an evaluation set, else no"})
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
        if self.eval_strategy is None:
            self.eval_strategy = "no"
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if getattr(self, new) is None:  # SFTConfig's default under transformers' new name
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)
        super().__post_init__()


@dataclass
class ScriptArguments:
    """The command line's own settings (IFTConfig and trl.ModelConfig give the rest)."""

    model: str = field(default="", metadata={"help": "local folder of a causal LM in "
                                             "save_pretrained layout, or a hub id (required)"})
    data: str = field(default=str(ift.HERE / "data"), metadata={
        "help": "folder with train.jsonl, maybe val.jsonl and test.jsonl"})
    dataset_name: str = field(default="", metadata={
        "help": "instead of --data: a hub dataset or a local folder of data files, read by "
                "datasets.load_dataset"})
    dataset_config: str | None = field(default=None, metadata={
        "help": "--dataset_name's configuration (load_dataset's name)"})
    dataset_train_split: str = field(default="train", metadata={"help": "the split to train on"})
    dataset_test_split: str = field(default="test", metadata={
        "help": "the split for the evaluation loss, if --dataset_name has it"})
    loss: str = field(default="ift", metadata={
        "help": "ift, or sft (IFT with lam = 0 and gamma = 0)", "choices": ["ift", "sft"]})
    separator: str = field(default="\n", metadata={
        "help": "between prompt and answer of this project's rows when the tokenizer has no chat "
                "template ('' joins them as SFTTrainer does)"})
    limit_rows: int = field(default=0, metadata={"help": "use only the first N rows of each "
                                                 "file (0 = all)"})
    max_new_tokens: int = field(default=64, metadata={"help": "generation budget per test row"})
    eval_batch_size: int = field(default=32, metadata={"help": "test rows per generation batch"})
    bench: int = field(default=0, metadata={"help": "instead of training: time this many IFT "
                                            "and SFT steps on the first batch, print the ratio"})


class Parser(trl.TrlParser):
    """TrlParser that reports a bad command line in one line, as ift.py's parser does."""

    def error(self, message):
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
                (script.bench and ift.WORLD > 1, "--bench times one process: run it without "
                                                 "torchrun"),
                (script.bench and script.loss == "sft", "--bench times IFT against SFT: leave "
                                                        "out --loss sft"),
                (quantized and (args.use_cpu or not torch.cuda.is_available()),
                 f"{bits} needs CUDA (bitsandbytes' kernels); this run has none: leave it out"),
                (quantized and importlib.util.find_spec("bitsandbytes") is None,
                 f"{bits} needs bitsandbytes: pip install bitsandbytes, or leave it out"),
                (quantized and not model_args.use_peft,
                 f"{bits} freezes the quantised weights: add --use_peft (QLoRA)"),
                (not (math.isfinite(args.learning_rate) and args.learning_rate > 0),
                 f"--learning_rate must be a finite number > 0, got {args.learning_rate}"),
                (not math.isfinite(args.max_grad_norm), "--max_grad_norm must be finite"),
                (min(args.per_device_train_batch_size, args.gradient_accumulation_steps) < 1,
                 "--per_device_train_batch_size and --gradient_accumulation_steps must be >= 1")]
    problem = next((message for bad, message in problems if bad), None)
    if problem:
        raise plumbing.UserError(problem)
    script.model = script.model or model_args.model_name_or_path
    if script.loss == "sft":  # SFT is IFT with lam = 0 and gamma = 0 (ift.py's reduction)
        args.lam, args.gamma, args.lam_schedule = 0.0, 0.0, "constant"
    if args.output_dir == "trainer_output":  # TrainingArguments' default: none given
        args.output_dir = str(Path("out") / f"hf-{script.loss}")
    if model_args.dtype in ("bfloat16", "float16"):  # asked for explicitly: pure half precision
        args.half_weights = True
    if isinstance(args.resume_from_checkpoint, str) and args.resume_from_checkpoint.lower() in (
            "true", "last"):
        args.resume_from_checkpoint = True  # Trainer.train: the output folder's last checkpoint
    return script, args, model_args


# -----------------------------------------------------------------------------
# Data: rows of any accepted format; this project's rows bridged to prompt/completion

FORMATS = ('{"prompt", "completion"} (text or message lists), {"messages": [...]}, {"text"}, '
           'or this project\'s {"prompt", "chosen"} (task, rejected optional)')


def read_rows(path, limit=0):
    """The JSON objects of a JSON-lines file, each checked to be of one accepted format (all of
    the file's of the same one); errors name the file and the line, as ift.load_rows'."""
    rows, kinds = [], set()
    for lineno, row in plumbing.json_lines(path, "pass --data with a folder holding train.jsonl"):
        kind = row_format(row)
        if kind is None:
            raise plumbing.UserError(f"{path} line {lineno}: no accepted row format; a row is "
                                     f"{FORMATS}")
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
    if not isinstance(row, dict):
        return None
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
    if script.dataset_name:
        try:
            found = datasets.load_dataset(script.dataset_name, name=script.dataset_config)
        except Exception as e:  # no such dataset or folder, offline, unreadable files
            raise plumbing.UserError(f"--dataset_name {script.dataset_name}: load_dataset failed "
                                     f"({type(e).__name__}: {str(e).strip()[:160]})") from None
        if script.dataset_train_split not in found:
            raise plumbing.UserError(f"--dataset_name {script.dataset_name} has the splits "
                                     f"{sorted(found)}, not --dataset_train_split "
                                     f"{script.dataset_train_split}")
        split = {"train": found[script.dataset_train_split],
                 "val": found.get(script.dataset_test_split), "test": None}
        return {k: v.select(range(min(limit, len(v)))) if v is not None and limit else v
                for k, v in split.items()}
    files = {name: Path(script.data) / f"{name}.jsonl" for name in ("train", "val", "test")}
    return {name: read_rows(path, limit) if name == "train" or path.is_file() else None
            for name, path in files.items()}


def bridge_row(row, tok, separator):
    """This project's row as TRL's prompt/completion row: a user turn and an assistant turn if
    tok has a chat template (the template then ends the answer), else strings joined by the
    separator (SFTTrainer appends the eos)."""
    if tok.chat_template:
        return {"prompt": [{"role": "user", "content": row["prompt"]}],
                "completion": [{"role": "assistant", "content": row["chosen"]}]}
    return {"prompt": row["prompt"] + separator, "completion": row["chosen"]}


def to_dataset(rows, tok, separator):
    """A datasets.Dataset that SFTTrainer takes, from a Dataset or a list of rows: TRL's rows as
    they are, this project's bridged by bridge_row."""
    if isinstance(rows, list):
        rows = datasets.Dataset.from_list(rows)
    if row_format(rows[0]) != "ift":
        return rows
    return rows.map(lambda row: bridge_row(row, tok, separator), remove_columns=rows.column_names)


def encode_pair(tok, prompt, completion):
    """(ids, prompt length) of one prompt/completion row, tokenised as SFTTrainer does (the
    parity test checks it): the template around message lists, the eos after a text."""
    if isinstance(prompt, list):
        def render(msgs, **kw):
            return tok.apply_chat_template(msgs, tokenize=True, return_dict=True, **kw)[
                "input_ids"]
        prompt_ids, ids = render(prompt, add_generation_prompt=True), render(prompt + completion)
    else:
        eos = "" if completion.endswith(tok.eos_token) else tok.eos_token
        prompt_ids, ids = tok(text=prompt)["input_ids"], tok(text=prompt + completion + eos)[
            "input_ids"]
    return ids, common_prefix_length(prompt_ids, ids)


def encode_messages(tok, messages, chat_template=None):
    """(ids, assistant mask) of a conversation, rendered by the chat template: the mask is 1 on
    each assistant turn, from the end of the template's generation prompt to the end of that
    turn's rendering (its end-of-turn token included). Each boundary is the length of a prefix
    of the conversation rendered alone, so that prefix must render as the start of the whole."""
    def render(msgs, generation_prompt=False):
        return tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                       add_generation_prompt=generation_prompt,
                                       chat_template=chat_template)["input_ids"]
    ids = render(messages)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[:i + 1])
        if ids[:len(before)] != before or ids[:len(through)] != through:
            raise plumbing.UserError(
                f"the chat template renders a conversation's first {i} turns differently from "
                f"the whole, so the assistant turns cannot be found; pass --assistant_only_loss "
                f"false (loss on every token), or give the rows as prompt/completion")
        mask[len(before):len(through)] = [1] * (len(through) - len(before))
    return ids, mask


def trl_batch(inputs):
    """SFTTrainer's collated batch (input_ids, attention_mask, labels: (B, L), right-padded)
    -> ift.make_batch's x, y, mask (B, T), T = L - 1: the same shift by one; and the attention
    mask of x (B, T), True on real tokens."""
    if not {"input_ids", "attention_mask", "labels"} <= set(inputs):
        raise plumbing.UserError(f"the batch holds {sorted(inputs)}; IFT needs input_ids, "
                                 f"attention_mask and labels (SFTTrainer's own collator)")
    ids, labels = inputs["input_ids"], inputs["labels"]                     # (B, L)
    real = inputs["attention_mask"][:, 1:].bool()                           # (B, T)
    mask = (labels[:, 1:] != -100) & real     # y[t] = ids[t + 1] is a target: labels say which
    return (ids[:, :-1].masked_fill(~real, 0), ids[:, 1:].masked_fill(~real, 0), mask, real)


def end_of_turn(tok):
    """The token that closes an assistant turn in tok's chat template: the first special token
    after the answer's text; the eos without a template or without such a token."""
    if not tok.chat_template:
        return tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "ANSWER"}], tokenize=False)
    tail = tok(text[text.rindex("ANSWER") + len("ANSWER"):], add_special_tokens=False)
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items()
                                          if t.special}
    return next((i for i in tail["input_ids"] if i in special), tok.eos_token_id)


# -----------------------------------------------------------------------------
# The model and its tokenizer, from a local folder (checked) or a hub id

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model")


def check_folder(path):
    """A local model folder's problem as a UserError: no config, not a causal LM, no tokenizer."""
    if not (path / "config.json").is_file():
        raise plumbing.UserError(f"--model {path}: no config.json; pass a folder written by "
                                 f"save_pretrained")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise plumbing.UserError(f"--model {path}: config.json is not a model config "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not causal.intersection(
            config.architectures or causal):
        raise plumbing.UserError(f"--model {path}: a {config.model_type} model "
                                 f"({', '.join(config.architectures or ['?'])}), not a causal LM; "
                                 f"pass a causal LM (GPT-2, Llama, Mistral, Qwen, ...)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise plumbing.UserError(f"--model {path}: no tokenizer files; save the tokenizer there "
                                 f"too (tokenizer.save_pretrained(DIR))")


def load_model(name, model_args, trust_remote_code=False):
    """(model, tokenizer) from a local folder or a hub id, by TRL's create_model_from_path with
    the flags TRL's scripts pass (quantisation included), in float32 unless --dtype says
    otherwise (the docstring, 4.); any problem is one UserError."""
    path, local = Path(name), Path(name).exists()
    if local and not path.is_dir():
        raise plumbing.UserError(f"--model {name}: a file, not a folder written by "
                                 f"save_pretrained")
    if local:
        check_folder(path)
    kwargs = {"revision": model_args.model_revision, "trust_remote_code": trust_remote_code}
    quantization = trl.get_quantization_config(model_args)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(name, **kwargs)
        model = create_model_from_path(
            name, dtype=model_args.dtype or "float32", **kwargs,
            attn_implementation=model_args.attn_implementation,
            **({"quantization_config": quantization} if quantization else {}))
    except Exception as e:  # a corrupt weights file, a tokenizer that cannot load, no network
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        if not local:
            raise plumbing.UserError(f"--model {name}: no such local folder, and the hub did not "
                                     f"give it (offline, HF_HUB_OFFLINE=1, or no such model); "
                                     f"where there is a network run `hf download {name} "
                                     f"--local-dir DIR`, then pass --model DIR") from None
        raise plumbing.UserError(f"--model {name}: cannot load it ({type(e).__name__}: {first})"
                                 ) from None
    if tok.eos_token_id is None:
        raise plumbing.UserError(f"--model {name}: the tokenizer has no end-of-sequence token; "
                                 f"set tokenizer.eos_token and save it")
    E = model.get_input_embeddings()
    if not isinstance(E, torch.nn.Embedding):
        raise plumbing.UserError(f"--model {name}: its input embeddings are not a "
                                 f"torch.nn.Embedding (get_input_embeddings()); IFT mixes token "
                                 f"embeddings")
    if len(tok) > E.num_embeddings:
        raise plumbing.UserError(f"--model {name}: the tokenizer has {len(tok)} tokens, the "
                                 f"model's embedding {E.num_embeddings}: they do not belong "
                                 f"together")
    return model, tok


# -----------------------------------------------------------------------------
# The loss: ift.ift_loss on a Hugging Face model (the docstring lists what differs, and why)

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


# -----------------------------------------------------------------------------
# The trainer: SFTTrainer with ift_loss

def incompatible(args, compute_loss_func):
    """The first SFTConfig option IFT cannot honour, as one line, or None."""
    why = "IFT needs every sequence alone, padded, with the model's own logits at every position"
    options = [(args.packing, "--packing (packing=True) merges sequences"),
               (args.padding_free, "--padding_free (padding_free=True) merges sequences"),
               (args.eval_packing, "--eval_packing merges sequences"),
               (args.use_liger_kernel, "--use_liger_kernel replaces the model's layers and loss"),
               (args.loss_type != "nll", f"--loss_type {args.loss_type} is another loss"),
               (args.label_smoothing_factor > 0, "--label_smoothing_factor changes the loss"),
               (compute_loss_func is not None, "compute_loss_func replaces the loss")]
    return next((f"{what}: not with IFT ({why}); leave it out" for bad, what in options if bad),
                None)


class IFTTrainer(trl.SFTTrainer):
    """trl.SFTTrainer whose loss is ift_loss, configured by IFTConfig (the module docstring
    lists what it adds to SFTTrainer). Its log adds nll_loss and lam."""

    loss_is_scaled_for_ga = False  # a mean per batch: the Trainer divides it by the accumulation
    _tag_names = ["trl", "sft", "ift"]

    def __init__(self, model, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        if not isinstance(args, IFTConfig):
            raise plumbing.UserError("IFTTrainer takes an IFTConfig as args (SFTConfig plus lam, "
                                     "gamma, ...)")
        problem = incompatible(args, kwargs.get("compute_loss_func"))
        if problem:
            raise plumbing.UserError(problem)
        # messages rows: the assistant turns by rendering prefixes (_prepare_dataset), not by
        # TRL's assistant_only_loss, which needs {% generation %} marks in the template
        self.assistant_turns = args.assistant_only_loss is not False
        args.assistant_only_loss = False
        if args.eval_when_given and eval_dataset is not None:
            args.eval_strategy = transformers.IntervalStrategy.STEPS
            args.eval_steps = args.eval_steps or args.logging_steps
        tok = getattr(processing_class, "tokenizer", processing_class)
        if args.eos_token is None and tok is not None and tok.chat_template:
            eot = end_of_turn(tok)  # the stop token: TRL puts it into the generation config
            args.eos_token = tok.convert_ids_to_tokens(eot) if eot != tok.eos_token_id else None
        super().__init__(model, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        m = self.model
        if not args.half_weights and hasattr(m, "get_base_model"):  # float32 weights (4.):
            for p in m.parameters():  # under LoRA or quantisation, the trained ones
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
        elif not args.half_weights:
            m.float()
        if args.disable_dropout:
            disable_dropout_in_model(m)
        out_emb = m.get_output_embeddings()
        if args.frozen_embeddings and (out_emb is None or out_emb.weight is not
                                       m.get_input_embeddings().weight):
            m.get_input_embeddings().requires_grad_(False)  # untied: no gradient reaches them

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func,
                         dataset_name):
        """TRL's preparation, with messages rows masked by encode_messages, and rows longer than
        max_length dropped and counted (TRL would cut them: no stop token)."""
        columns = dataset.column_names or []
        if self.assistant_turns and "messages" in columns:
            tok, template = self._tokenizer, self.chat_template
            dataset = dataset.map(
                lambda row: dict(zip(("input_ids", "assistant_masks"),
                                     encode_messages(tok, row["messages"], template))),
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

    def lam_now(self):
        """lam at this optimizer step, by ift.lam_at (the noise: seeded by the seed and step)."""
        step, args = self.state.global_step, self.args
        noise = (torch.randn(1, generator=torch.Generator().manual_seed(args.seed + 1 + step))
                 .item() if args.lam_schedule == "noisy" else 0.0)
        warmup = args.get_warmup_steps(self.state.max_steps) if self.state.max_steps else 0
        return ift.lam_at(SimpleNamespace(lam=args.lam, lam_schedule=args.lam_schedule,
                                          warmup_steps=warmup), step, noise)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """ift_loss on the batch (num_items_in_batch unused: the loss is a mean per sequence);
        with return_outputs, its logits (B, T, V) and labels y (B, T), -100 off the answer."""
        x, y, mask, attention = trl_batch(inputs)
        lam, args = self.lam_now(), self.args
        loss, metrics = ift_loss(model, x, y, mask, lam, args.gamma, args.detach_weights,
                                 attention, args.frozen_embeddings)
        mode = "train" if model.training else "eval"
        self._metrics[mode]["nll_loss"].append(
            self.accelerator.gather_for_metrics(metrics["nll"]).mean().item())
        self._metrics[mode]["lam"].append(lam)
        outputs = {"logits": metrics["logits"], "labels": y.masked_fill(~mask, -100)}
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The evaluation loss (ift_loss at this step's lam); with compute_metrics, also the
        scored forward's logits (B, T, V) and the labels they score (B, T), already shifted."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only or self.compute_metrics is None:
            return loss.detach(), None, None
        return loss.detach(), outputs["logits"], outputs["labels"]

    def _save(self, output_dir=None, state_dict=None):
        """The Trainer's save; an adapter's folder gets the generation config too (the stop
        token), which peft does not write."""
        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model"):
            model.get_base_model().generation_config.save_pretrained(
                output_dir or self.args.output_dir)


# -----------------------------------------------------------------------------
# Evaluation: ift.py's metrics and table on test.jsonl, with the model's own generate()

class TestSplit:
    """What ift.score and ift.prompt_groups read: rows ({task, prompt, chosen}, maybe rejected),
    chosen and rejected as (ids, prompt length), has_pairs. Each row is tokenised as training
    tokenises its format (test_ift_hf.py checks it against an independent generate); messages
    rows answer with their last turn. Rows over max_length are dropped, and counted."""

    def __init__(self, dataset, tok, separator, max_length, name, chat_template=None):
        self.rows, self.chosen, self.rejected = [], [], []
        kind, dropped = row_format(dataset[0]), 0
        for row in dataset:
            if kind == "messages":
                *prompt, last = row["messages"]
                if last["role"] != "assistant":
                    raise plumbing.UserError(f"{name}: a messages row must end with the "
                                             f"assistant's turn, the answer to score")
                ids, turns = encode_messages(tok, row["messages"], chat_template)
                p = len(ids) - turns[::-1].index(0)  # the last assistant turn starts there
                scored, chosen, rejected = {"prompt": "", "chosen": last["content"]}, (ids, p), None
            else:
                pair = bridge_row(row, tok, separator) if kind == "ift" else row
                answer = pair["completion"]
                text = answer[-1]["content"] if isinstance(answer, list) else answer
                chosen = encode_pair(tok, pair["prompt"], answer)
                rejected = None
                if kind == "ift" and row.get("rejected"):
                    worse = bridge_row({**row, "chosen": row["rejected"]}, tok, separator)
                    rejected = encode_pair(tok, worse["prompt"], worse["completion"])
                scored = {"prompt": pair["prompt"], "chosen": text}
            if max(len(chosen[0]), len(rejected[0]) if rejected else 0) > max_length:
                dropped += 1
                continue
            self.rows.append({"task": row.get("task") or "all", **scored})
            self.chosen.append(chosen)
            self.rejected.append(rejected)
        if dropped:
            print(f"note: {name}: dropped {dropped} of {len(dataset)} rows longer than "
                  f"--max_length {max_length} tokens")
        if not self.rows:
            raise plumbing.UserError(f"{name}: every row is longer than --max_length {max_length}")
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
        new = max(1, min(max_new_tokens, context - prompts.shape[1]))
        gen = transformers.GenerationConfig(max_new_tokens=new, do_sample=False,
                                            eos_token_id=sorted(stops),
                                            pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                             generation_config=gen)[:, prompts.shape[1]:].tolist()
        for j, ids in zip(idx, out):
            end = next((k for k, i in enumerate(ids) if i in stops), len(ids))
            answers[j] = tok.decode(ids[:end], skip_special_tokens=True)
        seqs = [split.chosen[j] for j in idx] + ([split.rejected[j] for j in idx]
                                                 if split.has_pairs else [])
        x, y, mask = ift.make_batch(seqs, device)                           # (B, T) each
        lengths = torch.tensor([len(ids) - 1 for ids, _ in seqs], device=device)
        attention = torch.arange(x.shape[1], device=device) < lengths[:, None]  # (B, T)
        _, logps = ift.sequence_logps(model(input_ids=x, attention_mask=attention.long()).logits,
                                      y, mask)                              # (B,) or (2B,)
        nll.update(zip(idx, (-logps / mask.sum(-1))[:len(idx)].tolist()))
        if split.has_pairs:
            preferred.update(zip(idx, (logps[:len(idx)] > logps[len(idx):]).tolist()))
    return ift.score(split, answers, nll, preferred)


# -----------------------------------------------------------------------------
# The output folder: checked first, so that no run writes over the model or a user's folder

MARK = "ift_hf.json"  # this run's settings; also marks a folder as this program's


def check_out_dir(out_dir, model, resuming):
    """--output_dir as a Path, refusing one that would overwrite the model or a folder of the
    user's: it must be new, empty, or an earlier output of this program."""
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


# -----------------------------------------------------------------------------
# The step benchmark (--bench): IFT against SFT on this model

def bench(trainer, n):
    """Median ms of n optimizer steps of IFT and of SFT (lam = 0, gamma = 0) on the trainer's
    first batch, with the optimizer the flags configure (--optim), taking turns so background
    load slows both alike; prints the ratio."""
    model, args = trainer.model, trainer.args
    model.train()
    if args.activation_checkpointing:  # as Trainer.train turns it on (default settings)
        model.activation_checkpointing_enable()
    optimizer = trainer.create_optimizer()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    x, y, mask, attention = trl_batch(inputs)
    settings = {"ift": (args.lam, args.gamma), "sft": (0.0, 0.0)}
    seconds = {name: [] for name in settings}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for i in range(n + 2):  # two warm-up steps of each
        for name, (lam, gamma) in settings.items():
            sync()
            t = time.perf_counter()
            with trainer.compute_loss_context_manager():  # autocast, as in training
                loss, _ = ift_loss(model, x, y, mask, lam, gamma, args.detach_weights, attention,
                                   args.frozen_embeddings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync()
            if i >= 2:
                seconds[name].append(time.perf_counter() - t)
    ms = {name: 1000 * sorted(s)[len(s) // 2] for name, s in seconds.items()}
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"bench | {type(model).__name__}, {total / 1e6:.1f}M parameters ({trained / 1e6:.2f}M "
          f"trained), vocab {model.get_input_embeddings().num_embeddings} | batch {x.shape[0]} x "
          f"T {x.shape[1]} ({int(attention.sum())} real tokens) | {type(optimizer).__name__} | "
          f"{x.device}, {torch.get_num_threads()} threads | median of {n} steps")
    # FLOPs, a forward = 1: SFT 1 + 2 (the backward: activation and weight gradients), IFT one
    # no-grad forward more: 4/3 (ift.IFT_COST). Under LoRA the frozen weights get no gradient
    # (backward 1): 3/2. Gradient checkpointing adds a forward to both: 5/4, LoRA 4/3.
    sft = 1 + (1 if hasattr(model, "get_base_model") else 2) + bool(args.activation_checkpointing)
    print(f"sft {ms['sft']:.1f} ms/step | ift {ms['ift']:.1f} ms/step | ift/sft "
          f"{ms['ift'] / ms['sft']:.2f} (FLOP bound {(sft + 1) / sft:.2f}"
          f"{', gradient checkpointing' if args.activation_checkpointing else ''})")
    return ms


# -----------------------------------------------------------------------------
# main

def run(script, args, model_args):
    """Load, fine-tune, save and test, as the flags say; the test results (None off rank 0)."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    out = check_out_dir(args.output_dir, script.model, args.resume_from_checkpoint)
    model, tok = load_model(script.model, model_args, args.trust_remote_code)
    context = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None)
    if context and (args.max_length is None or args.max_length > context):
        args.max_length = context  # longer rows are dropped; learned positions end there
    data = load_data(script, script.limit_rows)
    train, val = (to_dataset(data[k], tok, script.separator) if data[k] is not None else None
                  for k in ("train", "val"))
    try:
        trainer = IFTTrainer(model, args=args, processing_class=tok, train_dataset=train,
                             eval_dataset=val, peft_config=trl.get_peft_config(model_args))
    except (ValueError, RuntimeError, TypeError) as e:  # TRL's own checks of data and options
        raise plumbing.UserError(f"TRL refused the setup: {str(e).strip().splitlines()[0]}"
                                 ) from None
    if trainer.args.world_size != ift.WORLD:
        raise plumbing.UserError(f"torchrun started {ift.WORLD} processes, but each trains "
                                 f"alone (world size {trainer.args.world_size}); on a CPU pass "
                                 f"--use_cpu true, on GPUs give each process one")
    if script.bench:
        return bench(trainer, script.bench)
    shares = gather_object([(trainer.args.process_index, trainer.args.world_size,
                             len(trainer.get_train_dataloader()))])  # every rank's, in order
    print(f"{script.loss} | {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,}"
          f" parameters | {len(trainer.train_dataset)} train rows | lam {args.lam}, gamma "
          f"{args.gamma} | {args.device}" + (f" | {ift.WORLD} processes: " + ", ".join(
              f"rank {r} of {w}, {b} batches an epoch" for r, w, b in shares)
              if ift.WORLD > 1 else ""), flush=True)
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        (out / MARK).write_text(json.dumps({"script": dataclasses.asdict(script),
                                            "model": dataclasses.asdict(model_args),
                                            "trainer": args.to_dict()}, indent=2, default=str))
    t = time.time()
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    train_seconds = time.time() - t
    trainer.save_model(str(out))
    trainer.save_state()  # trainer_state.json: the log (log_history) beside the model
    if not trainer.is_world_process_zero():
        return None
    if data["test"] is None or row_format(data["test"][0]) == "text":
        print(f"wrote {out} (no test.jsonl with prompts and answers: no exact-match table)")
        return {}
    test = TestSplit(data["test"], trainer.processing_class, script.separator,
                     args.max_length or 1 << 20, "test", trainer.chat_template)
    t = time.time()
    res = evaluate(trainer.model, trainer.processing_class, test, script.max_new_tokens,
                   script.eval_batch_size, args.max_length or 1 << 20)
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
        script, args, model_args = parse_config(argv)
        print("config: " + json.dumps({**dataclasses.asdict(script), "lam": args.lam,
                                       "gamma": args.gamma, "output_dir": args.output_dir}),
              flush=True)
        return run(script, args, model_args)
    except plumbing.UserError as e:
        sys.exit(f"error: {e}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
