"""Two networks at two timescales (the paper's multi-network system, section 3): `python timescales.py --method dni --span 4`.

A fast RNN (A) reads an MNIST digit every tick; a slow RNN (B) reads A's last T outputs every T
ticks and counts the odd digits among them. --method backprop | dni | frozen | own_task; --processes 2
runs A and B as two processes, one core each. Writes results/timescales/<name>/.
"""
from dnilab.cli import main_guard, parse_config
from dnilab.timescales import TimescalesConfig
from dnilab.timescales_train import run

if __name__ == "__main__":
    config = parse_config(TimescalesConfig, prog="timescales.py",
                          description="Two RNNs at two timescales, A taught by B through backprop, DNI or not at all.")
    main_guard(run, config)
