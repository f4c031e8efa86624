"""dnilab: the application that trains with the dni library and reproduces the paper's experiments
(Jaderberg et al. 2016, section 3).

dnilab.config and dnilab.cli (a run's settings and its flags), dnilab.data (offline MNIST,
Fashion-MNIST and CIFAR-10, the validation split), dnilab.models (the paper's networks) and
dnilab.presets (their defaults), dnilab.parts (what a run assembles: seed, device, net, optimizers,
evaluation), dnilab.steps (the update a batch gets), dnilab.train (the training loop; main.py,
mlp.py and cnn.py), dnilab.pipeline (the same loop, one worker process per group of stages),
dnilab.runs (run folders and checkpoints), dnilab.plots, dnilab.copy_tasks and dnilab.recurrent
(the recurrent run of rnn.py). It may import dni; dni never imports it.
"""
