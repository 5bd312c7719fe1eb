"""Make the toy preference data and the tokenizer that ift.py trains on.

What it writes (byte-identical on every run with the same flags):
    data/train.jsonl        10000 rows (2500 per family)
    data/val.jsonl            400 rows  (100 per family)
    data/pretrain.jsonl     20000 rows (5000 per family): the pool compare.py's base models
                            (stage 0) are trained on
    data/test.jsonl          2000 rows  (500 per family), drawn LAST, against every prompt drawn
                            before it, so that no test prompt is in train, val, the pool or a
                            retired test split (below)
    data/tokenizer.tiktoken   a byte-level BPE learned on the train split, in tiktoken's format

Retired test rows. compare.py's confirmatory protocol needs a test split that no earlier result
has seen. The test rows of the earlier versions of this script (200 per family drawn with train
and val, 300 more after the pool) are still drawn, in the same places of the random stream, so
that train, val and the pool stay byte-identical; they are written nowhere, and the fresh test
split is drawn after them against their prompts too. RESULTS.md says which results came from
the retired split.

Command (from any working directory; standard library plus tiktoken for the final self-check):
    python data/prepare.py                      # defaults: --seed 1337 --merges 200
    python data/prepare.py --help               # sizes per family, seed, output folder
    python data/prepare.py --tokenizer-for DIR  # only a tokenizer, learned on DIR/train.jsonl

Schema: one JSON object per line, keys in this order,
    {"task": ..., "prompt": ..., "chosen": ..., "rejected": ...}
Plain text only; ift.py wraps a row as <|user|> prompt <|assistant|> answer <|endoftext|>.
"chosen" is the correct answer, "rejected" a plausible wrong one (never equal to "chosen").
SFT and IFT read only "chosen"; DPO and ORPO read both. No prompt appears twice, in any split:
unique prompts are drawn per family first and then cut into train / val / (retired test); the
pool, the retired extra test rows and then the test split are drawn after them, each against
every prompt so far. Each split is shuffled, so the four families are interleaved.

The four families (one example row each):
1. add (reasoning, short answer): two 3-digit operands; ~80% of problems have a carry.
   {"task": "add", "prompt": "What is 478 + 395?", "chosen": "873", "rejected": "863"}
   rejected: the sum with one carry dropped (a random carrying column), i.e. a + b - 10^(k+1);
   a problem without a carry gets one digit of its answer off by one.
2. reverse (generation): 4 to 7 lowercase letters to write backwards.
   {"task": "reverse", "prompt": "Reverse the letters: q w e r t", "chosen": "t r e w q",
    "rejected": "t r w e q"}
   rejected: the correct reversal with one adjacent pair of different letters swapped.
3. facts (fact-following): who won something, one line per person (3 or 4 distinct names and
   colours, e.g. their team colours), and only one line says "won"; the answer is that line.
   {"task": "facts", "prompt": "Who won the key?\nAnn red lost\nBob blue won\nCid green lost",
    "chosen": "Bob blue", "rejected": "Cid green"}
   rejected: the name and colour of a line that lost. The winner's line cycles through the
   positions (3 lines: 1st, 2nd, 3rd; 4 lines: 1st..4th), so "always answer the first (or last)
   line" scores exactly chance. Why this shape: the answer is found by one look-up that is the
   same in every row (find the token " won", copy the two words before it). An earlier form
   asked for a given name ("Ann has a red key. ... What colour is Bob's key?" -> "blue"), which
   needs the asked name matched against every fact first; no recipe of compare.py learned it
   (RESULTS.md, section 8).
4. add_steps (long answer, reasoning written out): two 4-digit operands, added column by column
   from the right; a column says "carry 1" only when it carries, the next column adds "+1".
   {"task": "add_steps", "prompt": "Add 4821 + 3795 step by step.",
    "chosen": "1+5=6; 2+9=11 carry 1; 8+7+1=16 carry 1; 4+3+1=8; answer 8616",
    "rejected": "1+5=6; 2+9=11; 8+7=15 carry 1; 4+3+1=8; answer 8516"}
   Every problem has at least one carry, in the ones column for ~80% of them. rejected: the same
   working with the FIRST carry forgotten and every later column and the answer worked out
   consistently from there, so one early slip derails the rest of the chain (30-60 tokens).

Tokenizer: byte-level BPE, written out below. Text is pre-split with ift.PAT_STR (every digit is
its own chunk, so no token mixes digits and arithmetic stays learnable); ranks 0..255 are the
single bytes in byte order; then the most frequent adjacent pair inside a chunk (counted over
the train prompts and chosen answers) is merged into a new rank, ties going to the pair with the
lower ranks, until --merges new ranks exist or no pair occurs twice (the script prints how
many ranks it made). The file has one line "base64(token bytes) rank" per rank, ascending; the
special tokens ift.SPECIAL_TOKENS are not in it: ift.py gives them the ids n_ranks, n_ranks + 1,
...
The script ends with a self-check against tiktoken and prints the vocabulary size, rows and
token counts per family, and file sizes.
"""

import base64
import json
import math
import random
import re
import string
import sys
from collections import Counter
from pathlib import Path

import tiktoken

DATA_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA_DIR.parent))  # the repository root, where ift.py lives
from ift import PAT_STR, SPECIAL_TOKENS, load_rows  # noqa: E402
from plumbing import ArgumentParser, UserError  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Task families: each maker returns one row from the rng (and the row's index in its family)

NAMES = ("Ann", "Bob", "Cid", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon",
         "Kim", "Lea", "Max", "Ned", "Oli", "Pam", "Ray", "Sam", "Tom", "Uma")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown", "grey", "purple")
OBJECTS = ("key", "hat", "car", "cup", "bag", "pen", "kite", "ball")
FACT_SLOTS = [(n_facts, pos) for n_facts in (3, 4) for pos in range(n_facts)]  # asked fact cycles
P_CARRY = 0.8  # share of add problems with a carry, and of add_steps problems carrying at once
RETIRED_TEST = (200, 300)  # rows per family of the retired test split: with train and val, after
                           # the pool (see "Retired test rows" above)


def digits(x):
    """Decimal digits of x, least significant first: 478 -> [8, 7, 4]."""
    return [int(d) for d in reversed(str(x))]


def carry_columns(a, b):
    """Columns (0 = ones) that produce a carry when a + b is done by hand."""
    cols, carry = [], 0
    for k, (x, y) in enumerate(zip(digits(a), digits(b))):
        carry = (x + y + carry) // 10
        if carry:
            cols.append(k)
    return cols


def make_add(rng, index):
    """What is a + b? with 3-digit operands; rejected drops one carry (or slips one digit)."""
    want_carry = rng.random() < P_CARRY
    while True:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        cols = carry_columns(a, b)
        if bool(cols) == want_carry:
            break
    if cols:  # forgetting the carry out of column k loses exactly 10^(k+1)
        wrong = str(a + b - 10 ** (rng.choice(cols) + 1))
    else:  # no carry to forget: one digit off by one (the leading digit never becomes 0)
        answer = str(a + b)
        i = rng.randrange(len(answer))
        d = int(answer[i])
        options = [d + s for s in (-1, 1) if 0 <= d + s <= 9 and not (i == 0 and d + s == 0)]
        wrong = answer[:i] + str(rng.choice(options)) + answer[i + 1:]
    return {"task": "add", "prompt": f"What is {a} + {b}?", "chosen": str(a + b),
            "rejected": wrong}


def make_reverse(rng, index):
    """Reverse 4 to 7 letters; rejected swaps one adjacent pair of different letters."""
    while True:
        letters = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 7))]
        backwards = letters[::-1]
        pairs = [i for i in range(len(backwards) - 1) if backwards[i] != backwards[i + 1]]
        if pairs:
            break
    i = rng.choice(pairs)
    wrong = backwards[:i] + [backwards[i + 1], backwards[i]] + backwards[i + 2:]
    return {"task": "reverse", "prompt": "Reverse the letters: " + " ".join(letters),
            "chosen": " ".join(backwards), "rejected": " ".join(wrong)}


def make_facts(rng, index):
    """Who won what, one line per person; the winner's line cycles with the row index."""
    n_facts, pos = FACT_SLOTS[index % len(FACT_SLOTS)]
    names, colours = rng.sample(NAMES, n_facts), rng.sample(COLOURS, n_facts)
    obj = rng.choice(OBJECTS)
    lines = "".join(f"\n{name} {colour} {'won' if k == pos else 'lost'}"
                    for k, (name, colour) in enumerate(zip(names, colours)))
    distractor = rng.choice([k for k in range(n_facts) if k != pos])
    return {"task": "facts", "prompt": f"Who won the {obj}?{lines}",
            "chosen": f"{names[pos]} {colours[pos]}",
            "rejected": f"{names[distractor]} {colours[distractor]}"}


def add_working(a, b, forget_first_carry=False):
    """Column working of a + b from the right, e.g. '1+5=6; 2+9=11 carry 1; ...; answer 8616'.

    With forget_first_carry the first carry is never written down nor added to the next column;
    every later column (and the answer) is then worked out correctly from that wrong state.
    """
    steps, written, carry, forgot = [], [], 0, False
    for x, y in zip(digits(a), digits(b)):
        total = x + y + carry
        step = f"{x}+{y}+1={total}" if carry else f"{x}+{y}={total}"
        carry = total // 10
        if carry and forget_first_carry and not forgot:
            carry, forgot = 0, True
        steps.append(step + " carry 1" if carry else step)
        written.append(total % 10)
    if carry:
        written.append(1)
    answer = "".join(str(d) for d in reversed(written))
    return "; ".join(steps) + f"; answer {answer}"


def make_add_steps(rng, index):
    """Add two 4-digit numbers step by step; rejected forgets the first carry."""
    want_ones_carry = rng.random() < P_CARRY
    while True:
        a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
        cols = carry_columns(a, b)
        if cols and (cols[0] == 0) == want_ones_carry:
            break
    return {"task": "add_steps", "prompt": f"Add {a} + {b} step by step.",
            "chosen": add_working(a, b), "rejected": add_working(a, b, forget_first_carry=True)}


FAMILIES = {"add": make_add, "reverse": make_reverse, "facts": make_facts,
            "add_steps": make_add_steps}

# ---------------------------------------------------------------------------------------------
# Splits: unique prompts per family, cut into train / val / test, each split shuffled


def unique_rows(rng, make, n, seen):
    """n rows of one family whose prompts are not in seen; adds their prompts to seen."""
    rows, tries = [], 0
    while len(rows) < n:
        tries += 1
        if tries > 100 * n + 1000:  # the family has fewer distinct prompts left than asked for
            raise UserError(f"cannot draw {n} rows with distinct prompts; ask for fewer")
        row = make(rng, len(rows))
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def make_splits(rng, sizes):
    """Return {split: rows}; sizes = {split: rows per family}; no prompt is in two splits."""
    splits = {name: [] for name in sizes}
    seen = set()  # prompts drawn so far, across all families (used for membership only)
    for make in FAMILIES.values():
        rows = unique_rows(rng, make, sum(sizes.values()), seen)
        start = 0
        for name, n in sizes.items():
            splits[name].extend(rows[start:start + n])
            start += n
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def make_pool(rng, n, splits):
    """n more rows per family whose prompts are in none of the splits, shuffled."""
    seen = {row["prompt"] for rows in splits.values() for row in rows}
    pool = [row for make in FAMILIES.values() for row in unique_rows(rng, make, n, seen)]
    rng.shuffle(pool)
    return pool


def write_jsonl(path, rows):
    """One JSON object per line, ASCII only, '\\n' line ends on every platform."""
    with open(path, "w", encoding="ascii", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")

# ---------------------------------------------------------------------------------------------
# Byte-level BPE: learn ranks on the train split, encode a chunk, write tiktoken's rank file


def merge_pair(parts, pair):
    """Replace every non-overlapping occurrence of pair in parts (left to right) by its join."""
    out, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
            out.append(parts[i] + parts[i + 1])
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


def train_bpe(texts, n_merges):
    """Return {token bytes: rank}: the 256 single bytes, then up to n_merges learned merges."""
    chunk_counts = Counter(chunk for text in texts for chunk in re.findall(PAT_STR, text))
    words = [[bytes([b]) for b in chunk.encode("utf-8")] for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < 256 + n_merges:
        pair_counts = Counter()
        for parts, freq in zip(words, freqs):
            for pair in zip(parts, parts[1:]):
                pair_counts[pair] += freq
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda p: (-pair_counts[p], ranks[p[0]], ranks[p[1]]))
        if pair_counts[best] < 2:
            break
        ranks.setdefault(best[0] + best[1], len(ranks))  # same bytes never get a second rank
        words = [merge_pair(parts, best) for parts in words]
    return ranks


def bpe_encode_chunk(chunk, ranks):
    """Token ids of one pre-split chunk, merged as tiktoken does: lowest-rank pair first."""
    parts = [bytes([b]) for b in chunk.encode("utf-8")]
    while len(parts) > 1:
        rank, i = min((ranks.get(a + b, math.inf), i) for i, (a, b) in
                      enumerate(zip(parts, parts[1:])))
        if rank == math.inf:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


def write_ranks(path, ranks):
    """tiktoken's rank file: one 'base64(token bytes) rank' line per token, ranks ascending."""
    with open(path, "w", encoding="ascii", newline="\n") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")


def read_ranks(path):
    """Parse a rank file written by write_ranks back into {token bytes: rank}."""
    ranks = {}
    for line in Path(path).read_text(encoding="ascii").splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks

# ---------------------------------------------------------------------------------------------
# Self-check against tiktoken and statistics


def stats(values):
    """'min/mean/max' of a list of numbers."""
    return f"{min(values)}/{sum(values) / len(values):.1f}/{max(values)}"


def self_check(out_dir, splits, train_chunks):
    """Rebuild the tokenizer from the written file with tiktoken; fail loudly on any mismatch."""
    ranks = read_ranks(out_dir / "tokenizer.tiktoken")
    n_ranks = len(ranks)
    assert sorted(ranks.values()) == list(range(n_ranks)), "ranks must be 0..n-1"
    assert len(set(ranks)) == n_ranks, "two ranks share the same bytes"
    for token in ranks:
        assert len(token) == 1 or not re.search(rb"\d", token), f"digit inside {token!r}"
    specials = {tok: n_ranks + i for i, tok in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="ift-toy", pat_str=PAT_STR, mergeable_ranks=ranks,
                            special_tokens=specials)
    for chunk in train_chunks:
        assert bpe_encode_chunk(chunk, ranks) == enc.encode_ordinary(chunk), chunk
    user, assistant, eot = (specials[t] for t in ("<|user|>", "<|assistant|>", "<|endoftext|>"))
    lengths = {}  # (family, field) -> token counts over all splits
    for rows in splits.values():
        for row in rows:
            ids = {}
            for field in ("prompt", "chosen", "rejected"):
                text = row[field]
                assert not any(tok in text for tok in SPECIAL_TOKENS), row
                ids[field] = enc.encode_ordinary(text)
                assert enc.decode(ids[field]) == text, (field, row)
                lengths.setdefault((row["task"], field), []).append(len(ids[field]))
            assert row["chosen"] != row["rejected"], row
            wrapped = f"<|user|>{row['prompt']}<|assistant|>{row['chosen']}<|endoftext|>"
            expected = [user] + ids["prompt"] + [assistant] + ids["chosen"] + [eot]
            assert enc.encode(wrapped, allowed_special="all") == expected, row
    for field in ("chosen", "rejected"):
        counts = lengths[("add_steps", field)]
        assert 30 <= min(counts) and max(counts) <= 60, f"add_steps {field}: {stats(counts)}"
    prompts = [set(row["prompt"] for row in rows) for rows in splits.values()]
    assert sum(len(p) for p in prompts) == len(set().union(*prompts)), "prompt in two splits"
    return enc, lengths


def print_report(out_dir, splits, enc, lengths):
    """Vocabulary, rows per split and family, tokens per prompt and answer, file sizes."""
    print(f"vocab: {enc.n_vocab} ids = {enc.n_vocab - len(SPECIAL_TOKENS)} ranks "
          f"(256 bytes + {enc.n_vocab - len(SPECIAL_TOKENS) - 256} merges) "
          f"+ {len(SPECIAL_TOKENS)} special tokens")
    for name, rows in splits.items():
        per_family = Counter(row["task"] for row in rows)
        print(f"{name:5s}: {len(rows):5d} rows | "
              + " ".join(f"{task} {per_family[task]}" for task in FAMILIES))
    print("tokens min/mean/max over all splits:")
    for task in FAMILIES:
        print(f"  {task:9s} | prompt {stats(lengths[(task, 'prompt')]):>12s} | "
              f"chosen {stats(lengths[(task, 'chosen')]):>12s} | "
              f"rejected {stats(lengths[(task, 'rejected')]):>12s}")
    total = 0
    for name in [*splits, "tokenizer"]:
        path = out_dir / (f"{name}.jsonl" if name in splits else "tokenizer.tiktoken")
        total += path.stat().st_size
        print(f"  {path}: {path.stat().st_size / 1e3:.1f} kB")
    print(f"  total: {total / 1e6:.2f} MB")

# ---------------------------------------------------------------------------------------------
# main


def tokenizer_for(folder, n_merges):
    """--tokenizer-for: learn the BPE on a user's train.jsonl and write its tokenizer.tiktoken."""
    folder = Path(folder)
    path = folder / "tokenizer.tiktoken"
    if path.exists():  # a checkpoint trained with it would no longer decode: never overwrite
        raise UserError(f"{path} already exists; delete it first to train a new one (models "
                        f"trained with it need it)")
    rows = load_rows(folder / "train.jsonl")
    texts = [row[field] for row in rows for field in ("prompt", "chosen")]
    ranks = train_bpe(texts, n_merges)
    write_ranks(str(path) + ".tmp", ranks)
    enc = tiktoken.Encoding(name="ift-bpe", pat_str=PAT_STR, mergeable_ranks=read_ranks(
        str(path) + ".tmp"), special_tokens={})
    for text in texts:  # a byte-level BPE decodes back to exactly the text it encoded
        assert enc.decode(enc.encode_ordinary(text)) == text, text
    Path(str(path) + ".tmp").replace(path)
    tokens = sum(len(enc.encode_ordinary(text)) for text in texts)
    print(f"wrote {path}: {len(ranks)} ranks (256 bytes + {len(ranks) - 256} merges) from "
          f"{len(rows)} rows of {folder / 'train.jsonl'}; {tokens / len(rows):.1f} tokens per "
          f"row (prompt + chosen), {sum(len(t) for t in texts) / tokens:.2f} characters a token")


def main():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1337, help="seed of the one random.Random")
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR, help="where the files go")
    parser.add_argument("--train", type=int, default=2500, help="train rows per family")
    parser.add_argument("--val", type=int, default=100, help="validation rows per family")
    parser.add_argument("--pretrain", type=int, default=5000, help="rows per family of the "
                        "pretraining pool (compare.py's base models)")
    parser.add_argument("--test", type=int, default=500, help="test rows per family, drawn last "
                        "(so changing it leaves every other file unchanged)")
    parser.add_argument("--merges", type=int, default=200, help="BPE merges on top of 256 bytes")
    parser.add_argument("--tokenizer-for", metavar="DIR", help="instead of making the toy data, "
                        "learn the BPE on DIR/train.jsonl (your own rows) and write "
                        "DIR/tokenizer.tiktoken, which ift.py --data DIR then uses")
    args = parser.parse_args()
    sizes = {"--train": args.train, "--val": args.val, "--pretrain": args.pretrain,
             "--test": args.test}
    bad = next((f"{flag} must lie in [1, 20000], got {n}" for flag, n in sizes.items()
                if not 1 <= n <= 20000), None)
    if bad or not 0 <= args.merges <= 5000:
        parser.error(bad or f"--merges must lie in [0, 5000], got {args.merges}")
    try:
        if args.tokenizer_for:
            tokenizer_for(args.tokenizer_for, args.merges)
        else:
            make_data(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {e.filename}: cannot write there ({e.strerror}); pass another --out-dir")


def make_data(args):
    """The toy data, its tokenizer and the self-check, into --out-dir."""
    rng = random.Random(args.seed)
    splits = make_splits(rng, {"train": args.train, "val": args.val, "retired": RETIRED_TEST[0]})
    splits["pretrain"] = make_pool(rng, args.pretrain, splits)
    splits["retired"] += make_pool(rng, RETIRED_TEST[1], splits)
    splits["test"] = make_pool(rng, args.test, splits)  # against every prompt above, retired too
    retired = splits.pop("retired")                     # drawn for the stream's sake, not written
    assert not {r["prompt"] for r in retired} & {r["prompt"] for r in splits["test"]}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(args.out_dir / f"{name}.jsonl", rows)

    train_texts = [row[field] for row in splits["train"] for field in ("prompt", "chosen")]
    ranks = train_bpe(train_texts, args.merges)
    write_ranks(args.out_dir / "tokenizer.tiktoken", ranks)

    train_chunks = sorted(set(c for text in train_texts for c in re.findall(PAT_STR, text)))
    enc, lengths = self_check(args.out_dir, splits, train_chunks)
    print_report(args.out_dir, splits, enc, lengths)


if __name__ == "__main__":
    main()
