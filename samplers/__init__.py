"""Samplers: draw K generations per prompt from a policy.

They implement `alignment.interfaces.Sampler`, the shape the loop talks to; `HFSampler`
(transformers, runs on CPU) is the default backend.
"""

from __future__ import annotations

from alignment.interfaces import Generation, Sampler
from samplers.hf import HFSampler

__all__ = ["Generation", "HFSampler", "Sampler"]
