"""The FCN of `main.py --model_type mlp`, trained with plain backprop: the baseline."""
from dnilab.train import main

if __name__ == "__main__":
    main(prog="mlp.py", description=__doc__, model_type="mlp", method="backprop")
