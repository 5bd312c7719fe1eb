"""Tests of ift_hf.py, the bridge to Hugging Face causal LMs: the lesson's GPT transplanted into
GPT2LMHeadModel gives the same logits and the same IFT loss and gradients; an untied Llama with
rotary positions reduces to SFT; --frozen-embeddings freezes what the official trainer freezes;
end-to-end runs through the real command line (one of them under torchrun); bad inputs.
Every model and tokenizer is built here from a config, in tmp_path, and loaded through the real
from_pretrained code: nothing is downloaded.

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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

import ift  # noqa: E402
import ift_hf  # noqa: E402

HERE = Path(__file__).resolve().parent
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
WORDS = ["cat", "dog", "sun", "red", "sky", "fox", "owl", "bee", "elk", "yak", "ant", "emu"]


def swap_rows():
    """A task family of the user's own: a pair of words, swapped. Every ordered pair of 12 words
    once, in a fixed shuffled order: 132 rows."""
    pairs = [(a, b) for a in WORDS for b in WORDS if a != b]
    pairs = [pairs[(37 * i) % len(pairs)] for i in range(len(pairs))]  # 37 is prime to 132
    return [{"task": "swap", "prompt": f"swap {a} {b}:", "chosen": f" {b} {a}",
             "rejected": f" {a} {b}"} for a, b in pairs]


def write_data(folder):
    """train.jsonl (120 rows) and test.jsonl (12 rows, pairs that train never shows)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = swap_rows()
    for name, part in (("train", rows[:120]), ("test", rows[120:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


def make_tokenizer(folder):
    """A byte-level BPE trained here on the swap rows, saved by save_pretrained."""
    texts = [r["prompt"] + r["chosen"] for r in swap_rows()]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>",
                                               pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(folder)
    return tok


def make_model(folder, kind, seed=0, layers=1, width=32, context=64):
    """A tiny GPT-2 (tied embeddings, learned positions) or Llama (untied, rotary) with its
    tokenizer, saved in folder by save_pretrained (RESULTS.md's benchmark makes wider ones)."""
    tok = make_tokenizer(folder)
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(tok), n_layer=layers, n_head=2,
                                         n_embd=width, n_positions=context, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0,
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
    model.save_pretrained(folder)
    return folder


def run_cli(*args, env=None, torchrun=False):
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
              "--standalone"] if torchrun else [sys.executable]
    return subprocess.run([*launch, str(HERE / "ift_hf.py"), *args], capture_output=True,
                          text=True, env=env or ONE_THREAD, timeout=600, cwd=HERE)


# -----------------------------------------------------------------------------
# the transplant: the lesson's GPT inside transformers.GPT2LMHeadModel

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
    """A lesson GPT (trained a few steps, so its predictions are not all alike), its transplant
    loaded back through save_pretrained / from_pretrained, and a batch of the lesson's data."""
    enc = ift.load_tokenizer(HERE / "data")
    split = ift.Split(ift.load_rows(HERE / "data" / "val.jsonl", limit=12), enc, 128, "val")
    torch.manual_seed(0)
    gpt = ift.GPT(enc.n_vocab, 128, n_layer=2, n_head=2, n_embd=32)
    batch = ift.make_batch(split.chosen, "cpu")                             # x, y, mask, real
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    for _ in range(20):
        loss, _ = ift.ift_loss(gpt, *batch[:3], real=batch[3])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return gpt, batch


def test_transplant_gives_the_lesson_gpts_logits(lesson, tmp_path):
    """The lesson GPT and its GPT-2 transplant, saved and reloaded, agree on every logit."""
    gpt, (x, _, _, real) = lesson
    transplant(gpt).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    want = gpt(x, real=real)                                                # (M, V)
    got = hf(input_ids=x, attention_mask=real.long()).logits[real]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("lam, gamma, detach", [(0.2, 0.95, False), (0.5, 0.9, True),
                                                (1.0, 0.0, False), (0.0, 0.95, False)])
def test_bridge_ift_loss_equals_the_lessons_in_value_and_gradient(lesson, lam, gamma, detach):
    """ift_hf.ift_loss on the transplant = ift.ift_loss on the lesson GPT: loss and gradients."""
    gpt, (x, y, mask, real) = lesson
    hf = transplant(gpt).train()
    gpt.zero_grad()
    want, want_metrics = ift.ift_loss(gpt, x, y, mask, lam, gamma, detach, real)
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
# an untied Llama: the reduction to SFT, and the frozen embeddings

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


def test_llama_with_lam0_gamma0_is_sft_computed_independently(llama_dir, data_dir):
    """lam = 0, gamma = 0 on an untied Llama: the loss and gradients of plain cross-entropy on
    the answer tokens (the prompt masked with -100), mean per row, then over rows."""
    model, tok = ift_hf.load_model(llama_dir)
    split = ift_hf.HFSplit(ift.load_rows(data_dir / "train.jsonl", limit=6), tok, 64, "train")
    x, y, mask, real = ift.make_batch(split.chosen, "cpu")
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


def test_rows_go_through_the_chat_template_when_the_tokenizer_has_one(gpt2_dir):
    """HFSplit: the prompt as the template's user turn, then the answer and the eos; the mask
    (make_batch) starts at the answer. Without a template: the prompt's own tokens."""
    _, tok = ift_hf.load_model(gpt2_dir)
    row = {"task": "t", "prompt": "swap cat dog:", "chosen": " dog cat"}
    plain = ift_hf.HFSplit([row], tok, 64, "plain").chosen[0]
    assert plain == (tok(row["prompt"])["input_ids"] + tok(row["chosen"])["input_ids"]
                     + [tok.eos_token_id], len(tok(row["prompt"])["input_ids"]))
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    ids, prompt_len = ift_hf.HFSplit([row], tok, 64, "chat").chosen[0]
    assert ids[:prompt_len] == tok("<user>swap cat dog:<assistant>")["input_ids"]
    assert tok.decode(ids[prompt_len:], skip_special_tokens=True) == " dog cat"
    _, y, mask, _ = ift.make_batch([(ids, prompt_len)], "cpu")
    assert y[mask].tolist() == ids[prompt_len:]


def embeddings(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    return model.get_input_embeddings().weight.detach().clone()


@pytest.mark.parametrize("kind, frozen, changes", [("llama", False, True), ("llama", True, False),
                                                   ("gpt2", True, True)])
def test_frozen_embeddings_freeze_what_the_official_trainer_freezes(
        kind, frozen, changes, llama_dir, gpt2_dir, data_dir, tmp_path):
    """After training: the default trains the input embeddings; --frozen-embeddings keeps an
    untied model's unchanged; a tied model's (GPT-2) still learn through the output layer."""
    folder = llama_dir if kind == "llama" else gpt2_dir
    r = run_cli("--model", str(folder), "--data", str(data_dir), "--out-dir", str(tmp_path / "o"),
                "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--device", "cpu",
                *(["--frozen-embeddings"] if frozen else []))
    assert r.returncode == 0, r.stderr
    before, after = embeddings(folder), embeddings(tmp_path / "o")
    assert (before != after).any() == changes


# -----------------------------------------------------------------------------
# the command line, end to end

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cli_fine_tunes_tests_and_writes_a_loadable_folder(kind, llama_dir, gpt2_dir, data_dir,
                                                           tmp_path):
    """A tiny model learns the user's task family: the answer NLL falls, the folder loads."""
    folder, out = (llama_dir if kind == "llama" else gpt2_dir), tmp_path / "out"
    args = ["--model", str(folder), "--data", str(data_dir), "--batch-size", "8", "--lr", "3e-3",
            "--warmup-steps", "5", "--log-interval", "20", "--device", "cpu"]
    r = run_cli(*args, "--max-steps", "120", "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    assert "step    20 | loss" in r.stdout and "| nll_loss" in r.stdout
    assert "| lam 0.2000" in r.stdout
    assert "overall" in r.stdout and "swap" in r.stdout
    res = json.loads((out / "eval.json").read_text())
    assert res["rows"] == 12 and 0 <= res["preference_accuracy"] <= 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(reloaded).__name__ == ("GPT2LMHeadModel" if kind == "gpt2" else "LlamaForCausalLM")
    transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert json.loads((out / "ift_hf.json").read_text())["loss"] == "ift"
    assert (out / "log.csv").read_text().splitlines()[0].startswith("step,loss,nll_loss,lam")
    untrained = run_cli(*args, "--max-steps", "1", "--out-dir", str(tmp_path / "one"))
    assert untrained.returncode == 0, untrained.stderr
    nll = json.loads((tmp_path / "one" / "eval.json").read_text())["nll"]
    assert res["nll"] < 0.5 * nll
    again = run_cli(*args, "--loss", "sft", "--max-steps", "2", "--out-dir", str(out))
    assert again.returncode == 0, again.stderr  # an earlier output of ift_hf.py is replaced
    assert json.loads((out / "ift_hf.json").read_text())["loss"] == "sft"


def test_torchrun_two_processes_match_one_process(gpt2_dir, data_dir, tmp_path):
    """torchrun with 2 CPU processes (the Trainer's DDP, gloo) ends with one process's weights."""
    args = ["--model", str(gpt2_dir), "--data", str(data_dir), "--batch-size", "4", "--lr",
            "1e-3", "--max-steps", "4", "--device", "cpu"]
    ddp = run_cli(*args, "--out-dir", str(tmp_path / "ddp"), torchrun=True)
    assert ddp.returncode == 0, ddp.stderr
    assert "2 processes" in ddp.stdout and ddp.stdout.count("test split") == 1
    one = run_cli(*args, "--out-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    weights = [transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d).state_dict()
               for d in ("ddp", "one")]
    for name, w in weights[1].items():
        torch.testing.assert_close(weights[0][name], w, rtol=0, atol=1e-5, msg=name)


def test_bench_prints_the_ift_over_sft_ratio(gpt2_dir, data_dir):
    """--bench times IFT's and SFT's steps on the first batch and prints their ratio."""
    r = run_cli("--model", str(gpt2_dir), "--data", str(data_dir), "--bench", "2",
                "--batch-size", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "ift/sft" in r.stdout and "FLOP bound 1.33" in r.stdout


def bad_model_folders(root, gpt2_dir):
    """Folders that are not a usable causal LM, by name."""
    folders = {"empty": root / "empty"}
    folders["empty"].mkdir()
    bert = root / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=64,
                                                   vocab_size=50)).save_pretrained(bert)
    make_tokenizer(bert)
    folders["bert"] = bert
    no_tok = root / "no_tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((gpt2_dir / name).read_bytes())
    folders["no_tokenizer"] = no_tok
    broken = root / "broken"
    broken.mkdir()
    for f in gpt2_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    folders["broken"] = broken
    return folders


@pytest.mark.parametrize("case, message", [
    ("missing", "not a local folder; pass a folder written by save_pretrained"),
    ("empty", "no config.json"),
    ("bert", "a bert model (BertModel), not a causal LM"),
    ("no_tokenizer", "no tokenizer files; save the tokenizer there too"),
    ("broken", "cannot load it (SafetensorError"),
    ("out_is_model", "holds or lies inside --model"),
    ("out_not_ours", "exists and was not written by ift_hf.py"),
    ("nan_lr", "argument --lr: must be a finite number, got nan"),
    ("big_batch", "train.jsonl: 120 rows, fewer than --batch-size 512; lower it"),
    ("no_model", "--model is required"),
    ("bad_bytes", "train.jsonl line 2: byte 0xff at column 13 is not UTF-8"),
])
def test_bad_input_is_one_line_and_touches_nothing(case, message, gpt2_dir, data_dir, tmp_path):
    """Each bad input: one line, non-zero exit, no traceback, no network; the files stay."""
    folders = bad_model_folders(tmp_path, gpt2_dir)
    model, data, out = gpt2_dir, data_dir, tmp_path / "out"
    extra = []
    if case == "missing":
        model = tmp_path / "nowhere" / "model"
    elif case in folders:
        model = folders[case]
    elif case == "out_is_model":
        out = gpt2_dir
    elif case == "out_not_ours":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "nan_lr":
        extra = ["--lr", "nan"]
    elif case == "big_batch":
        extra = ["--batch-size", "512"]
    elif case == "bad_bytes":
        data = write_data(tmp_path / "bad")
        good = json.dumps(swap_rows()[0]).encode()
        (data / "train.jsonl").write_bytes(good + b'\n{"task": "sw\xffp"}\n')
    before = {p: p.read_bytes() for p in gpt2_dir.iterdir()}
    args = [] if case == "no_model" else ["--model", str(model)]
    r = run_cli(*args, "--data", str(data), "--out-dir", str(out), "--max-steps", "1",
                "--device", "cpu", *extra)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert {p: p.read_bytes() for p in gpt2_dir.iterdir()} == before
    if case == "out_not_ours":
        assert (out / "notes.txt").read_text() == "mine"


def test_the_lesson_and_its_companions_import_no_hugging_face_package():
    """ift.py, compare.py, bench.py, frozen_lake.py and figures.py run on torch, numpy,
    tiktoken and matplotlib alone: importing them loads none of the bridge's packages."""
    code = ("import sys, ift, compare, bench, frozen_lake, figures; print(sorted(m for m in "
            "('transformers', 'accelerate', 'tokenizers', 'huggingface_hub', 'safetensors') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
