"""The `algorithm:` switch: one explicit mapping from a config name to its update.

Adding a method means writing a class with the shape of `base.Algorithm`, listing it here, and
naming the config sections it reads in `alignment.config.ALGORITHM_SECTIONS`.
"""

from __future__ import annotations

from alignment.algorithms.alt_feedback import AltFeedback
from alignment.algorithms.base import Algorithm, AlgorithmFactory, Models
from alignment.algorithms.best_of_n import BestOfN
from alignment.algorithms.conditional import AltRM, Quark, RejectionSampling
from alignment.algorithms.ppo import PPO
from alignment.algorithms.trl_baselines import GRPO, RLOO

ALGORITHMS: dict[str, AlgorithmFactory] = {
    "quark": Quark,
    "rft": RejectionSampling,
    "alt-rm": AltRM,
    "alt-feedback": AltFeedback,
    "ppo": PPO,
    "best-of-n": BestOfN,
    "grpo": GRPO,
    "rloo": RLOO,
}

__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmFactory", "Models"]
