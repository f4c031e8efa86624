"""DNI in a small GPT-style Transformer: character-level language modelling of Debian's fortunes.

A nanoGPT-style model (pre-LayerNorm blocks of causal self-attention and an MLP) with a `dni.DNI`
between consecutive blocks (the statements marked `# DNI`): each cuts the residual stream (B, T, D) and its
per-position synthesizer predicts the gradient at every position (Jaderberg et al. 2016,
section 2; `dni.SequenceSynthesizer`). The blocks below an interface learn from its synthetic
gradient only. The loss is the mean over B * T tokens, so the loss scale is B * T: the
synthesizers predict per-token gradients (dni/interface.py).

    python examples/char_gpt.py --method backprop     # or dni, cdni; --help for the rest

Under cDNI (section 2's conditional DNI) every position's synthesizer also reads the one-hot of
the character that position predicts: the context is (B, T, vocab), one label per position.

Corpus: the plain-text files of Debian's `fortunes` package (/usr/share/games/fortunes, without
its .dat and .u8 index files; apt-get install fortunes), about 2.6 million characters of English
quotations, jokes and verse. The '%' lines that end each fortune are kept as characters. Each
file is split contiguously into its first 90% (train), next 5% (validation) and last 5% (test),
so every topic is in every split. Validation bits per character are measured during training,
test once at the end, each over the whole split in consecutive windows of --block_size.
"""
import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
import dni  # noqa: E402
from dnilab.runs import environment  # noqa: E402

CORPUS = "/usr/share/games/fortunes"


def load_corpus(folder):
    """(train, val, test) text, each the concatenation of every file's 90% / 5% / 5% part."""
    names = sorted(f for f in os.listdir(folder) if not f.endswith((".dat", ".u8"))
                   and os.path.isfile(os.path.join(folder, f)))
    splits = ["", "", ""]
    for name in names:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            text = f.read()
        a, b = int(0.9 * len(text)), int(0.95 * len(text))
        for i, part in enumerate([text[:a], text[a:b], text[b:]]):
            splits[i] += part
    return splits


class Block(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x)); attention is causal."""

    def __init__(self, d_model, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, D // self.n_head).transpose(1, 3).unbind(2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, D / heads)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token and position embeddings, `n_layer` blocks, a final LayerNorm and a linear head (not
    tied to the embedding, which sits below every interface). `dni`: an interface between
    consecutive blocks; in eval mode they are the identity."""

    def __init__(self, *, vocab, block_size=128, n_layer=4, d_model=128, n_head=4, dni_between=False,
                 synth_width=512, conditioned=False):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab, bias=False)
        self.interfaces = nn.ModuleList(  # DNI: a per-position synthesizer for each (T, D) cut
            dni.DNI(shape=(block_size, d_model), width=synth_width, context_features=vocab if conditioned else 0,
                    loss_scale=lambda h: h.shape[0] * h.shape[1])
            for _ in range(n_layer - 1)) if dni_between else None
        self.vocab, self.conditioned = vocab, conditioned

    def forward(self, idx, targets=None):  # DNI (cDNI: the targets)
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))  # (B, T, D)
        context = F.one_hot(targets, self.vocab) if self.conditioned and targets is not None else None  # (B, T, V)
        for i, block in enumerate(self.blocks):
            if self.interfaces is not None and i > 0:
                x = self.interfaces[i - 1](x, context=context)  # DNI
            x = block(x)
        return self.head(self.ln(x))  # (B, T, vocab)


@torch.no_grad()
def bits_per_char(model, data, block_size, batch_size=64):
    """Mean cross-entropy in bits over consecutive windows covering the split (each position
    predicted once, from the window's earlier characters)."""
    model.eval()
    n = (len(data) - 1) // block_size * block_size
    x, y = data[:n].view(-1, block_size), data[1:n + 1].view(-1, block_size)  # (windows, T)
    total = sum(F.cross_entropy(model(x[i:i + batch_size]).flatten(0, 1), y[i:i + batch_size].flatten(),
                                reduction="sum").item() for i in range(0, len(x), batch_size))
    model.train()
    return total / n / math.log(2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="dni", choices=["backprop", "dni", "cdni"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--block_size", type=int, default=128, help="context length T")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--synth_width", type=int, default=512, help="hidden units of each per-position synthesizer")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW, cosine decay to 0 over the run")
    p.add_argument("--eval_every", type=int, default=200)
    p.add_argument("--eval_chars", type=int, default=0, help="measure on the first N characters of val and test (0: all)")
    p.add_argument("--corpus", default=CORPUS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="results/examples", help="folder for char_gpt_<method>.json")
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.block_size, args.n_layer, args.eval_every, args.synth_width) < 1 \
            or args.lr <= 0 or args.d_model % args.n_head or args.eval_chars < 0:
        p.error("sizes, steps and --lr must be positive, --d_model a multiple of --n_head")
    if not os.path.isdir(args.corpus):
        sys.exit(f"error: no corpus at {args.corpus}: apt-get install fortunes (or give --corpus DIR)")

    torch.manual_seed(args.seed)
    texts = load_corpus(args.corpus)
    chars = sorted(set("".join(texts)))  # the vocabulary: every character of the corpus
    index = {c: i for i, c in enumerate(chars)}
    train, val, test = (torch.tensor([index[c] for c in t], device=args.device) for t in texts)
    m = args.eval_chars or None
    val, test = val[:m], test[:m]
    model = GPT(vocab=len(chars), block_size=args.block_size, n_layer=args.n_layer, d_model=args.d_model,
                n_head=args.n_head, dni_between=args.method != "backprop", synth_width=args.synth_width,
                conditioned=args.method == "cdni").to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)  # holds the synthesizers too
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    generator = torch.Generator().manual_seed(args.seed)

    curve, losses, train_seconds, start = [], [], 0.0, time.perf_counter()
    for step in range(1, args.steps + 1):
        offsets = torch.randint(len(train) - args.block_size, (args.batch_size,), generator=generator)
        window = torch.arange(args.block_size + 1)
        chunk = train[(offsets[:, None] + window).to(args.device)]  # (B, T + 1)
        logits = model(chunk[:, :-1], chunk[:, 1:])  # DNI (cDNI: the targets)
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())  # mean over B * T tokens
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            train_seconds += time.perf_counter() - start
            val_bpc = bits_per_char(model, val, args.block_size)
            train_bpc = sum(losses) / len(losses) / math.log(2)
            curve.append({"step": step, "train_bpc": train_bpc, "val_bpc": val_bpc,
                          "train_seconds": round(train_seconds, 1)})
            print(f"step {step} train_bpc {train_bpc:.3f} val_bpc {val_bpc:.3f} {train_seconds:.0f}s", flush=True)
            losses, start = [], time.perf_counter()
    test_bpc = bits_per_char(model, test, args.block_size)  # once, at the end
    print(f"test_bpc {test_bpc:.3f}")

    result = {"example": "char_gpt", "config": vars(args), "command": " ".join(["python"] + sys.argv),
              "corpus": {"path": args.corpus, "vocab": len(chars), "train_chars": len(texts[0]),
                         "val_chars": len(texts[1]), "test_chars": len(texts[2])},
              "parameters": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("interfaces")),
              "curve": curve, "val_bpc": curve[-1]["val_bpc"], "test_bpc": test_bpc,
              "train_seconds": round(train_seconds, 1), "torch": torch.__version__,
              "hardware": torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"{platform.machine()} cpu, {torch.get_num_threads()} threads",
              "env": environment(torch.device(args.device))}  # commit and git_dirty, as a run folder's env.json
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"char_gpt_{args.method}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
