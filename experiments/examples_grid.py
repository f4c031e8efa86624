"""The examples' grid: DNI, cDNI and local losses against backprop in a ResNet and a Transformer.

ResNet-18 on Fashion-MNIST for 10 epochs (examples/resnet_fashion.py) and the character-level GPT
on Debian's fortunes for 3000 steps (examples/char_gpt.py). With one cut in the middle: backprop,
DNI, cDNI (Jaderberg et al. 2016, section 2) and local losses (Decoupled Greedy Learning,
Belilovsky et al. 2020), seeds 0, 1 and 2; with three cuts (one between every pair of residual
groups or blocks): cDNI and local losses, seed 0. DNI's and cDNI's synthesizers and the local heads
take the settings that experiments/examples_search.py chose on validation for their method
(--settings, results/examples_search.json), at one cut and at three; where it has chosen none yet
(it has not run, or not to the end), the example's defaults, and the grid says so. Every other
setting is the example's default. Then results/examples.md (examples/table.py).

    python -m experiments.examples_grid --jobs 2          # trains what is missing, then the table
    python -m experiments.examples_grid --list            # the runs, finished or not; trains nothing

Resumable: a finished run folder (results/examples/<name>/summary.json) is skipped; one that was
started and not finished is trained again from its start (the examples keep no checkpoint). A
finished run trained with other settings (say, before the search chose) is refused by name until
--retrain_stale.
"""
import json
import subprocess
import sys
from pathlib import Path

from dnilab.cli import OneLineParser
from dnilab.example_runs import run_name
from experiments.example_grids import ROOT, add_options, results_dir, train_missing

BUDGETS = {"resnet_fashion": ("epochs", 10), "char_gpt": ("steps", 3000)}
ONE_CUT = [(method, 1, seed) for method in ("backprop", "dni", "cdni", "local") for seed in (0, 1, 2)]
THREE_CUTS = [(method, 3, 0) for method in ("cdni", "local")]
SEARCHED = ("dni", "cdni", "local")  # the methods whose settings the search chooses


def chosen_flags(path):
    """{(example, method): {flag: value}} of the settings chosen in the search's JSON at `path`
    (experiments.examples_search), and the [(example, method)] it has chosen nothing for yet."""
    search = json.loads(Path(path).read_text()) if Path(path).exists() else {"examples": {}}
    chosen, missing = {}, []
    for example in BUDGETS:
        for method in SEARCHED:
            cell = search["examples"].get(example, {}).get("methods", {}).get(method, {})
            if cell.get("chosen") is None:
                missing.append((example, method))
            else:
                chosen[example, method] = cell["flags"]
    return chosen, missing


def grid(results, chosen=None):
    """[(run folder, argv of its command)], ResNet's runs first; `chosen`: {(example, method): {flag:
    value}} added to the runs of that method (chosen_flags)."""
    runs = []
    for example, (budget, length) in BUDGETS.items():
        for method, cuts, seed in ONE_CUT + THREE_CUTS:
            folder = Path(results) / run_name(example, method, cuts, seed)
            flags = [x for k, v in (chosen or {}).get((example, method), {}).items() for x in (f"--{k}", str(v))]
            args = [f"examples/{example}.py", "--method", method, "--seed", str(seed), f"--{budget}", str(length),
                    *flags, "--out", str(folder)] + ([] if method == "backprop" else ["--cuts", str(cuts)])
            runs.append((folder, args))
    return runs


def main(argv=None):
    p = OneLineParser(description=__doc__.split("\n")[0])
    add_options(p, "results/examples")
    p.add_argument("--settings", default="results/examples_search.json",
                   help="the search's choices (default: results/examples_search.json)")
    args = p.parse_args(argv)
    results = results_dir(p, args)
    settings = Path(args.settings) if Path(args.settings).is_absolute() else ROOT / args.settings
    try:
        chosen, missing = chosen_flags(settings)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        p.error(f"--settings {args.settings} is not the search's JSON ({type(error).__name__}: {error})")
    if missing:
        print(f"no settings chosen yet in {args.settings} for {', '.join(f'{e} {m}' for e, m in missing)}: "
              "their runs keep the example's defaults", file=sys.stderr)
    failed = train_missing(p, args, grid(results, chosen))
    if failed is None:  # --list
        return
    subprocess.run([sys.executable, "examples/table.py", "--results", str(results),
                    "--out", str(results.parent / "examples.md")], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    print(f"wrote {results.parent / 'examples.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
