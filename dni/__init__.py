"""dni: Decoupled Neural Interfaces using Synthetic Gradients (Jaderberg et al. 2016, arXiv:1608.05343).

Add DNI to your own model, keeping your loss, optimizer and loop:

    import dni
    self.interface = dni.DNI(shape=(256,), context_features=10)  # in __init__: a synthesizer for h
    h = self.interface(h, context=F.one_hot(y, 10))               # in forward, anywhere
    optimizer = torch.optim.Adam(model.parameters())              # as before: it now holds the synthesizer
    loss.backward(); optimizer.step()                             # as before: one step updates everything

Or cut a network into stages and take decoupled steps, as the paper's experiments do:
`dni.dni_step(dni.DNINet(stages=..., synthesizers=...), optimizer, None, x, y)`.

Or, in the truncated-BPTT loop of a recurrent model (section 3.2):

    sg = dni.RecurrentDNI(features=2 * hidden)     # a synthesizer for the state, here nn.LSTM's (h, c)
    state = sg.begin(state)                        # at each window's start
    out, state = lstm(x, state)                    # as before; loss from out
    state = sg.backward(loss, state)               # instead of loss.backward(); the end state, detached

Glossary (paper, section 2):
- stage: a part of the network f_i between two interfaces; the unit DNI decouples. The last
  stage ends in the loss; every other one learns from a synthetic gradient alone.
- trigger: the activation h_i a synthesizer reads (a stage's output, detached).
- synthesizer M_i: a small network predicting the gradient of the loss w.r.t. its trigger,
  per example (the gradient of the batch-summed loss). Its last layer starts at zero, so its
  first prediction is exactly zero. Dense for (F,) triggers, conv for (C, H, W), per-position
  for (T, D) sequences (what a 2-D shape is read as), 1-D conv for (C, L) channels over time
  (kind="conv1d"), or any module with forward(trigger, context).
- cut: the place of an interface in the forward. Every use of h above it must go through the
  interface: a gradient reaching h by another path (a skip connection around it, a second use of
  h) would reach the layers below beside the synthetic one, so the backward raises an error
  naming the interface (DNI(..., allow_leaks=True) allows it on purpose). Weights tied across a
  cut (one tensor used below and above it) cannot be seen from h and are not supported.
- synthetic gradient g_hat_i = M_i(h_i, c): what the layers below the interface backpropagate
  instead of the true gradient, so they update without waiting for the layers above.
- context c: extra input of the synthesizer; the one-hot label under cDNI ("conditional DNI").
  Any tensor; it is used in the trigger's dtype.
- bootstrapped target: what M_i learns to predict, s * dL/dh_i as the layers above send it back.
  Those layers learn from their own synthetic gradient, so the target is itself bootstrapped
  from M_{i+1}'s prediction. s, the loss scale, is the batch size for a batch-mean loss.
- window: T steps of a recurrent model trained by truncated BPTT. The cut between two windows is
  the state there (a tensor or a tuple such as (h, c)), the trigger of `RecurrentDNI`'s
  synthesizer; its synthetic gradient, times a factor (0.1 in the paper), enters the window
  with the window's loss (section 3.2).
- loss multiplier k: a factor the loss carries beyond its reduction (a GradScaler's scale, 1 / n
  over n accumulated micro-batches); DNI(..., loss_multiplier=k) keeps the target free of it.

Modules (the library; it needs torch alone): dni.interface (the update and `DNI`), dni.stages
(the stage-wise `DNINet` and `dni_step`), dni.params (`param_groups`), dni.synthesizers,
dni.unlock (update and complete unlock, section 3.3), dni.local (`LocalLoss` and the stage-wise
`local_step`: local auxiliary losses) and dni.recurrent
(synthetic gradients at truncated-BPTT window boundaries, section 3.2).
The application that trains with them (configs, data, the paper's networks, the training loops,
run folders, plots) is the separate package dnilab; the paper's tables, searches and benchmarks
live in experiments/. Both import dni as a user would; dni imports neither.
"""

# Exports load on first use, so `import dni.errors` stays free of torch.
_EXPORTS = {
    "DNI": "dni.interface", "synthesize": "dni.interface", "synthetic_gradient": "dni.interface",
    "synthesizer_objective": "dni.interface", "resolve_loss_scale": "dni.interface",
    "InterfaceError": "dni.interface", "resolve_loss_multiplier": "dni.interface",
    "DNINet": "dni.stages", "StepStats": "dni.stages", "dni_step": "dni.stages", "backprop_step": "dni.stages",
    "run_stages": "dni.stages", "stage_update": "dni.stages", "loss_update": "dni.stages",
    "synthesizer_update": "dni.stages",
    "param_groups": "dni.params",
    "DenseSynthesizer": "dni.synthesizers", "ConvSynthesizer": "dni.synthesizers",
    "SequenceSynthesizer": "dni.synthesizers", "make_synthesizer": "dni.synthesizers",
    "synthesizer_loss": "dni.synthesizers", "Conv1dSynthesizer": "dni.synthesizers", "zero_head": "dni.synthesizers",
    "LocalLoss": "dni.local", "local_step": "dni.local", "local_update": "dni.local", "make_head": "dni.local",
    "RecurrentDNI": "dni.recurrent",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dni' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
