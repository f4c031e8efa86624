"""A run's folder, the one writer of every training run's (`dnilab.train`, `dnilab.pipeline`,
`dnilab.recurrent`), and the checkpoint a run resumes from.

Files are written atomically (a temp file, then os.replace), so a crash never leaves half a
file. A run already there is never overwritten silently (`prepare_run_dir`). A checkpoint
holds state_dicts, the config and the position in training; `load_checkpoint`,
`resume_config` and `check_resumable` refuse one that cannot be continued faithfully.
"""
import dataclasses
import json
import os
import platform
import random
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from dnilab.config import Config, saved_settings
from dni.errors import DNIError


REPO = Path(__file__).parent  # git reads the checkout this code was loaded from


def _git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _code_paths(run_dir):
    """Pathspecs for the checkout's code: everything tracked but results/ and `run_dir` (when the
    run folder lies inside the checkout). Run folders hold what runs wrote, not what they ran: a
    run made again in place (README's `--overwrite True` into results/) rewrites its own committed
    files, and runs made one after another in one checkout rewrite each other's before they are
    committed; neither is an edit to the code that made them."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None:
        return []
    spec = ["--", ":(top)", ":(top,exclude)results"]
    try:
        inside = Path(run_dir).resolve().relative_to(Path(top).resolve())
    except (TypeError, ValueError):  # no folder given, or one outside the checkout
        return spec
    return spec + [f":(top,exclude){inside.as_posix()}"]


def git_commit():
    return _git("rev-parse", "HEAD")


def _holds_run(run_dir):
    """'finished', 'unfinished' (a checkpoint to --resume, no summary) or None."""
    if (run_dir / "summary.json").exists():
        return "finished"
    return "unfinished" if (run_dir / "checkpoint.pt").exists() else None


def prepare_run_dir(config):
    """The run folder of a main.py run: --out, or results/<config.name> by default (see claim_run_dir)."""
    return claim_run_dir(Path(config.out or Path("results") / config.name), overwrite=config.overwrite,
                         explicit=bool(config.out))


def claim_run_dir(run_dir, *, overwrite=False, explicit=True):
    """The run folder of a new run, every training script's. A run already there, finished or
    resumable, is never overwritten silently: in a folder the user named it is refused unless
    `overwrite`; in a default folder (`explicit` False) a fresh one (name-2, name-3...) is picked.
    Whatever an overwritten run left that would pass for this one's (metrics, summary, checkpoint)
    is removed."""
    run_dir = Path(run_dir)
    held = _holds_run(run_dir)
    if held and not overwrite:
        if explicit and held == "finished":
            raise DNIError(f"{run_dir} already holds a finished run; pass --overwrite True or another --out")
        if explicit:
            raise DNIError(f"{run_dir} holds an unfinished run; continue it with --resume {run_dir}, "
                           "or pass --overwrite True or another --out")
        base, n = run_dir, 2
        while _holds_run(run_dir):
            run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
        print(f"{base} holds a {held} run; writing to {run_dir}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DNIError(f"cannot create run folder {run_dir}: {e.strerror}") from None
    for name in ("metrics.jsonl", "summary.json", "checkpoint.pt"):  # --overwrite: nothing stale may remain
        (run_dir / name).unlink(missing_ok=True)
    return run_dir


def write_text(path, text):
    """Write a text file atomically (a temp file, then os.replace): a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def environment(device, run_dir=None):
    """What a result depends on besides its config: code version, libraries, hardware. `git_dirty`:
    tracked files differ from the commit, run folders (results/ and `run_dir`) aside."""
    commit = git_commit()
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", *_code_paths(run_dir))) if commit else None
    return {"git_commit": commit, "git_dirty": dirty, "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def save_diff(run_dir, env):
    """A run from a modified tree keeps its edits: `git diff HEAD` as diff.patch beside env.json,
    so the commit plus this patch is the code that made it."""
    if env.get("git_dirty"):
        try:
            diff = subprocess.run(["git", "diff", "HEAD", *_code_paths(run_dir)], capture_output=True, text=True,
                                  cwd=REPO, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return
        write_text(Path(run_dir) / "diff.patch", diff)


def command_line():
    return shlex.join([sys.executable] + sys.argv)


def record_environment(run_dir, config, device):
    """config.json, command.txt and env.json of a new run (`config`: any settings dataclass)."""
    write_json(run_dir / "config.json", dataclasses.asdict(config))
    (run_dir / "command.txt").write_text(command_line() + "\n")
    env = environment(device, run_dir)
    write_json(run_dir / "env.json", env)
    save_diff(run_dir, env)


def record_resume(run_dir, device, step):
    """A resumed run appends its command to command.txt and its environment to env.json's "resumes"."""
    with open(run_dir / "command.txt", "a") as f:
        f.write(command_line() + "\n")
    path = run_dir / "env.json"
    env = json.loads(path.read_text()) if path.exists() else {}
    env.setdefault("resumes", []).append({"step": step, **environment(device, run_dir)})
    write_json(path, env)


# ---------------------------------------------------------------- checkpoints

CHECKPOINT_VERSION = 1  # bump when the checkpoint's layout changes: an old one is then refused, not misread
# Settings a resumed run may change: where things live and what is drawn, never the maths.
RESUME_MAY_CHANGE = ("data_dir", "device", "use_gpu", "plot", "overwrite", "out", "resume")


def one_line(error, limit=200):
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def rng_states(device):
    """Every global random generator's state (the data order has its own generator)."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_states(states, device):
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)


def load_checkpoint(run_dir):
    """The checkpoint of run folder `run_dir`, checked to be one `--resume` can continue."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        raise DNIError(f"{run_dir} holds no checkpoint.pt to resume from; give the folder of an interrupted run")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, unpicklable...
        raise DNIError(f"cannot read {path} ({one_line(e, 120)}); it is damaged or not a checkpoint") from None
    version = checkpoint.get("version") if isinstance(checkpoint, dict) else None
    if version != CHECKPOINT_VERSION:
        raise DNIError(f"{path} is checkpoint version {version}, this code reads version {CHECKPOINT_VERSION}; "
                       "resume it with the commit that wrote it (env.json, git_commit) or start a new run")
    if "resume" not in checkpoint:
        raise DNIError(f"{path} holds no resume state (a --pipeline run writes none); "
                       "start the run again with --overwrite True")
    unknown = sorted(set(checkpoint["config"]) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise DNIError(f"{path} has settings this version does not know ({', '.join(unknown)}); "
                       "resume it with the commit that wrote it (env.json, git_commit)")
    return checkpoint


def resume_config(run_dir, given):
    """The config that continues `run_dir`: its checkpoint's, with the flags `given` now on top
    (`run` then refuses any that would change the maths)."""
    saved = saved_settings(load_checkpoint(run_dir)["config"])
    config = Config(**{**saved, "out": str(run_dir), **given, "resume": str(run_dir)})
    if getattr(config, "pipeline", False):
        raise DNIError("--resume continues sequential runs only, not --pipeline ones")
    return config


def check_resumable(config, checkpoint, run_dir):
    """Refuse to continue a run with settings other than its own (another model, depth, seed...)."""
    if Path(config.out or run_dir).resolve() != Path(run_dir).resolve():
        raise DNIError(f"--resume continues {run_dir} in place; drop --out {config.out}")
    for name, value in checkpoint["config"].items():
        if name not in RESUME_MAY_CHANGE and getattr(config, name) != value:
            raise DNIError(f"{run_dir}/checkpoint.pt is from a run with --{name} {value}, not {getattr(config, name)}; "
                           f"drop --{name} to continue that run, or start a new one")


def restore(net, optimizers, checkpoint, run_dir):
    """Load a checkpoint's state_dicts into a freshly built net and its optimizers."""
    try:
        net.load_state_dict(checkpoint["net"])
        optimizers.load_state_dict(checkpoint["optimizers"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise DNIError(f"{run_dir}/checkpoint.pt does not fit the network its settings build "
                       f"({one_line(e, 120)}); it was written by another version of the code") from None


def kept_metrics(path, lines):
    """The first `lines` lines of metrics.jsonl: those written up to the checkpoint. Later ones
    (steps done after it, before the run was killed) go: the resumed run writes them again."""
    kept = (path.read_text() if path.exists() else "").splitlines(keepends=True)[:lines]
    if len(kept) < lines or (kept and not kept[-1].endswith("\n")):
        raise DNIError(f"{path} has {len(kept)} lines, but the checkpoint was written after {lines}; "
                       "it was cut or edited, so the run cannot be continued faithfully; start a new run")
    return "".join(kept)


def save_checkpoint(path, net, optimizers, config, epoch, step, **extra):
    """A dict of state_dicts plus config and position (`epoch` epochs and `step` steps done),
    written atomically: a temp file, then os.replace, so a kill mid-write keeps the previous one.

    `extra` is stored as is; `run` adds `resume`: the position within the epoch, the data-order
    generator's state at the epoch's start, the RNG states and what the metrics hold so far."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"version": CHECKPOINT_VERSION, "net": net.state_dict(), "optimizers": optimizers.state_dict(),
                "config": config.to_dict(), "epoch": epoch, "step": step, **extra}, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- what a training loop writes
# Every run writes its lines through MetricsFile and its summary through write_summary, so their
# run folders share one schema: metrics.jsonl holds a JSON object a line, each with its "kind" and
# its "step" (and the training time so far, where a line has it, as "seconds"); summary.json comes
# last (its presence marks a finished run). dnilab.train's loop, sequential or pipelined, writes
# "step" lines and one "epoch" line per epoch; dnilab.recurrent writes "log" and "length" lines.

class MetricsFile:
    """metrics.jsonl of `run_dir`, opened to append (mode "a") or afresh ("w"); `write(row)` adds a
    line and flushes it, so a run killed outright still leaves every line written. `lines` counts
    the lines the file holds, those already there (`lines` given) included."""

    def __init__(self, run_dir, mode="a", lines=0):
        self.file, self.lines = open(Path(run_dir) / "metrics.jsonl", mode), lines

    def write(self, row):
        if "kind" not in row or "step" not in row:
            raise ValueError(f"a metrics line needs its kind and step, got {sorted(row)}")
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.lines += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def metrics_rows(run_dir):
    """Every line of a run's metrics.jsonl, as dicts, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise DNIError(f"{path} not found: is {run_dir} a run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(run_dir, summary):
    """summary.json, written last: its presence marks a finished run (`claim_run_dir`, `--resume`)."""
    write_json(Path(run_dir) / "summary.json", summary)

def check_batches(steps_per_epoch, config, train_size):
    """Refuse a batch larger than the training set before anything trains."""
    if steps_per_epoch == 0:
        raise DNIError(f"--batch_size {config.batch_size} is larger than the training set ({train_size})")


def announce(config, net, device, run_dir, *, workers="", backend=""):
    """The run's first line: its name, size, budget and folder (`workers`, `backend`: the pipeline's)."""
    print(f"{config.name}: {sum(p.numel() for p in net.stages.parameters()):,} stage parameters, "
          f"{len(net.stages)} stages{workers}, {config.num_epochs} epochs on {device}{backend} -> {run_dir}",
          flush=True)


def step_record(epoch, step, loss, sg_loss=None, sg_cos=None, aux_loss=None):
    """One "step" line of metrics.jsonl; sg_loss and sg_cos (one value per synthesizer) where there
    are any, aux_loss (one value per auxiliary head, local losses) where there are any."""
    stats = {"kind": "step", "epoch": epoch, "step": step, "loss": loss}
    if sg_loss:
        stats["sg_loss"], stats["sg_cos"] = sg_loss, sg_cos
    if aux_loss:
        stats["aux_loss"] = aux_loss
    return stats


def mean_sg_loss(stats):
    """A step's synthesizer loss, averaged over its synthesizers (0 without any): what the epoch line sums."""
    return sum(stats.get("sg_loss", [0.0])) / len(stats.get("sg_loss", [0.0]))


def mean_aux_loss(stats):
    """A step's auxiliary loss, averaged over its heads; None for a step without heads."""
    return sum(stats["aux_loss"]) / len(stats["aux_loss"]) if stats.get("aux_loss") else None


def epoch_record(epoch, step, totals, steps_per_epoch, accs, seconds):
    """The "epoch" line of metrics.jsonl, printed as the log line too; `totals` holds the sums of the
    epoch's step losses and mean synthesizer losses (and, under local losses, of the mean auxiliary
    losses as "aux_loss"), `seconds` the training time so far."""
    aux = {"aux_loss": totals["aux_loss"] / steps_per_epoch} if "aux_loss" in totals else {}
    line = {"kind": "epoch", "epoch": epoch, "step": step, "train_loss": totals["loss"] / steps_per_epoch,
            "sg_loss": totals["sg_loss"] / steps_per_epoch, **aux, **accs, "seconds": seconds}
    print(f"epoch {epoch} step {step} loss {line['train_loss']:.4f} sg_loss {line['sg_loss']:.1e} "
          + "".join(f"{k} {v:.4f} " for k, v in {**aux, **accs}.items()) + f"{seconds:.1f}s", flush=True)
    return line


def finish_run(run_dir, config, device, *, accs, step, seconds, **extra):
    """Write summary.json of a main.py run (last: it marks the run finished); returns the summary."""
    summary = {"val_acc": accs.get("val_acc"), "test_acc": accs["test_acc"], "val_size": config.val_size,
               "epochs": config.num_epochs, "steps": step, "seconds": round(seconds, 2),
               "method": config.method, "model_type": config.model_type, "conditioned": config.conditioned,
               "dataset": config.dataset, "seed": config.seed, "device": str(device), **extra}
    write_summary(run_dir, summary)
    return summary
