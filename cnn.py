"""The CNN of `main.py --model_type cnn`, trained with plain backprop: the baseline."""
from dnilab.train import main

if __name__ == "__main__":
    main(prog="cnn.py", description=__doc__, model_type="cnn", method="backprop")
