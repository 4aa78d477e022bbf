"""Core library of quark-alt: records, models, control tokens, quantiles, losses, the loop.

Nothing here parses command lines or knows a concrete reward model; `experiments/` wires it up.
"""
