"""Table 1's figures (`python -m experiments.table1`): the training curves and the synthesizer
losses of every cell, drawn from the run folders."""
import statistics


from dnilab.models import MODELS
from experiments.table1_grid import DATASET_TITLES, METHOD_LABEL, run_name, run_root


def _runs(args, model, layers, method):
    return [run_root(args) / run_name(model, layers, method, s) for s in args.seeds
            if (run_root(args) / run_name(model, layers, method, s) / "summary.json").exists()]


def _spread(curves):
    """(mean, low, high) over seeds, each cut to the shortest curve."""
    n = min(len(c) for c in curves)
    columns = list(zip(*(c[:n] for c in curves)))
    return ([statistics.mean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns])


def plot_curves(args, table, path):
    """Test error against iterations, Bprop / DNI / cDNI, one panel per network (the paper's Fig. 3);
    the line is the mean over seeds, the band their min-max."""
    from dnilab.plots import plt, read_metrics
    rows = [r for r in table["rows"] if any(r["cells"][m]["test_error"] for m in ("backprop", "dni", "cdni")
                                            if m in r["cells"])]
    if not rows:
        return False
    models = sorted({r["model"] for r in rows}, key=list(MODELS).index)
    ncols = max(sum(r["model"] == m for r in rows) for m in models)
    fig, axes = plt.subplots(len(models), ncols, figsize=(3.4 * ncols, 2.9 * len(models)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for i, model in enumerate(models):
        for j, row in enumerate(r for r in rows if r["model"] == model):
            ax = axes[i][j]
            ax.set_visible(True)
            for method, color in (("backprop", "black"), ("dni", "tab:blue"), ("cdni", "tab:orange"),
                                  ("local", "tab:green")):
                runs = _runs(args, model, row["layers"], method) if method in table["meta"]["methods"] else []
                if not runs:
                    continue
                epochs = [read_metrics(r)[1] for r in runs]
                steps = [m["step"] for m in min(epochs, key=len)]
                mean, low, high = _spread([[100 * (1 - m["test_acc"]) for m in e] for e in epochs])
                ax.plot(steps, mean, marker="o", ms=3, color=color, label=METHOD_LABEL[method])
                ax.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)
            ax.set(title=f"{DATASET_TITLES[args.dataset][0]} {row['label']}", xlabel="iteration", ylabel="test error (%)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_sg(args, table, path):
    """Per-layer synthetic-gradient loss (log) and cosine to its target over training, DNI solid,
    cDNI dashed, mean over seeds of a running mean; one column per network."""
    from dnilab.plots import plt, read_metrics, smooth
    rows = [r for r in table["rows"] if any(_runs(args, r["model"], r["layers"], m) for m in ("dni", "cdni")
                                            if m in table["meta"]["methods"])]
    if not rows:
        return False
    fig, axes = plt.subplots(2, len(rows), figsize=(3.4 * len(rows), 5.6), squeeze=False)
    for j, row in enumerate(rows):
        for method, style in (("dni", "-"), ("cdni", "--")):
            runs = _runs(args, row["model"], row["layers"], method) if method in table["meta"]["methods"] else []
            if not runs:
                continue
            steps = [read_metrics(r)[0] for r in runs]
            x = [m["step"] for m in min(steps, key=len)]
            window = max(1, len(x) // 50)
            for key, ax in (("sg_loss", axes[0][j]), ("sg_cos", axes[1][j])):
                for k in range(len(steps[0][0][key])):
                    mean, _, _ = _spread([smooth([m[key][k] for m in s], window) for s in steps])
                    ax.plot(x[:len(mean)], mean, style, color=f"C{k}", lw=1.2,
                            label=f"layer {k + 1} {METHOD_LABEL[method]}")
        axes[0][j].set(title=f"{row['label']}: synthesizer loss", yscale="log", xlabel="iteration")
        axes[1][j].set(title=f"{row['label']}: cos(ĝ, target)", xlabel="iteration")
        axes[1][j].set_ylim(top=1.0)
    axes[0][0].set_ylabel("L2 to bootstrapped target")
    axes[1][0].set_ylabel("cosine similarity")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
