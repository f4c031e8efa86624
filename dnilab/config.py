"""Every training default, defined once. The CLI of main.py, mlp.py and cnn.py is built from it."""
from dataclasses import asdict, dataclass, field
from typing import Optional

from dni.errors import DNIError
from dnilab.data import DATASETS
from dnilab.models import MODELS
from dnilab.presets import PRESETS, paper_epochs

METHODS = ("dni", "backprop", "nobprop", "local")
SCHEDULES = ("cosine", "constant", "paper")
DEVICES = ("auto", "cpu", "cuda")
SYNTH_TYPES = ("conv", "dense")


def _opt(help, **kw):
    return field(default=kw.pop("default"), metadata=dict(help=help, **kw))


@dataclass
class Config:
    """One training run. None means "the preset's default for this model" (see dnilab.presets)."""
    model_type: str = _opt("network", default="mlp", choices=MODELS)
    preset: str = _opt("ours: our defaults (dnilab.presets); paper: section 3.1's networks, synthesizers, "
                       "rates and 500k-iteration schedule, nothing of ours; flags typed override either",
                       default="ours", choices=PRESETS)
    method: str = _opt("dni: every stage decoupled by a DNI; backprop: the baseline; "
                       "nobprop: only the last stage learns (the paper's No Bprop); local: each stage but the last "
                       "learns from an auxiliary classifier of its own (Decoupled Greedy Learning)", default="dni",
                       choices=METHODS)
    conditioned: bool = _opt("cDNI: synthesizers also read the one-hot label", default=False)
    dataset: str = _opt("data set", default="mnist", choices=DATASETS)
    data_dir: str = _opt("where data sets live", default="data")
    val_size: int = _opt("validation images held out of the end of the training set, never trained on, the only "
                         "split settings are chosen on; 0 trains on all of it (then choose nothing from the run)",
                         default=10000)
    num_epochs: Optional[int] = _opt("epochs (default: mlp 60, cnn 20; paper preset: 500k iterations)", default=None,
                                     positive=True)
    batch_size: int = _opt("batch size", default=256, positive=True)
    lr: Optional[float] = _opt("Adam learning rate of the stages, every method, and of local's heads "
                               "(default: mlp 3e-4, cnn 3e-3; paper 3e-5)", default=None, positive=True)
    sg_lr: Optional[float] = _opt("Adam learning rate of the synthesizers (default: 1e-3; mlp DNI 5e-3, cnn cDNI 3e-4; paper 3e-5)",
                                  default=None, positive=True)
    schedule: Optional[str] = _opt("learning-rate schedule; paper: /10 at 60%% and 80%% of the steps "
                                   "(default: cosine; paper preset: paper)", default=None, choices=SCHEDULES)
    depth: Optional[int] = _opt("hidden stages (default: mlp 3, cnn 2)", default=None, positive=True)
    hidden: int = _opt("units per mlp hidden stage", default=256, positive=True)
    channels: Optional[int] = _opt("filters per cnn stage (default: 16; paper 128)", default=None, positive=True)
    synth_layers: Optional[int] = _opt("hidden layers in each synthesizer, 0 = linear (default: 1, cnn cDNI 0; paper: DNI 1, "
                                       "cDNI 0)", default=None, choices=(0, 1, 2))
    synth_width: Optional[int] = _opt("units per dense synthesizer hidden layer (default: 1024; mlp DNI 2048)",
                                      default=None, positive=True)
    synth_channels: Optional[int] = _opt("filters per conv synthesizer hidden layer (default: 32; paper 128)",
                                         default=None, positive=True)
    synth_type: Optional[str] = _opt("synthesizer of a cnn stage's feature maps: conv (the paper's) or dense, on "
                                     "the flattened maps (default: cnn DNI dense, cDNI conv; mlp: dense)",
                                     default=None, choices=SYNTH_TYPES)
    synth_label_map: Optional[bool] = _opt("cDNI dense synthesizers: the label also reaches the output through a "
                                           "linear map (default: False, as the paper; docs/deviations.md)",
                                           default=None)
    synth_position_map: Optional[bool] = _opt("conv synthesizers: a learnt per-position bias and, under cDNI, a "
                                              "linear map of the label to the output (default: True; paper False)",
                                              default=None)
    device: str = _opt("where to train", default="auto", choices=DEVICES)
    use_gpu: Optional[bool] = _opt("the seed's flag: True = --device cuda, False = --device cpu",
                                   default=None)
    seed: int = _opt("random seed (weights and data order)", default=0)
    out: str = _opt("run folder (default: results/<dataset>_<model>_<method>)", default="")
    plot: bool = _opt("draw the PNG plots at the end", default=True)
    overwrite: bool = _opt("replace a finished or interrupted run in --out", default=False)
    resume: str = _opt("continue the interrupted run in this folder from its checkpoint, with its own settings",
                       default="")
    # Pipelined training (dnilab.pipeline): one worker process per group of stages, launched by torchrun.
    pipeline: bool = _opt("one worker process per group of consecutive stages; launch with torchrun",
                          default=False)
    partition: str = _opt("pipeline: stages per worker, e.g. 2,2 (default: balanced by multiply-adds)",
                          default="")
    max_in_flight: int = _opt("pipeline: batches a worker may run ahead of the true gradient it awaits "
                              "(room to absorb the jitter of a shared machine)",
                              default=4, positive=True)
    worker_timeout: float = _opt("pipeline: seconds to wait for another worker before stopping with an error",
                                 default=60.0, positive=True)
    # Unlocking experiments (dni.unlock; paper section 3.3, Fig. 7).
    update_prob: float = _opt("each stage updates in a step only with this probability (0 < P <= 1); under "
                              "backprop only if every stage above it updates too", default=1.0, positive=True)
    unlock: str = _opt("update: DNI (update unlock); complete: stages also train on synthetic inputs "
                       "I_i(x), needing neither forward nor backward pass of their neighbours",
                       default="update", choices=("update", "complete"))
    input_model_layers: int = _opt("--unlock complete: hidden layers of each synthetic-input model",
                                   default=1, choices=(0, 1, 2))
    input_model_width: int = _opt("--unlock complete: units per synthetic-input model hidden layer",
                                  default=512, positive=True)

    def __post_init__(self):
        if self.val_size < 0:
            raise DNIError(f"--val_size must be >= 0, got {self.val_size}")
        for name, value in PRESETS[self.preset](self.model_type, self.conditioned).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.num_epochs is None:  # the paper counts iterations: 500k of the batches this split gives
            self.num_epochs = paper_epochs(self.dataset, self.val_size, self.batch_size)
        if self.synth_type == "conv" and self.model_type != "cnn":
            raise DNIError(f"--synth_type conv needs --model_type cnn ({self.model_type} stages output vectors)")
        if self.use_gpu is not None:
            self.device = "cuda" if self.use_gpu else "cpu"
        if self.conditioned and self.method != "dni":
            raise DNIError(f"--conditioned True needs --method dni ({self.method} has no synthesizers)")
        if self.partition and not self.pipeline:
            raise DNIError("--partition needs --pipeline True (it says which worker trains which stages)")
        if not 0 < self.update_prob <= 1:
            raise DNIError(f"--update_prob must be in (0, 1], got {self.update_prob}")
        if self.unlock == "complete" and self.method != "dni":
            raise DNIError("--unlock complete needs --method dni (it trains on synthetic inputs and gradients)")
        if (self.update_prob < 1 or self.unlock == "complete") and self.method not in ("dni", "backprop"):
            raise DNIError(f"--update_prob and --unlock complete work with --method dni or backprop, not {self.method}")
        if self.update_prob < 1 and self.unlock == "complete":
            raise DNIError("--update_prob < 1 together with --unlock complete is not implemented; pick one")
        if self.pipeline and (self.update_prob < 1 or self.unlock == "complete"):
            raise DNIError("--update_prob and --unlock complete are not available with --pipeline True")

    @property
    def name(self):
        """Short name of the run: mlp_dni, mlp_cdni, cnn_backprop, fashion_mnist_mlp_dni, mlp_dni_pipeline..."""
        method = "cdni" if self.conditioned else self.method
        prefix = "" if self.dataset == "mnist" else f"{self.dataset}_"
        suffix = "_pipeline" if self.pipeline else ""
        suffix += "_complete" if self.unlock == "complete" else ""
        suffix += f"_p{self.update_prob:g}" if self.update_prob < 1 else ""
        return f"{prefix}{self.model_type}_{method}{suffix}"

    def to_dict(self):
        return asdict(self)


def label_map_acts(settings):
    """Whether `--synth_label_map` changes the run `settings` describe: only a cDNI synthesizer
    that is dense (every FCN one, a CNN one with --synth_type dense) has the map; elsewhere the
    recorded value is inert and two runs differing only in it are the same run."""
    return bool(settings.get("method") == "dni" and settings.get("conditioned")) \
        and (settings.get("model_type") == "mlp" or settings.get("synth_type") == "dense")


def saved_settings(saved):
    """A recorded run's config.json, completed with the value each setting added since then had
    implicitly: runs made before --synth_type existed used conv synthesizers on cnn stages,
    before --synth_label_map no dense cDNI synthesizer had the map (conv ones always did), before
    --synth_position_map every conv synthesizer had it, and before --val_size every run trained
    on the whole training set with our preset."""
    saved = {"synth_type": "conv" if saved.get("model_type") == "cnn" else "dense", "val_size": 0,
             "preset": "ours", "synth_position_map": True, **saved}
    dense_cdni = saved.get("conditioned") and saved["synth_type"] == "dense"
    return {"synth_label_map": not dense_cdni, **saved}
