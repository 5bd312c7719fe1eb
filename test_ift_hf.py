"""Tests of ift_hf.py, IFT as a TRL trainer: the lesson's GPT transplanted into GPT2LMHeadModel
gives the same logits, IFT loss and gradients; TRL's preprocessing and collator give ift.py's
batch; lam = 0, gamma = 0 is SFTTrainer's own loss on an untied Llama; every row format trains,
with and without LoRA; the chat template's own stop token, float32 master weights for a bf16
checkpoint, resuming, the frozen embeddings; the command line end to end (one run under
torchrun); bad inputs, one line each. Every model and tokenizer is built here, in tmp_path, and
loaded through the real from_pretrained code: nothing is downloaded.

    python -m pytest -q test_ift_hf.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ["HF_HUB_OFFLINE"] = "1"  # before the hub library reads it: no test may download
import peft  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

import ift  # noqa: E402
import ift_hf  # noqa: E402

HERE = Path(__file__).resolve().parent
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
WORDS = ["cat", "dog", "sun", "red", "sky", "fox", "owl", "bee", "elk", "yak", "ant", "emu"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
# ChatML as real models ship it, with no {% generation %} marks: a turn ends with <|im_end|>,
# which is not the tokenizer's eos (<eos>)
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def swap_rows():
    """A task family of the user's own: a pair of words, swapped. Every ordered pair of 12 words
    once, in a fixed shuffled order: 132 rows."""
    pairs = [(a, b) for a in WORDS for b in WORDS if a != b]
    pairs = [pairs[(37 * i) % len(pairs)] for i in range(len(pairs))]  # 37 is prime to 132
    return [{"task": "swap", "prompt": f"swap {a} {b}:", "chosen": f" {b} {a}",
             "rejected": f" {a} {b}"} for a, b in pairs]


def write_data(folder, rows=None):
    """train.jsonl (120 rows) and test.jsonl (12 rows, pairs that train never shows)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows or swap_rows()
    for name, part in (("train", rows[:120]), ("test", rows[120:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


def make_tokenizer(folder, chat=False):
    """A byte-level BPE trained here on the swap rows, saved by save_pretrained; chat=True adds
    ChatML's two tokens and a template that ends a turn with <|im_end|>."""
    texts = [r["prompt"] + r["chosen"] for r in swap_rows()]
    special = ["<pad>", "<eos>", "<unk>"] + (CHAT_TOKENS if chat else [])
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens=CHAT_TOKENS if chat else [])
    if chat:
        tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return tok


def make_model(folder, kind, seed=0, layers=1, width=32, context=64, chat=False,
               dtype=torch.float32):
    """A tiny GPT-2 (tied embeddings, learned positions) or Llama (untied, rotary) with its
    tokenizer, saved in folder by save_pretrained (RESULTS.md's benchmark makes wider ones)."""
    tok = make_tokenizer(folder, chat)
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(tok), n_layer=layers, n_head=2,
                                         n_embd=width, n_positions=context, resid_pdrop=0.1,
                                         embd_pdrop=0.1, attn_pdrop=0.1,
                                         bos_token_id=tok.eos_token_id,
                                         eos_token_id=tok.eos_token_id)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=width,
                                          intermediate_size=2 * width, num_hidden_layers=layers,
                                          num_attention_heads=2, num_key_value_heads=2,
                                          max_position_embeddings=context,
                                          tie_word_embeddings=False,
                                          bos_token_id=None, eos_token_id=tok.eos_token_id)
        model = transformers.LlamaForCausalLM(config)
    model.to(dtype).save_pretrained(folder)
    return folder


def run_cli(*args, torchrun=False):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
              "--standalone"] if torchrun else [sys.executable]
    return subprocess.run([*launch, str(HERE / "ift_hf.py"), *args], capture_output=True,
                          text=True, env=ONE_THREAD, timeout=600, cwd=HERE)


def main(*args):
    """ift_hf.main in this process (the real parser and run): its result, or the error line."""
    try:
        return ift_hf.main([str(a) for a in args])
    except SystemExit as e:
        return e.code


QUIET = ["--gradient_checkpointing", "false", "--report_to", "none", "--disable_tqdm", "true",
         "--save_strategy", "no", "--dataloader_drop_last", "true"]
FAST = [*QUIET, "--use_cpu", "true"]


def config(out, **kw):
    """An IFTConfig for a short CPU run in out."""
    defaults = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=8,
                    learning_rate=3e-3, logging_steps=1, report_to="none", use_cpu=True,
                    gradient_checkpointing=False, save_strategy="no", disable_tqdm=True,
                    dataloader_drop_last=True)
    return ift_hf.IFTConfig(**{**defaults, **kw})


def load(folder, dtype=torch.float32):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def logged(out):
    """The log_history of the trainer_state.json a run wrote into out."""
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# -----------------------------------------------------------------------------
# fixtures: built once per session

@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """Tiny models by name: gpt2 and llama (no chat template), chat-gpt2 and chat-llama."""
    root = tmp_path_factory.mktemp("models")
    return {f"{c}{k}": make_model(root / f"{c}{k}", k, chat=bool(c))
            for k in ("gpt2", "llama") for c in ("", "chat-")}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


# -----------------------------------------------------------------------------
# the transplant: the lesson's GPT inside transformers.GPT2LMHeadModel

def padded(seqs):
    """ift.make_batch's x, y, mask of (ids, prompt length) pairs, and real (B, T): True on the
    tokens of x that are not padding (from the lengths, not from make_batch)."""
    x, y, mask = ift.make_batch(seqs, "cpu")                                # (B, T) each
    real = torch.arange(x.shape[1]) < torch.tensor([len(ids) - 1 for ids, _ in seqs])[:, None]
    return x, y, mask, real


def transplant(gpt):
    """A GPT2LMHeadModel with the lesson GPT's weights (Conv1D stores its matrices transposed)."""
    C, blocks = gpt.wte.weight.shape[1], gpt.blocks
    config = transformers.GPT2Config(vocab_size=gpt.wte.num_embeddings, n_positions=gpt.block_size,
                                     n_embd=C, n_layer=len(blocks), n_head=blocks[0].attn.n_head,
                                     activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, layer_norm_epsilon=1e-5)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        t = hf.transformer
        t.wte.weight.copy_(gpt.wte.weight)
        t.wpe.weight.copy_(gpt.wpe.weight)
        t.ln_f.load_state_dict(gpt.ln_f.state_dict())
        for h, b in zip(t.h, blocks):
            h.ln_1.load_state_dict(b.ln_1.state_dict())
            h.ln_2.load_state_dict(b.ln_2.state_dict())
            for conv, linear in ((h.attn.c_attn, b.attn.qkv), (h.attn.c_proj, b.attn.proj),
                                 (h.mlp.c_fc, b.mlp[0]), (h.mlp.c_proj, b.mlp[2])):
                conv.weight.copy_(linear.weight.T)
                conv.bias.copy_(linear.bias)
    return hf


@pytest.fixture(scope="module")
def lesson():
    """A lesson GPT (trained a few steps, so its predictions are not all alike) and a batch of
    the lesson's data."""
    enc = ift.load_tokenizer(HERE / "data")
    split = ift.Split(ift.load_rows(HERE / "data" / "val.jsonl", limit=12), enc, 128, "val")
    torch.manual_seed(0)
    gpt = ift.GPT(enc.n_vocab, 128, n_layer=2, n_head=2, n_embd=32)
    batch = padded(split.chosen)                                            # x, y, mask, real
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    for _ in range(20):
        loss, _ = ift.ift_loss(gpt, *batch[:3])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return gpt, batch


def test_transplant_gives_the_lesson_gpts_logits(lesson, tmp_path):
    """The lesson GPT and its GPT-2 transplant, saved and reloaded, agree on every logit."""
    gpt, (x, _, _, real) = lesson
    transplant(gpt).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    want = gpt(x)[real]                                                     # (M, V)
    got = hf(input_ids=x, attention_mask=real.long()).logits[real]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("lam, gamma, detach", [(0.2, 0.95, False), (0.5, 0.9, True),
                                                (1.0, 0.0, False), (0.0, 0.95, False)])
def test_bridge_ift_loss_equals_the_lessons_in_value_and_gradient(lesson, lam, gamma, detach):
    """ift_hf.ift_loss on the transplant = ift.ift_loss on the lesson GPT: loss and gradients."""
    gpt, (x, y, mask, real) = lesson
    hf = transplant(gpt).train()
    gpt.zero_grad()
    want, want_metrics = ift.ift_loss(gpt, x, y, mask, lam, gamma, detach)
    want.backward()
    got, got_metrics = ift_hf.ift_loss(hf, x, y, mask, lam, gamma, detach, real)
    got.backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_metrics["nll"], want_metrics["nll"], rtol=0, atol=1e-5)
    t, b = hf.transformer, gpt.blocks[0]
    pairs = [(t.wte.weight.grad, gpt.wte.weight.grad), (t.wpe.weight.grad, gpt.wpe.weight.grad),
             (t.h[0].attn.c_attn.weight.grad, b.attn.qkv.weight.grad.T),
             (t.h[0].mlp.c_proj.weight.grad, b.mlp[2].weight.grad.T),
             (t.ln_f.weight.grad, gpt.ln_f.weight.grad)]
    for g_hf, g_gpt in pairs:
        torch.testing.assert_close(g_hf, g_gpt, rtol=1e-3, atol=1e-6)


def test_the_hook_mix_equals_inputs_embeds(lesson):
    """The mix at E's output (the hook) equals passing the mixed embeddings as inputs_embeds."""
    gpt, (x, y, mask, real) = lesson
    hf = transplant(gpt)
    got, _ = ift_hf.ift_loss(hf, x, y, mask, 0.5, 0.0, False, real)
    with torch.no_grad():
        yhat = hf(input_ids=x, attention_mask=real.long()).logits.argmax(-1)
    E = hf.get_input_embeddings()
    e = 0.5 * E(x) + 0.5 * E(ift.shifted_predictions(x, yhat, mask))
    token_logps, _ = ift.sequence_logps(hf(inputs_embeds=e, attention_mask=real.long()).logits,
                                        y, mask)
    torch.testing.assert_close(got, ift.sft_loss(token_logps, mask)[0], rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------
# TRL's batch is ift.py's batch; lam = 0, gamma = 0 is SFTTrainer's loss

def trl_batches(trainer, n):
    """The first n rows of the trainer's prepared dataset, collated by its own collator."""
    rows = [trainer.train_dataset[i] for i in range(n)]
    return trainer.data_collator(rows)


@pytest.mark.parametrize("chat", [False, True])
def test_trl_preprocessing_and_collator_give_make_batchs_batch(chat, folders, tmp_path):
    """On 64 rows of this project's data: SFTTrainer's tokenisation and collator, through
    trl_batch, give exactly ift.make_batch's x, y, mask, real for the same rows tokenised here:
    without a template the prompt, the separator, the answer, the eos; with one the template's
    user turn, then the answer and the end-of-turn token (<|im_end|>, and its newline) as the
    target. The one possible difference, a BPE merge across the prompt/answer boundary (TRL then
    starts the answer where the two tokenisations diverge), does not occur in these rows."""
    model, tok = load(folders["chat-gpt2" if chat else "gpt2"])
    rows = ift.load_rows(HERE / "data" / "val.jsonl", limit=64)
    trainer = ift_hf.IFTTrainer(model, args=config(tmp_path), processing_class=tok,
                                train_dataset=ift_hf.to_dataset(rows, tok, "\n"))
    x, y, mask, real = ift_hf.trl_batch(trl_batches(trainer, 64))
    seqs = []
    for r in rows:
        if chat:
            prompt = tok(f"<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n")
            answer = tok(r["chosen"] + "<|im_end|>\n")["input_ids"]
        else:
            prompt, answer = tok(r["prompt"] + "\n"), tok(r["chosen"])["input_ids"] + [
                tok.eos_token_id]
        seqs.append((prompt["input_ids"] + answer, len(prompt["input_ids"])))
    want = padded(seqs)
    for name, got, w in zip("x y mask real".split(), (x, y, mask, real), want):
        assert torch.equal(got, w), name
    eot = tok.convert_tokens_to_ids("<|im_end|>") if chat else tok.eos_token_id
    assert all(eot in y[i][mask[i]].tolist() for i in range(len(rows)))


def test_lam0_gamma0_is_sfttrainers_own_loss_on_an_untied_llama(folders, data_dir, tmp_path):
    """IFTTrainer at lam = 0, gamma = 0 against SFTTrainer (its fused, chunked log-probs) on the
    same batch of an untied Llama: the same per-token log-probs; with every row's answer of one
    length, the same loss and gradients. (With unequal lengths they differ on purpose: SFTTrainer
    means over the batch's tokens, IFT over each sequence's, then over sequences.)"""
    rows = ift.load_rows(data_dir / "train.jsonl", limit=8)
    runs = {}
    for name, cls, args in (("sft", trl.SFTTrainer, trl.SFTConfig),
                            ("ift", ift_hf.IFTTrainer, ift_hf.IFTConfig)):
        model, tok = load(folders["llama"])
        kw = dict(lam=0.0, gamma=0.0) if name == "ift" else dict(bf16=False)
        trainer = cls(model, processing_class=tok, train_dataset=ift_hf.to_dataset(rows, tok, "\n"),
                      args=args(output_dir=str(tmp_path / name), report_to="none", use_cpu=True,
                                **kw))
        batch = trl_batches(trainer, 8)
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        runs[name] = loss, {n: p.grad for n, p in model.named_parameters()}, model, batch
    (sft, sft_grads, model, batch), (ift_value, ift_grads, _, _) = runs["sft"], runs["ift"]
    x, y, mask, real = ift_hf.trl_batch(batch)
    assert len(set(mask.sum(-1).tolist())) == 1  # every answer of one length
    torch.testing.assert_close(ift_value, sft, rtol=0, atol=1e-6)
    for name, g in sft_grads.items():
        torch.testing.assert_close(ift_grads[name], g, rtol=1e-4, atol=1e-7, msg=name)
    with torch.no_grad():
        fused = model(**batch, fused_lm_head=True).log_probs                # (B, L - 1)
        logits = model(input_ids=x, attention_mask=real.long()).logits     # (B, T, V)
    token_logps, _ = ift.sequence_logps(logits, y, mask)
    torch.testing.assert_close(token_logps, fused, rtol=0, atol=1e-5)


def test_llama_with_lam0_gamma0_is_sft_computed_independently(folders, data_dir):
    """lam = 0, gamma = 0 on an untied Llama: the loss and gradients of plain cross-entropy on
    the answer tokens (the prompt masked with -100), mean per row, then over rows."""
    model, tok = load(folders["llama"])
    rows = ift.load_rows(data_dir / "train.jsonl", limit=6)
    x, y, mask, real = padded([ift_hf.encode_pair(tok, r["prompt"] + "\n", r["chosen"])
                               for r in rows])
    loss, _ = ift_hf.ift_loss(model, x, y, mask, 0.0, 0.0, False, real)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=x, attention_mask=real.long()).logits         # (B, T, V)
    labels = torch.where(mask, y, -100)
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (B, T)
    want = (per_token.sum(-1) / mask.sum(-1)).mean()
    want.backward()
    torch.testing.assert_close(loss, want, rtol=0, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert got["model.embed_tokens.weight"].abs().sum() > 0


def test_logits_to_keep_reaches_the_model_under_peft(folders, data_dir, tmp_path):
    """Under LoRA (a PeftModel, inside TRL's patched forward) the no-grad pass still computes the
    output layer only from the batch's first answer position on."""
    model, tok = load(folders["llama"])
    rows = ift.load_rows(data_dir / "train.jsonl", limit=8)
    trainer = ift_hf.IFTTrainer(model, args=config(tmp_path), processing_class=tok,
                                train_dataset=ift_hf.to_dataset(rows, tok, "\n"),
                                peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert isinstance(trainer.model, peft.PeftModel)
    x, y, mask, real = ift_hf.trl_batch(trl_batches(trainer, 8))
    widths = []
    head = trainer.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    ift_hf.ift_loss(trainer.model, x, y, mask, 0.2, 0.95, False, real)
    hook.remove()
    first = int(mask.any(0).nonzero()[0])
    assert widths == [x.shape[1] - first, x.shape[1]] and first > 0


# -----------------------------------------------------------------------------
# every row format, with and without LoRA; messages rows train on every assistant turn

def rows_of(fmt):
    """The swap rows in one of the accepted formats (messages: two turns per row)."""
    rows = swap_rows()[:64]
    if fmt == "ift":
        return [{k: r[k] for k in ("prompt", "chosen")} for r in rows]  # task is optional
    if fmt == "prompt/completion":
        return [{"prompt": r["prompt"] + "\n", "completion": r["chosen"]} for r in rows]
    return [{"messages": [{"role": "user", "content": a["prompt"]},
                          {"role": "assistant", "content": a["chosen"]},
                          {"role": "user", "content": b["prompt"]},
                          {"role": "assistant", "content": b["chosen"]}]}
            for a, b in zip(rows[::2], rows[1::2])]


@pytest.mark.parametrize("kind, fmt, lora", [  # each model and each format with and without
    ("gpt2", "ift", False), ("gpt2", "prompt/completion", True), ("gpt2", "messages", False),
    ("llama", "ift", True), ("llama", "prompt/completion", False), ("llama", "messages", True)])
def test_every_row_format_trains_with_and_without_lora(kind, fmt, lora, folders, tmp_path):
    """Eight steps of IFT on 64 rows: the loss falls. With LoRA only the adapter changes (the
    base's weights stay), and the saved adapter loads with peft. Messages rows: the mask holds
    both assistant turns (their <|im_end|> too) and nothing of the user's."""
    folder = folders[("chat-" if fmt == "messages" else "") + kind]
    model, tok = load(folder)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = ift_hf.IFTTrainer(
        model, args=config(tmp_path, learning_rate=1e-2 if lora else 3e-3), processing_class=tok,
        train_dataset=ift_hf.to_dataset(rows_of(fmt), tok, "\n"),
        peft_config=peft.LoraConfig(r=8, lora_alpha=16) if lora else None)
    if fmt == "messages":
        x, y, mask, real = ift_hf.trl_batch(trl_batches(trainer, 1))
        answers = tok.decode(y[0][mask[0]])
        assert answers.count("<|im_end|>") == 2 and "swap" not in answers
    trainer.train()
    seen = losses(trainer)
    assert sum(seen[-3:]) / 3 < seen[0], seen
    if not lora:
        return
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    merged = reloaded.merge_and_unload()
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in trainer.model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base[n], before[n]) for n in before)
    assert any(not torch.equal(p, before[n]) for n, p in merged.named_parameters())
    assert all(p.dtype == torch.float32 for n, p in trainer.model.named_parameters()
               if p.requires_grad)


# -----------------------------------------------------------------------------
# TRL's kinds of tests: every parameter trains; accumulation; evaluation; the loss type

def trainer_on(folder, out, rows=24, **kw):
    """An IFTTrainer on folder's model and the first `rows` swap rows (this project's format)."""
    model, tok = load(folder)
    data = ift_hf.to_dataset(swap_rows()[:rows], tok, "\n")
    return ift_hf.IFTTrainer(model, args=config(out, **kw), processing_class=tok,
                             train_dataset=data)


@pytest.mark.parametrize("lora", [False, True])
def test_every_trainable_parameter_changes(lora, folders, tmp_path):
    """Three steps of IFT on an untied Llama (LoRA: its adapter): every parameter that requires
    a gradient differs from its start; under LoRA no other one does."""
    model, tok = load(folders["llama"])
    trainer = ift_hf.IFTTrainer(model, args=config(tmp_path, max_steps=3), processing_class=tok,
                                train_dataset=ift_hf.to_dataset(swap_rows()[:24], tok, "\n"),
                                peft_config=peft.LoraConfig(r=4) if lora else None)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name


def test_gradient_accumulation_1x8_equals_8x1(folders, tmp_path):
    """Three optimizer steps of 8 rows at once, and of 8 accumulated steps of 1 row: the same
    logged losses and gradient norms to 1e-5 relative (float32; the padding of the batch of 8
    is all that differs). IFT's loss is a mean per sequence; the Trainer divides each
    accumulated step's by 8, which gives the same mean."""
    logs = []
    for batch, steps in ((8, 1), (1, 8)):
        trainer = trainer_on(folders["llama"], tmp_path / str(batch), max_steps=3,
                             per_device_train_batch_size=batch, gradient_accumulation_steps=steps)
        trainer.train()
        logs.append(torch.tensor([(h["loss"], h["grad_norm"]) for h in trainer.state.log_history
                                  if "loss" in h]))
    assert logs[0].shape == (3, 2)
    torch.testing.assert_close(logs[1], logs[0], rtol=1e-5, atol=0)


def test_evaluation_without_num_items_in_batch_and_with_compute_metrics(folders, tmp_path):
    """compute_loss ignores num_items_in_batch (None or a count: the same loss); evaluate() on 8
    rows in one batch gives that loss, and hands compute_metrics the logits and labels of the
    scored forward: (8, T, V) and (8, T), -100 off the answers."""
    seen = {}

    def metrics(p):
        seen["shapes"] = p.predictions.shape, p.label_ids.shape
        return {"answer_tokens": float((p.label_ids != -100).sum())}
    model, tok = load(folders["llama"])
    data = ift_hf.to_dataset(swap_rows()[:8], tok, "\n")
    trainer = ift_hf.IFTTrainer(model, args=config(tmp_path, per_device_eval_batch_size=8),
                                processing_class=tok, train_dataset=data, eval_dataset=data,
                                compute_metrics=metrics)
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(8)])
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        counted = trainer.compute_loss(model, dict(batch), num_items_in_batch=40)
    assert torch.equal(loss, counted)
    res = trainer.evaluate()
    assert abs(res["eval_loss"] - loss.item()) < 1e-5, res
    T = batch["input_ids"].shape[1] - 1
    assert seen["shapes"] == ((8, T, model.config.vocab_size), (8, T))
    assert res["eval_answer_tokens"] == (batch["labels"][:, 1:] != -100).sum().item()


def test_chunked_nll_leaves_ifts_loss_alone(folders, tmp_path):
    """TRL's loss_type "chunked_nll" (the SFT default of TRL 1.7-1.15; in the installed TRL an
    alias of "nll") and TRL's fused log-prob head patched onto the model: IFTTrainer's loss on a
    batch equals ift_loss on an unpatched copy of the same model."""
    with pytest.warns(FutureWarning):
        trainer = trainer_on(folders["llama"], tmp_path, loss_type="chunked_nll")
    assert trainer.args.loss_type == "nll"
    plain, _ = load(folders["llama"])
    batch = trl_batches(trainer, 8)
    x, y, mask, real = ift_hf.trl_batch(batch)
    got = trainer.compute_loss(trainer.model, dict(batch))
    want, _ = ift_hf.ift_loss(plain.train(), x, y, mask, 0.2, 0.95, False, real)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_flags_the_bridge_overrides_or_refuses(folders, data_dir, tmp_path, capsys):
    """Each flag the bridge sets or refuses, through the real parser: --loss sft, --dtype,
    --bf16 and --use_cpu defaults, the eos_token of a chat template, --eval_strategy (no stays
    no; unset, steps once there is an evaluation set), --max_length (longer rows dropped and
    counted in one line), --load_in_4bit (refused without CUDA and bitsandbytes)."""
    script, args, model_args = ift_hf.parse_config(["--model", "m", "--loss", "sft",
                                                    "--dtype", "bfloat16"])
    assert (args.lam, args.gamma, args.half_weights, args.bf16) == (0, 0, True, False)
    assert args.use_cpu == (ift.WORLD > 1 and not torch.accelerator.is_available())
    _, tok = load(folders["chat-llama"])
    rows = ift.load_rows(HERE / "data" / "val.jsonl", limit=24)  # of many lengths
    lengths = sorted(len(ift_hf.encode_pair(tok, *ift_hf.bridge_row(r, tok, "").values())[0])
                     for r in rows)
    limit = lengths[12]
    long = sum(n > limit for n in lengths)
    said = {}
    for name, kw in (("no", dict(eval_strategy="no")), ("unset", {}), ("steps", dict(
            eval_strategy="steps", eval_steps=3))):
        model, tok = load(folders["chat-llama"])
        data = ift_hf.to_dataset(rows, tok, "\n")
        trainer = ift_hf.IFTTrainer(model, args=config(tmp_path, max_length=limit, **kw),
                                    processing_class=tok, train_dataset=data, eval_dataset=data)
        said[name] = trainer.args.eval_strategy, trainer.args.eval_steps
    assert said == {"no": ("no", None), "unset": ("steps", 1), "steps": ("steps", 3)}
    assert tok.eos_token == "<|im_end|>" and trainer.args.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    assert 0 < long < 24 and len(trainer.train_dataset) == 24 - long
    notes = [line for line in capsys.readouterr().out.splitlines() if "dropped" in line]
    assert notes[0] == (f"note: train: dropped {long} of 24 rows longer than --max_length {limit} "
                        f"tokens or with no answer token (raise --max_length to keep long ones)")
    error = main("--model", folders["gpt2"], "--data", data_dir, "--output_dir", tmp_path / "q",
                 "--load_in_4bit", "true", "--use_peft", *FAST)
    assert error.startswith("error: --load_in_4bit needs ") and "\n" not in error, error
    assert not (tmp_path / "q").exists()


def test_dataset_name_reads_a_local_dataset_folder(folders, data_dir, tmp_path):
    """--dataset_name with a folder of data files (load_dataset's local form): it trains on the
    train split and logs the evaluation loss of the test split, as TRL's scripts."""
    out = tmp_path / "out"
    res = main("--model", folders["llama"], "--dataset_name", data_dir, "--output_dir", out,
               "--max_steps", 2, "--logging_steps", 1, "--per_device_train_batch_size", 8, *FAST)
    assert res == {}
    log = logged(out)
    assert [h["step"] for h in log if "eval_loss" in h] == [1, 2]


# -----------------------------------------------------------------------------
# float32 master weights; the frozen embeddings; resuming

def changed(folder, model):
    """The fraction of the weights of model that differ from those saved in folder."""
    start = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    old = dict(start.named_parameters())
    n = sum(p.numel() for p in old.values())
    return sum((p.detach().float() != old[k]).sum().item() for k, p in model.named_parameters()) / n


def test_a_bf16_checkpoint_trains_in_float32(tmp_path, data_dir):
    """A Llama saved in bf16 and the same weights saved in float32, 10 steps at lr 1e-5: the bf16
    one (loaded in its own dtype, as from_pretrained does) changes about as many weights as the
    float32 one, and is float32 after; pure bf16 (half_weights) keeps far fewer of its updates."""
    bf16, fp32 = tmp_path / "bf16", tmp_path / "fp32"
    make_model(bf16, "llama", width=64, dtype=torch.bfloat16)
    make_model(fp32, "llama", width=64, dtype=torch.bfloat16)  # rounded to bf16, then
    transformers.AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.float32).save_pretrained(
        fp32)                                                    # saved in float32
    rows = ift.load_rows(data_dir / "train.jsonl", limit=80)
    fraction = {}
    for name, folder, half in (("bf16", bf16, False), ("fp32", fp32, False), ("pure", bf16, True)):
        model, tok = load(folder, dtype="auto")
        trainer = ift_hf.IFTTrainer(model, args=config(tmp_path / name, max_steps=10,
                                                       learning_rate=1e-5, half_weights=half),
                                    processing_class=tok,
                                    train_dataset=ift_hf.to_dataset(rows, tok, "\n"))
        trainer.train()
        fraction[name] = changed(folder, trainer.model)
        dtypes = {p.dtype for p in trainer.model.parameters()}
        assert dtypes == {torch.bfloat16 if half else torch.float32}
    assert fraction["bf16"] > 0.9 * fraction["fp32"] > 0.4, fraction
    assert fraction["pure"] < 0.5 * fraction["bf16"], fraction


@pytest.mark.parametrize("kind, frozen, changes", [("llama", False, True), ("llama", True, False),
                                                   ("gpt2", True, True)])
def test_frozen_embeddings_freeze_what_the_official_trainer_freezes(
        kind, frozen, changes, folders, data_dir, tmp_path):
    """After training: the default trains the input embeddings; frozen_embeddings keeps an
    untied model's unchanged; a tied model's (GPT-2) still learn through the output layer."""
    model, tok = load(folders[kind])
    before = model.get_input_embeddings().weight.detach().clone()
    trainer = ift_hf.IFTTrainer(model, args=config(tmp_path, max_steps=3, frozen_embeddings=frozen),
                                processing_class=tok, train_dataset=ift_hf.to_dataset(
                                    ift.load_rows(data_dir / "train.jsonl", limit=24), tok, "\n"))
    trainer.train()
    assert (model.get_input_embeddings().weight != before).any() == changes


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_runs_loss(folders, data_dir,
                                                                      tmp_path):
    """The command line, 6 steps with a checkpoint at 3 (noisy lam, so the step's noise must
    come back too); then again from checkpoint-3: steps 4-6 log the same losses, to 1e-5."""
    args = ["--model", folders["llama"], "--data", data_dir, "--output_dir", tmp_path / "run",
            "--max_steps", 6, "--per_device_train_batch_size", 8, "--learning_rate", 3e-3,
            "--logging_steps", 1, "--lam_schedule", "noisy", *FAST, "--save_strategy", "steps",
            "--save_steps", 3]
    assert isinstance(main(*args), dict)
    first = logged(tmp_path / "run")
    assert isinstance(main(*args, "--resume_from_checkpoint", tmp_path / "run" / "checkpoint-3"),
                      dict)
    second = logged(tmp_path / "run")
    first, second = ({h["step"]: h["loss"] for h in log if "loss" in h} for log in (first, second))
    assert sorted(second) == [1, 2, 3, 4, 5, 6]  # 1-3 from checkpoint-3's trainer state
    for step in (4, 5, 6):
        assert abs(second[step] - first[step]) < 1e-5, (step, first, second)


# -----------------------------------------------------------------------------
# the command line, end to end: the template's own stop token; torchrun; the bench

def generated(model, prompt, max_new_tokens=8):
    """The ids model generates greedily after prompt (ids), by its own generation config."""
    prompt = torch.tensor([prompt])
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=max_new_tokens)[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("lora", [False, True])
def test_cli_on_a_chat_llama_stops_at_the_templates_end_of_turn(lora, folders, data_dir, tmp_path):
    """python ift_hf.py on a Llama whose template ends a turn with <|im_end|> (not its eos), 8
    rows learnt by heart, val.jsonl for the evaluation loss: the saved model (LoRA: the adapter
    loaded as the README says, and merged), given each training prompt through the template,
    generates the answer (LoRA: some answer) and then <|im_end|>, once; the exact-match table,
    the log with the evaluation loss."""
    data = write_data(tmp_path / "data")
    (data / "val.jsonl").write_text((data_dir / "test.jsonl").read_text())
    out = tmp_path / "out"
    adapter = ["--use_peft", "--lora_r", 16, "--lora_alpha", 32, "--lora_target_modules",
               "all-linear", "--lora_modules_to_save", "lm_head"] if lora else []
    res = main("--model", folders["chat-llama"], "--data", data, "--output_dir", out,
               "--limit_rows", 8, "--max_steps", 60, "--per_device_train_batch_size", 8,
               "--learning_rate", 3e-2 if lora else 1e-2, "--logging_steps", 20, *FAST, *adapter)
    assert isinstance(res, dict) and res["rows"] == 8 and 0 <= res["exact_match"] <= 1, res
    log = logged(out)
    train = [h for h in log if "loss" in h]
    assert len(train) == 3 and all(abs(h["lam"] - 0.2) < 1e-9 for h in train)
    assert any("eval_loss" in h and "eval_nll_loss" in h for h in log)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    if lora:  # the README's way: the adapter, with the generation config saved beside it
        model = peft.AutoPeftModelForCausalLM.from_pretrained(
            out, generation_config=transformers.GenerationConfig.from_pretrained(out))
        models = [model, model.merge_and_unload()]
    else:
        models = [transformers.AutoModelForCausalLM.from_pretrained(out)]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for model in models:
        assert eot != 1 and eot in model.generation_config.eos_token_id
        for row in swap_rows()[:8]:
            prompt = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                             add_generation_prompt=True, return_dict=True)[
                                                 "input_ids"]
            text = tok.decode(generated(model, prompt))  # LoRA learns these rows less well:
            assert text == row["chosen"] + "<|im_end|>" or lora and text.count("<|im_end|>") == 1 \
                and text.endswith("<|im_end|>"), text  # it stops there, once
    assert json.loads((out / "ift_hf.json").read_text())["script"]["loss"] == "ift"


@pytest.mark.parametrize("kind, fmt", [("llama", "prompt/completion"),
                                       ("chat-llama", "prompt/completion"),
                                       ("chat-llama", "messages")])
def test_the_exact_match_table_agrees_with_an_independent_generate(kind, fmt, folders,
                                                                   tmp_path):
    """16 rows of one format trained by heart; test.jsonl holds 8 of them and 4 unseen: each of
    the table's answers is what the saved model's own generate() gives, prompted in the training
    format (a text prompt as it is, template or not; a conversation's turns before its last),
    and so is the exact match."""
    rows, data, out = rows_of(fmt), tmp_path / "data", tmp_path / "out"
    data.mkdir()
    test = rows[:8] + rows[-4:]
    for name, part in (("train", rows[:16]), ("test", test)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    res = main("--model", folders[kind], "--data", data, "--output_dir", out, "--max_steps", 40,
               "--per_device_train_batch_size", 8, "--learning_rate", 1e-2, "--logging_steps",
               40, *FAST)
    model, tok = load(out)
    stops = model.generation_config.eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    answers, right = [], []
    for row in test:
        if fmt == "messages":
            prompt = tok.apply_chat_template(row["messages"][:-1], add_generation_prompt=True,
                                             return_dict=True)["input_ids"]
            want = row["messages"][-1]["content"]
        else:
            prompt, want = tok(row["prompt"])["input_ids"], row["completion"]
        new = generated(model, prompt)
        new = new[:next((k for k, i in enumerate(new) if i in stops), len(new))]
        answers.append(tok.decode(new, skip_special_tokens=True))
        right.append(answers[-1].strip() == want.strip())
    assert res["answers"] == answers and res["exact_match"] == sum(right) / 12, (res, right)


def test_assistant_turns_of_a_three_turn_conversation_token_by_token(folders):
    """encode_messages under a plain ChatML template (no generation marks) on a conversation of
    three exchanges: the template's own ids, and the mask 1 exactly on each assistant turn's
    answer, <|im_end|> and newline, 0 on every user turn and every turn's header."""
    _, tok = load(folders["chat-llama"])
    messages = [{"role": role, "content": text} for question, answer in (
        ("swap cat dog:", " dog cat"), ("swap sun red:", " red sun"), ("swap sky fox:", " fox sky"))
        for role, text in (("user", question), ("assistant", answer))]
    ids, mask = ift_hf.encode_messages(tok, messages)
    assert ids == tok.apply_chat_template(messages, return_dict=True)["input_ids"]
    want_ids, want_mask = [], []
    for m in messages:
        head = tok("<|im_start|>" + m["role"] + "\n", add_special_tokens=False)["input_ids"]
        body = tok(m["content"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        want_ids += head + body
        want_mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
    assert ids == want_ids and mask == want_mask and sum(mask) > 9


def test_torchrun_on_a_cpu_is_data_parallel(folders, data_dir, tmp_path):
    """torchrun with 2 processes on a CPU, without --use_cpu: each rank has world size 2 and half
    the batches of an epoch (120 rows, 2 a rank: 30 a rank), ends with the weights of one
    process with batch 4, and prints the test table once."""
    args = ["--model", folders["gpt2"], "--data", data_dir, "--learning_rate", 1e-3,
            "--max_steps", 4, "--seed", 3, *QUIET]
    ddp = run_cli(*map(str, args), "--per_device_train_batch_size", "2", "--output_dir",
                  str(tmp_path / "ddp"), torchrun=True)
    assert ddp.returncode == 0, ddp.stderr
    assert ("2 processes: rank 0 of 2, 30 batches an epoch, rank 1 of 2, 30 batches an epoch"
            in ddp.stdout), ddp.stdout
    assert ddp.stdout.count("test split") == 1
    assert isinstance(main(*args, "--per_device_train_batch_size", 4, "--output_dir",
                           tmp_path / "one"), dict)
    weights = [transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d).state_dict()
               for d in ("ddp", "one")]
    for name, w in weights[1].items():
        torch.testing.assert_close(weights[0][name], w, rtol=0, atol=1e-5, msg=name)


def test_bench_prints_the_ift_over_sft_ratio(folders, data_dir, capsys, tmp_path):
    """--bench times IFT's and SFT's steps on the first batch and prints their ratio (LoRA too)."""
    main("--model", folders["llama"], "--data", data_dir, "--bench", 2, "--use_peft",
         "--per_device_train_batch_size", 4, "--output_dir", tmp_path / "out", *FAST)
    printed = capsys.readouterr().out
    assert "ift/sft" in printed and "FLOP bound 1.50" in printed and "M trained" in printed


# -----------------------------------------------------------------------------
# bad input: one line, no traceback, nothing of the user's touched

@pytest.fixture(scope="session")
def bad_folders(tmp_path_factory, folders):
    """Folders that are not a usable causal LM, by name."""
    root, gpt2 = tmp_path_factory.mktemp("bad"), folders["gpt2"]
    found = {"empty": root / "empty", "no_tokenizer": root / "no_tokenizer",
             "broken": root / "broken", "bert": root / "bert"}
    found["empty"].mkdir()
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=64,
                                                   vocab_size=50)).save_pretrained(found["bert"])
    make_tokenizer(found["bert"])
    found["no_tokenizer"].mkdir()
    for name in ("config.json", "model.safetensors"):
        (found["no_tokenizer"] / name).write_bytes((gpt2 / name).read_bytes())
    found["broken"].mkdir()
    for f in gpt2.iterdir():
        (found["broken"] / f.name).write_bytes(f.read_bytes())
    weights = (found["broken"] / "model.safetensors").read_bytes()
    (found["broken"] / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    return found


@pytest.mark.parametrize("case, message", [
    ("hub_id", "no such local folder, and the hub did not give it"),
    ("empty", "no config.json"),
    ("bert", "a bert model (BertModel), not a causal LM"),
    ("no_tokenizer", "no tokenizer files; save the tokenizer there too"),
    ("broken", "cannot load it ("),
    ("out_is_model", "holds or lies inside --model"),
    ("out_not_ours", "exists and was not written by ift_hf.py"),
    ("lam", "--lam must lie in [0, 1], got 1.5"),
    ("nan_lr", "--learning_rate must be a finite number > 0, got nan"),
    ("packing", "--packing (packing=True) merges sequences: not with IFT"),
    ("loss_type", "--loss_type dft is another loss: not with IFT"),
    ("no_model", "--model is required"),
    ("unknown_flag", "not used by the HfArgumentParser: ['--bogus', '1'] (see --help)"),
    ("bad_format", 'train.jsonl line 2: no accepted row format; a row is {"prompt", "completion"}'),
    ("bad_bytes", "train.jsonl line 2: byte 0xff at column 13 is not UTF-8"),
])
def test_bad_input_is_one_line_and_touches_nothing(case, message, folders, bad_folders,
                                                   data_dir, tmp_path):
    """Each bad input: the one line "error: ...", no network; the model and files stay."""
    model, data, out, extra = folders["gpt2"], data_dir, tmp_path / "out", []
    if case == "hub_id":
        model = "someone/some-model"
    elif case in bad_folders:
        model = bad_folders[case]
    elif case == "out_is_model":
        out = folders["gpt2"]
    elif case == "out_not_ours":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "lam":
        extra = ["--lam", 1.5]
    elif case == "nan_lr":
        extra = ["--learning_rate", "nan"]
    elif case == "packing":
        extra = ["--packing"]
    elif case == "loss_type":
        extra = ["--loss_type", "dft"]
    elif case == "unknown_flag":
        extra = ["--bogus", 1]
    elif case in ("bad_format", "bad_bytes"):
        data = write_data(tmp_path / "bad")
        good = json.dumps(swap_rows()[0]).encode()
        bad = b'{"question": "swap a b", "answer": "b a"}' if case == "bad_format" else \
            b'{"task": "sw\xffp"}'
        (data / "train.jsonl").write_bytes(good + b"\n" + bad + b"\n")
    before = {p: p.read_bytes() for p in folders["gpt2"].iterdir()}
    args = [] if case == "no_model" else ["--model", model]
    error = main(*args, "--data", data, "--output_dir", out, "--max_steps", 1, *FAST, *extra)
    assert isinstance(error, str) and error.startswith("error: ") and message in error, error
    assert "\n" not in error
    assert {p: p.read_bytes() for p in folders["gpt2"].iterdir()} == before
    if case == "out_not_ours":
        assert (out / "notes.txt").read_text() == "mine"


def test_a_hub_id_offline_is_one_line_on_stderr(data_dir, tmp_path):
    """Through the real command line: a hub id with HF_HUB_OFFLINE=1 prints one line, which says
    how to make a local folder, and no traceback."""
    r = run_cli("--model", "someone/some-model", "--data", str(data_dir), "--output_dir",
                str(tmp_path / "out"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "--local-dir DIR`, then pass --model DIR" in r.stderr


def test_the_lesson_and_its_companions_import_no_hugging_face_package():
    """ift.py and every program beside it but the bridge run on torch, numpy, tiktoken and
    matplotlib alone: importing them loads none of the bridge's packages."""
    code = ("import sys, ift, compare, report, bench, frozen_lake, frozen_lake_sweep, figures; "
            "print(sorted(m for m in ('transformers', 'accelerate', 'tokenizers', "
            "'huggingface_hub', 'safetensors', 'trl', 'peft', 'datasets') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
