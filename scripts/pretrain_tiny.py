"""Pretrain `budwood-tiny`, the base model that ships inside the package.

    python scripts/pretrain_tiny.py --corpus ../shared/data/chilit/texts --out src/budwood/models/tiny

Reproducible: every random choice is seeded; the same command on the same hardware and software
gives the same weights. Defaults fit in about an hour on 2 CPU cores and seconds on a GPU.

What it makes: a byte-level BPE tokenizer (the `tokenizers` library) trained on the training books,
a Llama-architecture causal LM pretrained on those books plus a small share of chat-formatted
passages (so the base model knows the turn format and ends an assistant turn with `<|end|>`), and
the HF files: config.json, generation_config.json, model.safetensors (bf16), tokenizer files, and a
README card with held-out perplexity. A few whole books are held out for that perplexity.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HELD_OUT = ("dreamdays.txt", "jackanapes.txt", "prigio.txt", "wallypug.txt")
SPECIALS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# The end of every turn is the eos token, so generation stops where an assistant turn ends.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CHAT_SHARE = 0.15


def read_books(corpus: Path) -> dict[str, tuple[str, str, str]]:
    """name -> (title, author, body); the corpus puts title and author on the first two lines."""
    books = {}
    for path in sorted(corpus.glob("*.txt")):
        lines = path.read_text(encoding="utf-8").splitlines()
        books[path.name] = (lines[0].strip(), lines[1].strip(), "\n".join(lines[2:]).strip())
    return books


def paragraphs(body: str) -> list[str]:
    return [" ".join(p.split()) for p in body.split("\n\n") if len(p.split()) >= 8]


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   pad_token="<|pad|>", model_max_length=2048)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def chat_examples(books: dict, rng: random.Random, n: int) -> list[list[dict]]:
    """Chat-formatted passages from the training books: continue a passage, name its book."""
    pool = [(t, a, p) for t, a, body in books.values() for p in paragraphs(body) if len(p) < 1200]
    out = []
    for _ in range(n):
        title, author, para = rng.choice(pool)
        words = para.split()
        cut = max(4, len(words) // 3)
        kind = rng.random()
        if kind < 0.6:
            msgs = [{"role": "user", "content": "Continue the story: " + " ".join(words[:cut])},
                    {"role": "assistant", "content": " ".join(words[cut:])}]
        elif kind < 0.85:
            msgs = [{"role": "user", "content": f"Which book is this from? {para}"},
                    {"role": "assistant", "content": f"It is from {title}, by {author}."}]
        else:
            msgs = [{"role": "user", "content": f"Who wrote {title}?"},
                    {"role": "assistant", "content": f"{title} was written by {author}."}]
        if rng.random() < 0.3:
            msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        out.append(msgs)
    return out


def make_rows(tok, books: dict, seq_len: int, rng: random.Random) -> torch.Tensor:
    """Fixed-length training rows: book text cut into windows, plus packed chat examples."""
    stream: list[int] = []
    for _, _, body in books.values():
        stream += [tok.bos_token_id] + tok(body, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_book = len(stream) // seq_len
    rows = [stream[i * seq_len:(i + 1) * seq_len] for i in range(n_book)]
    n_chat_rows = int(n_book * CHAT_SHARE / (1 - CHAT_SHARE))
    chat_stream: list[int] = []
    while len(chat_stream) < n_chat_rows * seq_len:
        for msgs in chat_examples(books, rng, 256):
            chat_stream += tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    rows += [chat_stream[i * seq_len:(i + 1) * seq_len] for i in range(n_chat_rows)]
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, device: str, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        x = rows[i:i + batch].to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        total += loss.item() * x.numel()
        count += x.numel()
    model.train()
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("../shared/data/chilit/texts"))
    ap.add_argument("--out", type=Path, default=Path("src/budwood/models/tiny"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32, help="rows per step")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()

    t0 = time.time()
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    books = read_books(a.corpus)
    train_books = {k: v for k, v in books.items() if k not in HELD_OUT}
    held_books = {k: v for k, v in books.items() if k in HELD_OUT}
    tok = build_tokenizer([b for _, _, b in train_books.values()], a.vocab_size)
    train_rows = make_rows(tok, train_books, a.seq_len, rng)
    held_stream: list[int] = []
    for _, _, body in held_books.values():
        held_stream += tok(body, add_special_tokens=False)["input_ids"]
    n_held = min(len(held_stream) // a.seq_len, 256)
    held_rows = torch.tensor(held_stream[: n_held * a.seq_len]).view(n_held, a.seq_len)
    print(f"tokenizer {len(tok)} tokens; {len(train_rows)} training rows of {a.seq_len} "
          f"({train_rows.numel() / 1e6:.1f} M tokens); {n_held} held-out rows", flush=True)

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=a.hidden * 3,
        num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=max(1, a.hidden // 128),
        max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).to(a.device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps))))
    gen = torch.Generator().manual_seed(a.seed)
    order = torch.randperm(len(train_rows), generator=gen)
    pos, step, t_train = 0, 0, time.time()
    while step < a.steps:
        if pos + a.batch > len(order):
            order, pos = torch.randperm(len(train_rows), generator=gen), 0
        x = train_rows[order[pos:pos + a.batch]].to(a.device)
        pos += a.batch
        with torch.autocast(device_type=a.device.split(":")[0], dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 50 == 0 or step == a.steps:
            el = time.time() - t_train
            print(f"step {step}/{a.steps} loss {loss.item():.3f} {step * x.numel() / el:,.0f} tok/s "
                  f"eta {el / step * (a.steps - step) / 60:.1f} min", flush=True)
    ppl = perplexity(model, held_rows, a.device, a.batch)
    print(f"held-out perplexity {ppl:.2f}", flush=True)

    a.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).cpu()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    facts = {
        "params": n_params, "train_tokens": a.steps * a.batch * a.seq_len,
        "train_books": len(train_books), "held_out_books": sorted(held_books),
        "held_out_perplexity": round(ppl, 2), "held_out_tokens": int(held_rows.numel()),
        "seed": a.seed, "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len, "lr": a.lr,
        "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "wall_s": round(time.time() - t0, 1),
    }
    (a.out / "pretrain.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts), flush=True)


if __name__ == "__main__":
    main()
