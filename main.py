"""Train on MNIST with every stage decoupled by a DNI (or cDNI with --conditioned True).

--method backprop and --method local (local auxiliary losses at the same cuts) are the baselines.

    python main.py --model_type mlp
    python main.py --model_type cnn --conditioned True
    python main.py --model_type mlp --method local
"""
from dnilab.train import main

if __name__ == "__main__":
    main(prog="main.py", description=__doc__.splitlines()[0])
