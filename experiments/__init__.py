"""experiments: the paper's experiments, built on the `dni` library.

Each module is a command that trains, tabulates or plots, and writes its results under results/:

    python -m experiments.table1               # Table 1: backprop / DNI / cDNI x FCN / CNN, seeds 0 1 2
    python -m experiments.search               # synthesizer and learning-rate search (validation split)
    python -m experiments.deviations           # what each of our deviations from the paper's preset earns
    python -m experiments.unlock_experiments   # update unlocking: stochastic updates, complete unlock (Fig. 7)
    python -m experiments.recurrent_table      # recurrent DNI on the copy tasks (section 3.2)
    python -m experiments.bench                # speed of pipelined DNI against locked backprop
    python -m experiments.report --docs        # the generated tables of README.md and docs/ from results/

They import `dni` and `dnilab` as a user would (the training loop `dnilab.train.run`, its models, data and
run folders); nothing in `dni` imports them. docs/ holds each experiment's commands, results
files and discussion.
"""
