"""A character-level LSTM language model on Debian's fortunes, trained by truncated BPTT with or
without recurrent DNI (paper, section 3.2): `python charlm.py --method dni --truncation 3`.

`--method bptt` is truncated BPTT at the same truncation; `--method dni_aux` is DNI + Aux.
Writes the run folder results/charlm/<method>_T<T>_s<seed>/ (or --out).
"""
from dnilab.charlm import CharLMConfig, run
from dnilab.cli import main_guard, parse_config

if __name__ == "__main__":
    config = parse_config(CharLMConfig, prog="charlm.py",
                          description="A character-level LSTM on fortunes: truncated BPTT, DNI or DNI + Aux.")
    main_guard(run, config)
