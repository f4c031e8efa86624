"""The character-level language model of `python charlm.py`: an LSTM trained by truncated BPTT on
Debian's fortunes, with or without recurrent DNI (paper, section 3.2 and its Penn Treebank
experiment), and its run folder.

The training text is read as B parallel streams (contiguous stretches of the training split);
each update is one window of T characters of every stream, the LSTM's state carried from the
window before. Text has no episode boundaries, so the state is never reset within a pass over the
text (it restarts from zero at each new pass), and the synthetic gradient's scale stays the
paper's 0.1: with scale 1 the target would sum the future loss of the whole text, unbounded
without resets; 0.1 discounts each further window tenfold (dni.recurrent).

- bptt: truncated BPTT, nothing from the future reaches a window;
- dni: `dni.RecurrentDNI` at each window's boundary: a linear synthesizer of the state (h, c);
- dni_aux: DNI + Aux, the paper's variant: the core also predicts, at each step of the window,
  the synthetic gradient that the window's end will receive; the squared error of that
  prediction, times --aux_weight, joins the window's loss (`dni.RecurrentDNI(aux_weight=...)`).

Validation bits per character are measured every --eval_every characters over the whole
validation split; the parameters at the best of them are kept, and test bits per character are
read once, with those parameters, at the end (the paper's early stopping, with no learning-rate
decay). Every run sees the same number of training characters, --chars.
"""
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import dni
from dni.errors import DNIError
from dni.recurrent import SG_FACTOR
from dnilab.config import DEVICES
from dnilab.data import FORTUNES_DIR, load_fortunes
from dnilab.parts import pick_device, set_seed
from dnilab.runs import claim_run_dir, environment, record_environment, write_json

LM_METHODS = ("bptt", "dni", "dni_aux")


@dataclass
class CharLMConfig:
    """Every default of `python charlm.py`, defined once."""
    method: str = field(default="dni", metadata=dict(help="bptt, dni or dni_aux (DNI + Aux)", choices=LM_METHODS))
    truncation: int = field(default=3, metadata=dict(help="T: characters per BPTT window", positive=True))
    hidden: int = field(default=256, metadata=dict(help="LSTM units", positive=True))
    embedding: int = field(default=64, metadata=dict(help="character embedding size", positive=True))
    batch_size: int = field(default=64, metadata=dict(help="parallel streams of text", positive=True))
    lr: float = field(default=1e-3, metadata=dict(help="Adam learning rate of the LSTM", positive=True))
    sg_lr: float = field(default=1e-3, metadata=dict(help="Adam learning rate of the synthesizer", positive=True))
    sg_factor: float = field(default=SG_FACTOR, metadata=dict(help="scale of the synthetic gradient", positive=True))
    aux_weight: float = field(default=0.1, metadata=dict(help="dni_aux: weight of the auxiliary loss", positive=True))
    clip: float = field(default=1.0, metadata=dict(help="max gradient norm of the LSTM, 0: no clipping"))
    chars: int = field(default=4_000_000, metadata=dict(help="training characters seen, over all streams",
                                                        positive=True))
    eval_every: int = field(default=400_000, metadata=dict(help="training characters between validations",
                                                           positive=True))
    eval_streams: int = field(default=16, metadata=dict(help="streams the validation and test splits are cut into",
                                                        positive=True))
    corpus: str = field(default=FORTUNES_DIR, metadata=dict(help="folder of the fortunes files"))
    seed: int = field(default=0, metadata=dict(help="seed of the weights and of the stream offsets"))
    device: str = field(default="cpu", metadata=dict(help="device", choices=DEVICES))
    threads: int = field(default=1, metadata=dict(help="torch CPU threads", positive=True))
    out: str = field(default="", metadata=dict(help="run folder (default: results/charlm/<method>_T<T>_s<seed>)"))
    overwrite: bool = field(default=False, metadata=dict(help="replace a finished run in --out"))

    def __post_init__(self):
        if self.clip < 0:
            raise DNIError(f"--clip must be >= 0, got {self.clip}")
        if not self.out:
            self.out = f"results/charlm/{self.method}_T{self.truncation}_s{self.seed}"


class CharLSTM(nn.Module):
    """Embedding, one LSTM layer, a linear readout to the vocabulary; with `aux_features`, a
    linear auxiliary head on the LSTM's output predicting a synthetic gradient of that size."""

    def __init__(self, *, vocab, embedding, hidden, aux_features=0):
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.lstm = nn.LSTM(embedding, hidden)
        self.readout = nn.Linear(hidden, vocab)
        self.aux = nn.Linear(hidden, aux_features) if aux_features else None

    def forward(self, x, state=None):
        """x (T, B) ids -> logits (T, B, vocab), the state after the T steps, aux (T, B, F) or None."""
        out, state = self.lstm(self.embed(x), state)
        return self.readout(out), state, None if self.aux is None else self.aux(out)


def streams(ids, count):
    """(len // count, count): `ids` cut into `count` contiguous streams, side by side."""
    length = len(ids) // count
    return ids[:length * count].view(count, length).t()


@torch.no_grad()
def bits_per_char(model, ids, count, chunk=2048):
    """Mean bits per character of predicting every next character of `ids`, read as `count`
    streams from a zero state, in chunks of `chunk` steps (the state carried between them)."""
    model.eval()
    data = streams(ids, count)
    total, n, state = 0.0, 0, None
    for a in range(0, len(data) - 1, chunk):
        x, y = data[a:a + chunk], data[a + 1:a + chunk + 1]
        x = x[:len(y)]
        logits, state, _ = model(x, state)
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        n += y.numel()
    model.train()
    return total / n / math.log(2)


def build(config, vocab, device):
    """The model, the recurrent interface (None for bptt) and one Adam with both rates."""
    features = 2 * config.hidden  # (h, c) of one layer, per example
    model = CharLSTM(vocab=vocab, embedding=config.embedding, hidden=config.hidden,
                     aux_features=features if config.method == "dni_aux" else 0).to(device)
    sg = None
    if config.method != "bptt":
        sg = dni.RecurrentDNI(features=features, factor=config.sg_factor,
                              aux_weight=config.aux_weight if config.method == "dni_aux" else 0.0).to(device)
    groups = [dict(params=model.parameters(), lr=config.lr)]
    if sg is not None:
        groups.append(dict(params=sg.parameters(), lr=config.sg_lr))
    return model, sg, torch.optim.Adam(groups)


def train(config, *, log=print, metrics=None, corpus=None):
    """Train for config.chars characters (on `corpus`, default config.corpus read here); returns the
    summary dict (see the module docstring)."""
    torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    corpus = corpus if corpus is not None else load_fortunes(config.corpus, device=device)
    set_seed(config.seed)
    model, sg, optimizer = build(config, len(corpus.chars), device)
    data = streams(corpus.train, config.batch_size)                             # (L, B)
    T, B = config.truncation, config.batch_size
    windows = config.chars // (T * B)
    params = list(model.parameters())
    state, position = None, 0
    best = dict(val_bits=math.inf)
    seen_bits, seen, sg_losses, train_s = 0.0, 0, [], 0.0
    for window in range(1, windows + 1):
        start = time.perf_counter()
        if position + T + 1 > len(data):  # a new pass over the text starts from the zero state
            state, position = None, 0
        x, y = data[position:position + T], data[position + 1:position + T + 1]    # (T, B) each
        position += T
        optimizer.zero_grad(set_to_none=True)
        if sg is not None:
            state = sg.begin(state)
        logits, state, aux = model(x, state)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / B  # summed over T, mean over B
        if sg is None:
            loss.backward()
            state = tuple(s.detach() for s in state)
        else:
            state = sg.backward(loss, state, aux=aux)
            if sg.sg_loss is not None:
                sg_losses.append(float(sg.sg_loss))
        if not torch.isfinite(loss):
            raise DNIError(f"the loss is {float(loss)} at window {window}; lower --lr or --sg_lr")
        if config.clip > 0:
            nn.utils.clip_grad_norm_(params, config.clip)
        optimizer.step()
        train_s += time.perf_counter() - start
        seen_bits += float(loss.detach()) * B / math.log(2)
        seen += T * B
        chars = window * T * B
        if chars // config.eval_every != (chars - T * B) // config.eval_every or window == windows:
            val = bits_per_char(model, corpus.val, config.eval_streams)
            row = dict(kind="eval", step=window, chars=chars, train_bits=seen_bits / seen, val_bits=val,
                       sg_loss=sum(sg_losses) / len(sg_losses) if sg_losses else None, time=round(train_s, 2))
            if val < best["val_bits"]:
                best = dict(val_bits=val, chars=chars, state=copy.deepcopy(model.state_dict()))
            if metrics is not None:
                metrics(row)
            log(f"chars {chars} train {row['train_bits']:.3f} val {val:.3f} bits/char {train_s:.0f}s")
            seen_bits, seen, sg_losses = 0.0, 0, []
    model.load_state_dict(best["state"])
    test = bits_per_char(model, corpus.test, config.eval_streams)
    return dict(test_bits=test, val_bits=best["val_bits"], best_chars=best["chars"], chars=windows * T * B,
                train_seconds=round(train_s, 2), seconds_per_mchar=round(train_s / (windows * T * B) * 1e6, 2),
                device=str(device))


def run(config, *, log=print):
    """Train as `config` says, in the run folder config.out: config.json, command.txt, env.json,
    metrics.jsonl, summary.json (written last). Returns the summary dict."""
    device = pick_device(config.device)
    corpus = load_fortunes(config.corpus, device=device)  # a missing corpus is refused before the folder exists
    folder = claim_run_dir(Path(config.out), overwrite=config.overwrite)
    record_environment(folder, config, device)
    with open(folder / "metrics.jsonl", "w") as f:
        summary = train(config, log=log, metrics=lambda row: f.write(json.dumps(row) + "\n"), corpus=corpus)
    summary.update(config=dataclasses.asdict(config), env=environment(device, folder))
    write_json(folder / "summary.json", summary)
    log(f"{config.method} T={config.truncation}: test {summary['test_bits']:.3f} bits/char at the best validation "
        f"({summary['val_bits']:.3f}, after {summary['best_chars']} chars), {summary['train_seconds']:.0f}s -> {folder}")
    return summary
