"""Every training default, defined once. The CLI of main.py, mlp.py and cnn.py is built from it."""
from dataclasses import asdict, dataclass, field
from typing import Optional

from dni.errors import DNIError
from dni.models import MODELS

METHODS = ("dni", "backprop", "nobprop")
SCHEDULES = ("cosine", "constant", "paper")
DEVICES = ("auto", "cpu", "cuda")
DATASET_CHOICES = ("mnist", "fashion_mnist", "cifar10")
SYNTH_TYPES = ("conv", "dense")


def _opt(help, **kw):
    return field(default=kw.pop("default"), metadata=dict(help=help, **kw))


@dataclass
class Config:
    """One training run. None means "the model's default" (see dni.models.MODELS)."""
    model_type: str = _opt("network", default="mlp", choices=MODELS)
    method: str = _opt("dni: every stage decoupled by a DNI; backprop: the baseline; "
                       "nobprop: only the last stage learns (the paper's No Bprop)", default="dni",
                       choices=METHODS)
    conditioned: bool = _opt("cDNI: synthesizers also read the one-hot label", default=False)
    dataset: str = _opt("data set", default="mnist", choices=DATASET_CHOICES)
    data_dir: str = _opt("where data sets live", default="data")
    num_epochs: Optional[int] = _opt("epochs (default: mlp 60, cnn 20)", default=None, positive=True)
    batch_size: int = _opt("batch size", default=256, positive=True)
    lr: Optional[float] = _opt("Adam learning rate of the stages, every method (default: mlp 3e-4, cnn 3e-3)",
                               default=None, positive=True)
    sg_lr: Optional[float] = _opt("Adam learning rate of the synthesizers (default: 1e-3; mlp DNI 5e-3)",
                                  default=None, positive=True)
    schedule: str = _opt("learning-rate schedule; paper: /10 at 60%% and 80%% of the steps",
                         default="cosine", choices=SCHEDULES)
    depth: Optional[int] = _opt("hidden stages (default: mlp 3, cnn 2)", default=None, positive=True)
    hidden: int = _opt("units per mlp hidden stage", default=256, positive=True)
    channels: int = _opt("filters per cnn stage (the paper: 128)", default=16, positive=True)
    synth_layers: Optional[int] = _opt("hidden layers in each synthesizer, 0 = linear (default: 1)",
                                       default=None, choices=(0, 1, 2))
    synth_width: Optional[int] = _opt("units per dense synthesizer hidden layer (default: 1024; mlp DNI 2048)",
                                      default=None, positive=True)
    synth_channels: int = _opt("filters per conv synthesizer hidden layer", default=32, positive=True)
    synth_type: Optional[str] = _opt("synthesizer of a cnn stage's feature maps: conv (the paper's) or dense, on "
                                     "the flattened maps (default: cnn DNI dense, cDNI conv; mlp: dense)",
                                     default=None, choices=SYNTH_TYPES)
    synth_label_map: bool = _opt("cDNI dense synthesizers: the label also reaches the output through a linear map "
                                 "(conv ones always have it)", default=True)
    device: str = _opt("where to train", default="auto", choices=DEVICES)
    use_gpu: Optional[bool] = _opt("the seed's flag: True = --device cuda, False = --device cpu",
                                   default=None)
    seed: int = _opt("random seed (weights and data order)", default=0)
    out: str = _opt("run folder (default: results/<dataset>_<model>_<method>)", default="")
    plot: bool = _opt("draw the PNG plots at the end", default=True)
    overwrite: bool = _opt("replace a finished or interrupted run in --out", default=False)
    resume: str = _opt("continue the interrupted run in this folder from its checkpoint, with its own settings",
                       default="")
    # Pipelined training (dni.pipeline): one worker process per group of stages, launched by torchrun.
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
        spec = MODELS[self.model_type]
        if self.depth is None:
            self.depth = spec.depth
        if self.num_epochs is None:
            self.num_epochs = spec.num_epochs
        if self.lr is None:
            self.lr = spec.lr
        if self.synth_layers is None:
            self.synth_layers = spec.synth_layers[self.conditioned]
        if self.synth_width is None:
            self.synth_width = spec.synth_width[self.conditioned]
        if self.sg_lr is None:
            self.sg_lr = spec.sg_lr[self.conditioned]
        if self.synth_type is None:
            self.synth_type = spec.synth_type[self.conditioned]
        if self.synth_type == "conv" and self.model_type != "cnn":
            raise DNIError(f"--synth_type conv needs --model_type cnn ({self.model_type} stages output vectors)")
        if self.use_gpu is not None:
            self.device = "cuda" if self.use_gpu else "cpu"
        if self.conditioned and self.method != "dni":
            raise DNIError("--conditioned True needs --method dni (backprop has no synthesizers)")
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


def saved_settings(saved):
    """A recorded run's config.json, completed with the value each setting added since then had
    implicitly: runs made before --synth_type existed used conv synthesizers on cnn stages, and
    before --synth_label_map no dense cDNI synthesizer had the map (conv ones always did)."""
    saved = {"synth_type": "conv" if saved.get("model_type") == "cnn" else "dense", **saved}
    dense_cdni = saved.get("conditioned") and saved["synth_type"] == "dense"
    return {"synth_label_map": not dense_cdni, **saved}
