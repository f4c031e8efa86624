"""DNI in a small GPT-style Transformer: character-level language modelling of Debian's fortunes.

A nanoGPT-style model (pre-LayerNorm blocks of causal self-attention and an MLP) cut on its residual
stream (B, T, D) between blocks (the statements marked `# DNI`). By default a `dni.DNI` sits between
every pair of consecutive blocks (three cuts with four blocks; `--cuts 1`: one, in the middle); its
per-position synthesizer predicts the gradient at every position (Jaderberg et al. 2016, section 2;
`dni.SequenceSynthesizer`). The blocks below an interface learn from its synthetic gradient only.
The loss is the mean over B * T tokens, so the loss scale is B * T: the synthesizers predict
per-token gradients (dni/interface.py).

    python examples/char_gpt.py --method backprop     # or dni, cdni, local; --help for the rest

Under cDNI (section 2's conditional DNI) every position's synthesizer also reads the one-hot of
the character that position predicts: the context is (B, T, vocab), one label per position.
Under `--method local` each cut is a `dni.LocalLoss` instead (Decoupled Greedy Learning,
Belilovsky et al. 2020): a small auxiliary head, a LayerNorm and one linear map from the residual
stream to the vocabulary at every position (D * vocab weights, a tenth of a block), predicts the
next character; the blocks below learn from its cross-entropy alone, the blocks above read the
residual stream detached. The synthesizers' and heads' sizes and the synthesizers' rate are flags
(--synth_width, --synth_layers, --sg_lr, --head_layers, --head_width) that
experiments/examples_search.py chooses on validation; their defaults are the settings above.

Corpus: `dnilab.data.load_fortunes`, Debian's `fortunes` (apt-get install fortunes), each file
split contiguously into train, validation and test (90/5/5). Validation bits per character are
measured every --eval_every steps, test once at the end, each over the whole split in
consecutive windows of --block_size. The run's folder (--out) holds config.json, command.txt,
env.json, metrics.jsonl (the validation curve) and summary.json (dnilab/example_runs.py).
"""
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
import dni  # noqa: E402
from dni.errors import DNIError  # noqa: E402
from dnilab.cli import parse_config  # noqa: E402
from dnilab.data import FORTUNES_DIR, load_fortunes  # noqa: E402
from dnilab.example_runs import (EXAMPLE_METHODS, check_sg_lr, cut_positions, finish_run, log_metrics,  # noqa: E402
                                 parameter_groups, start_run)


def _opt(default, help, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class Settings:
    """The example's settings; each is a flag (`--steps 3000`)."""
    method: str = _opt("dni", "how the blocks below a cut learn", choices=EXAMPLE_METHODS)
    cuts: int = _opt(0, "cuts on the residual stream, spread evenly: 1 is the middle; 0, one between every "
                        "pair of consecutive blocks")
    steps: int = _opt(1000, "training steps", positive=True)
    batch_size: int = _opt(32, "windows per step", positive=True)
    block_size: int = _opt(128, "context length T", positive=True)
    n_layer: int = _opt(4, "blocks", positive=True)
    d_model: int = _opt(128, "width of the residual stream", positive=True)
    n_head: int = _opt(4, "attention heads", positive=True)
    synth_width: int = _opt(512, "hidden units of each per-position synthesizer (dni, cdni); 0: linear")
    synth_layers: int = _opt(1, "hidden layers of each synthesizer (dni, cdni); 0: linear")
    lr: float = _opt(1e-3, "AdamW, cosine decay to 0 over the run", positive=True)
    sg_lr: float = _opt(0.0, "the synthesizers' AdamW rate, same cosine decay (dni, cdni; 0: --lr, in one "
                             "parameter group with the rest)")
    head_layers: int = _opt(0, "hidden layers (linear, GELU) of each local head between its LayerNorm and its "
                               "map to the vocabulary (local; 0: LayerNorm and linear alone)")
    head_width: int = _opt(512, "units of each local head's hidden layers", positive=True)
    eval_every: int = _opt(200, "steps between validation measurements", positive=True)
    eval_chars: int = _opt(0, "measure on the first N characters of val and test (0: all)")
    corpus: str = _opt(FORTUNES_DIR, "folder of the fortunes' text files")
    seed: int = _opt(0, "seed of the initialisation and of the windows drawn")
    device: str = _opt("cuda" if torch.cuda.is_available() else "cpu", "torch device")
    out: str = _opt("", "the run's folder (default: results/examples/char_gpt_<method>[_cuts<cuts>]_seed<seed>)")
    overwrite: bool = _opt(False, "replace a finished run in --out")
    eval_test: bool = _opt(True, "measure the test split at the end (the search does not: it reads validation alone)")

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise DNIError(f"--d_model {self.d_model} must be a multiple of --n_head {self.n_head}")
        if min(self.eval_chars, self.cuts, self.synth_width, self.synth_layers, self.head_layers) < 0:
            raise DNIError("--eval_chars, --cuts, --synth_width, --synth_layers and --head_layers must be at least 0")
        check_sg_lr(self.method, self.sg_lr)
        if self.method != "backprop":
            cut_positions(self.n_layer, self.cuts)  # refuses cuts the blocks cannot hold


def token_cross_entropy(logits, targets):
    """Mean cross-entropy over every position: logits (B, T, vocab), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


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


def local_head(d_model, vocab, width, layers):
    """A local head, (B, T, D) -> (B, T, vocab) position by position: a LayerNorm, `layers` x (linear to
    `width` units, GELU), a linear map to the vocabulary (layers=0: LayerNorm and linear alone)."""
    hidden, n_in = [], d_model
    for _ in range(layers):
        hidden += [nn.Linear(n_in, width), nn.GELU()]
        n_in = width
    return nn.Sequential(nn.LayerNorm(d_model), *hidden, nn.Linear(n_in, vocab))


class GPT(nn.Module):
    """Token and position embeddings, `n_layer` blocks, a final LayerNorm and a linear head (not
    tied to the embedding, which sits below every cut). `method` "dni" or "cdni": a `dni.DNI` at
    each cut; "local": a `dni.LocalLoss` whose head is a LayerNorm and a linear map to the vocabulary
    (a small head: no attention, so it reads each position's residual stream alone); "backprop": no
    cut. `cuts`: how many, spread evenly (`cut_positions`; 0: between every pair of blocks).
    `synth_layers` hidden layers of `synth_width` units per synthesizer (either 0: linear);
    `head_layers` hidden layers of `head_width` units in each local head. In eval mode the cuts are
    the identity."""

    def __init__(self, *, vocab, block_size=128, n_layer=4, d_model=128, n_head=4, method="backprop", cuts=0,
                 synth_width=512, synth_layers=1, head_width=512, head_layers=0):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab, bias=False)
        self.cut_after = cut_positions(n_layer, cuts) if method != "backprop" else ()  # blocks below each cut
        if method in ("dni", "cdni"):  # DNI: a per-position synthesizer for each (T, D) cut
            self.cuts = nn.ModuleList(
                dni.DNI(shape=(block_size, d_model), width=synth_width, hidden_layers=synth_layers * bool(synth_width),
                        context_features=vocab if method == "cdni" else 0, loss_scale=lambda h: h.shape[0] * h.shape[1])
                for _ in self.cut_after)
        elif method == "local":
            self.cuts = nn.ModuleList(
                dni.LocalLoss(local_head(d_model, vocab, head_width, head_layers), loss_fn=token_cross_entropy)
                for _ in self.cut_after)
        else:
            self.cuts = nn.ModuleList()
        self.vocab, self.method = vocab, method

    def forward(self, idx, targets=None):  # DNI (cDNI and local: the targets)
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))  # (B, T, D)
        cuts = dict(zip(self.cut_after, self.cuts))  # blocks below -> its cut
        context = F.one_hot(targets, self.vocab) if self.method == "cdni" and targets is not None else None  # (B, T, V)
        for i, block in enumerate(self.blocks):
            if i in cuts:
                x = cuts[i](x, targets) if self.method == "local" else cuts[i](x, context=context)  # DNI
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
    settings = parse_config(Settings, argv, description=__doc__.split("\n")[0])
    try:
        corpus = load_fortunes(settings.corpus, settings.device)
        run_dir = start_run(settings, torch.device(settings.device), "char_gpt")
    except DNIError as error:
        sys.exit(f"error: {error}")
    print(f"char_gpt {settings.method}, {settings.steps} steps on {settings.device} -> {run_dir}", flush=True)
    summary = train(settings, corpus, run_dir)
    test = f" test_bpc {summary['test_bpc']:.3f}" if settings.eval_test else ""
    print(f"val_bpc {summary['val_bpc']:.3f}" + test)


def build_model(s, *, vocab):
    """The model that settings `s` train, on s.device."""
    return GPT(vocab=vocab, block_size=s.block_size, n_layer=s.n_layer, d_model=s.d_model, n_head=s.n_head,
               method=s.method, cuts=s.cuts, synth_width=s.synth_width, synth_layers=s.synth_layers,
               head_width=s.head_width, head_layers=s.head_layers).to(s.device)


def train(settings, corpus, run_dir):
    """Train, measuring validation bits per character every `eval_every` steps (metrics.jsonl)
    and test once at the end (unless eval_test is False: test_bpc None); returns the summary written to summary.json."""
    s = settings
    torch.manual_seed(s.seed)
    m = s.eval_chars or None
    train_ids, val, test = corpus.train, corpus.val[:m], corpus.test[:m]
    model = build_model(s, vocab=len(corpus.chars))
    optimizer = torch.optim.AdamW(parameter_groups(model, s.lr, s.sg_lr), lr=s.lr)  # synthesizers, local heads too
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.steps)
    generator = torch.Generator().manual_seed(s.seed)

    losses, aux_losses, train_seconds, start = [], [], 0.0, time.perf_counter()
    for step in range(1, s.steps + 1):
        offsets = torch.randint(len(train_ids) - s.block_size, (s.batch_size,), generator=generator)
        window = torch.arange(s.block_size + 1)
        chunk = train_ids[(offsets[:, None] + window).to(s.device)]  # (B, T + 1)
        logits = model(chunk[:, :-1], chunk[:, 1:])  # DNI (cDNI, local: the targets)
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())  # mean over B * T tokens
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if s.method == "local":
            aux_losses.append([cut.aux_loss.item() for cut in model.cuts])
        if step % s.eval_every == 0 or step == s.steps:
            if s.device.startswith("cuda"):
                torch.cuda.synchronize()
            train_seconds += time.perf_counter() - start
            val_bpc = bits_per_char(model, val, s.block_size)
            line = {"kind": "eval", "step": step, "train_bpc": sum(losses) / len(losses) / math.log(2),
                    "val_bpc": val_bpc, "seconds": round(train_seconds, 2)}
            if aux_losses:  # each local head's own loss, in bits per character
                line["aux_bpc"] = [sum(col) / len(col) / math.log(2) for col in zip(*aux_losses)]
            log_metrics(run_dir, line)
            print(f"step {step} train_bpc {line['train_bpc']:.3f} val_bpc {val_bpc:.3f} {train_seconds:.0f}s",
                  flush=True)
            losses, aux_losses, start = [], [], time.perf_counter()
    test_bpc = bits_per_char(model, test, s.block_size) if s.eval_test else None  # once, at the end
    return finish_run(run_dir, {
        "example": "char_gpt", "method": s.method, "cuts": len(model.cut_after), "seed": s.seed, "steps": s.steps,
        "val_bpc": val_bpc, "test_bpc": test_bpc, "seconds": round(train_seconds, 2), "device": s.device,
        "parameters": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("cuts.")),
        "cut_parameters": sum(p.numel() for p in model.cuts.parameters()),  # synthesizers or local heads
        "corpus": {"path": s.corpus, "vocab": len(corpus.chars), "train_chars": len(corpus.train),
                   "val_chars": len(corpus.val), "test_chars": len(corpus.test)}})


if __name__ == "__main__":
    main()
