"""Table 1's grid (`python -m experiments.table1`): its rows and columns, the name and Config of
each run, and where the runs and the table files live."""
import re
from pathlib import Path


from dni.errors import DNIError
from dnilab.config import METHODS as CONFIG_METHODS, Config
from dnilab.presets import PAPER_PRESET, paper_epochs
from experiments.grid import COLUMNS, CPU_SETTINGS, short

LAYERS = {"mlp": (3, 4, 5, 6), "cnn": (3, 4)}  # the paper's rows; layers = depth + 1
MODEL_LABEL = {"mlp": "FCN", "cnn": "CNN"}
METHOD_LABEL = {"nobprop": "No Bprop", "backprop": "Bprop", "dni": "DNI", "cdni": "cDNI", "local": "Local"}
PAPER_METHODS = ("nobprop", "backprop", "dni", "cdni")  # the paper's columns: the default; local is asked for
DATASET_TITLES = {"mnist": ("MNIST", ""), "fashion_mnist": ("Fashion-MNIST", "fashion_")}  # -> (title, file prefix)

# Where the stage rates of CPU_SETTINGS (experiments/grid.py) came from, printed with each table;
# a table whose runs have a rate the grid has since left says where that one came from.
STAGE_LR_SOURCE = {"mlp": "chosen for 10 epochs on MNIST's validation split at FCN 4 (results/stage_search_mlp.md)",
                   "cnn": "chosen for 10 epochs on MNIST's validation split at CNN 3 (results/stage_search_cnn.md)"}
FORMER_STAGE_LR = {("cnn", 3e-3): "chosen on test before the split"}
# The paper's budget (section 3.1): Adam, lr 3e-5 divided by 10 at 60% and 80% of 500k
# iterations of batch 256; 128 filters per conv layer.
PAPER_SETTINGS = {k: PAPER_PRESET[k] for k in ("lr", "sg_lr", "schedule", "batch_size", "channels")}
QUICK_TABLE = dict(models=["mlp"], layers=[3], methods=["backprop", "dni", "cdni"], seeds=[0], epochs=1)

# The paper's Table 1 numbers could not be confirmed where this was written (no copy of the
# PDF's table was reachable), so none is quoted: None prints as "not confirmed".
PAPER_TABLE1 = {}
# Settings the table reports, per model: of every run, and of the synthesizers of DNI runs.
STAGE_KEYS = {"mlp": ("lr", "schedule", "batch_size", "num_epochs", "hidden"),
              "cnn": ("lr", "schedule", "batch_size", "num_epochs", "channels")}
SYNTH_KEYS = {"mlp": ("sg_lr", "synth_layers", "synth_width", "synth_label_map"),
              "cnn": ("sg_lr", "synth_type", "synth_layers", "synth_width", "synth_channels")}


# ---------------------------------------------------------------- the grid

def stage_lr_line(rates):
    """{model: [stage lr of its runs]} -> the table's line on where each rate came from."""
    parts = []
    for model, lrs in rates.items():
        grid_lr = CPU_SETTINGS[model]["lr"]
        for lr in lrs:
            why = STAGE_LR_SOURCE[model] if lr == grid_lr else (
                f"{FORMER_STAGE_LR.get((model, lr), 'not chosen')}; the grid's is now {short(grid_lr)}, "
                f"{STAGE_LR_SOURCE[model]}")
            parts.append(f"{MODEL_LABEL[model]} {short(lr)}, {why}")
    return "Stage learning rates: " + "; ".join(parts) + " (docs/choices.md)."


def run_name(model, layers, method, seed):
    return f"{model}{layers}_{method}_s{seed}"


def grid_cells(args):
    """(model, layers) cells to train, in the paper's order, filtered by --models/--layers."""
    return [(model, layers) for model in args.models for layers in LAYERS[model]
            if args.layers is None or layers in args.layers] + \
        [(model, layers) for model in args.models for layers in (args.layers or ())
         if layers not in LAYERS[model]]


def trained_cells(args):
    """{(model, layers, method)} with a finished run under this table's run root."""
    found = (re.fullmatch(r"(\w+?)(\d+)_(\w+)_s\d+", p.parent.name) for p in run_root(args).glob("*/summary.json"))
    return {(m[1], int(m[2]), m[3]) for m in found if m and m[1] in LAYERS and m[3] in COLUMNS}


def table_scope(args):
    """(cells, methods) the table shows: those asked for plus those with runs in its root, in the
    paper's order. The default asks for the whole grid, so a half-trained one shows its missing
    cells; a slice in a root of its own (another budget, --quick) shows that slice alone."""
    trained = trained_cells(args)
    asked = grid_cells(args)
    order = [(model, layers) for model in LAYERS for layers in LAYERS[model]]
    cells = [c for c in order + asked if c in asked or any(t[:2] == c for t in trained)]
    methods = [m for m in COLUMNS if m in args.methods or any(t[2] == m for t in trained)]
    return list(dict.fromkeys(cells)), methods


def run_config(args, model, layers, method, seed):
    """The Config of one run: dnilab.config's defaults but for what the table sets."""
    if COLUMNS[method]["method"] not in CONFIG_METHODS:  # else dnilab.train would run it as backprop
        raise DNIError(f"this dnilab.config has no method {COLUMNS[method]['method']!r}; update dnilab/config.py and dnilab/train.py")
    settings = dict(model_type=model, preset=args.preset, depth=layers - 1, dataset=args.dataset, seed=seed,
                    plot=False, overwrite=True, out=str(run_root(args) / run_name(model, layers, method, seed)),
                    **COLUMNS[method])
    if args.device:
        settings["device"] = args.device
    if args.data_dir:
        settings["data_dir"] = args.data_dir
    if args.paper:
        settings.update(PAPER_SETTINGS, num_epochs=paper_epochs(args.dataset, Config.val_size, PAPER_SETTINGS["batch_size"]))
    else:
        settings.update(CPU_SETTINGS[model])
        if args.preset == "paper":  # the paper's model at this budget: its one Adam rate for all, our schedule
            settings.update(sg_lr=settings["lr"], schedule="cosine")
        if args.epochs:
            settings["num_epochs"] = args.epochs
    return Config(**settings)


def budget(args):
    return "paper" if args.paper else "quick" if args.quick else ""


def stem(args):
    """table1, table1_quick, table1_paper or, for the paper's preset, table1_preset_paper[_paper|_quick]:
    the run folders' root and the output files' name."""
    preset = "_preset_paper" if args.preset == "paper" else ""
    return "table1" + preset + (f"_{budget(args)}" if budget(args) else "")


def run_root(args):
    return Path(args.results) / stem(args) / args.dataset


def output_base(args):
    return Path(args.results) / f"{DATASET_TITLES[args.dataset][1]}{stem(args)}"
