"""Recurrent DNI on Copy / Repeat Copy (paper, section 3.2): `python rnn.py --task copy --truncation 3 --dni True`.

`--dni False` is truncated BPTT at the same truncation. Writes results/rnn/<name>/.
"""
from dnilab.cli import main_guard, parse_config
from dnilab.recurrent import RecurrentConfig, run

if __name__ == "__main__":
    config = parse_config(RecurrentConfig, prog="rnn.py",
                          description="An LSTM on Copy / Repeat Copy with truncated BPTT, with or without DNI.")
    main_guard(run, config)
