"""Every configuration dataclass and its defaults: the one place where defaults live."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from alignment.conditioning import Placement
from alignment.errors import UserError
from alignment.losses import KLDirection

Check = tuple[float, str, Callable[[float], bool]]


def refuse_out_of_range(section: str, checks: dict[str, Check]) -> None:
    """Raise for the first `name: (value, rule, ok)` whose value is not finite or not `ok`.

    Written so that NaN fails too: every comparison with NaN is false.
    """
    for name, (value, rule, ok) in checks.items():
        if not (math.isfinite(value) and ok(value)):
            raise ValueError(f"{section}.{name} must be {rule}, got {value}")


@dataclass
class SamplingConfig:
    """How generations are drawn (ALT samples its training data with T 0.9, top_p 0.9)."""

    temperature: float = 0.9
    top_p: float = 0.9
    max_new_tokens: int = 64
    max_prompt_tokens: int = 512
    """Longer prompts are cut from the middle, keeping the head and the ending."""
    keep_tail_tokens: int = 64
    """How much of a prompt's ending survives a middle cut (it holds `TL;DR:`)."""
    prompt_batch_size: int = 8
    """Prompts prefilled together (each then decodes K samples)."""
    stop_at_newline: bool = False
    """Also stop at a newline: TL;DR summaries are one line; ALT stops at EOS only."""
    backend: Literal["hf", "vllm"] = "hf"
    """hf: transformers, any device (samplers/hf.py); vllm: vLLM, the `vllm` extra."""
    vllm_tensor_parallel_size: int = 1
    """vLLM only: devices one engine splits the policy across (each process's own engine)."""
    vllm_gpu_memory_utilization: float = 0.4
    """vLLM only: the share of each GPU its engine may take; the policy's trainer needs the rest."""

    def __post_init__(self) -> None:
        # `not x > 0` rather than `x <= 0`: NaN fails every comparison and must be refused too.
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError("sampling.temperature must be > 0 (use greedy decoding instead)")
        if not 0 < self.top_p <= 1:
            raise ValueError("sampling.top_p must be in (0, 1]")
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"sampling.backend must be hf or vllm, got {self.backend!r}")
        for name in (
            "max_new_tokens",
            "max_prompt_tokens",
            "keep_tail_tokens",
            "prompt_batch_size",
            "vllm_tensor_parallel_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"sampling.{name} must be >= 1")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError("sampling.vllm_gpu_memory_utilization must be in (0, 1]")


@dataclass
class ModelConfig:
    policy: str = "embedded:smollm2-135m-instruct"
    """Initial policy: hub id, local path or embedded: name."""
    reference: str | None = None
    """Reference policy for KL and perplexity; None = the initial policy."""
    dtype: str = "float32"
    device: str | None = None
    """None = cuda when available, else cpu."""
    trust_remote_code: bool = False
    reference_quantization: Literal["8bit", "4bit"] | None = None
    """Load the frozen reference in 8 or 4 bits through bitsandbytes (CUDA or CPU)."""


@dataclass
class DataConfig:
    train_prompts: str = "demo"
    """Prompt set (JSONL); 'demo' = the TL;DR-format set shipped in experiments/data."""
    eval_prompts: str | None = None
    """Held-out prompt set; None = the last `num_eval_prompts` rows of train_prompts."""
    num_eval_prompts: int = 8
    prompts_per_iteration: int = 16
    """Prompts drawn (without replacement, seeded per iteration) for each iteration."""
    samples_per_prompt: int = 10
    """Generations drawn per prompt per iteration (ALT: 96); with prompts_per_iteration, the
    sampling budget every algorithm is compared at."""


@dataclass
class RewardConfig:
    name: str = "embedded:minilm-l6"
    """Reward spec understood by rewards.load_reward (name, path or module:function)."""
    batch_size: int = 32
    quantization: Literal["8bit", "4bit"] | None = None
    """Load the reward model in 8 or 4 bits through bitsandbytes (CUDA or CPU; classifier and
    seq2seq rewards)."""
    options: dict[str, str] = field(default_factory=dict)
    """Backend keyword arguments, e.g. {tokenizer: EleutherAI/gpt-j-6b} for the CarperAI RM."""
    subtract_reference: bool = False
    """Train on reward(sample) - reward(the prompt's reference summary), as trlx's TL;DR PPO;
    scored.jsonl keeps the raw rewards too, and evaluation reports raw rewards."""


@dataclass
class PoolConfig:
    """Quantiles and the data pool, shared by every reward-ranked method (Quark, RFT, ALT-RM).

    ALT's defaults: K = 5 per-prompt quantiles, the whole pool replaced each iteration, two
    samples per prompt and quantile drawn for training.
    """

    num_quantiles: int = 5
    scope: Literal["prompt", "global"] = "prompt"
    """prompt: rank each prompt's generations among themselves (ALT); global: over the pool."""
    num_samples_per_quantile: int = 2
    drop_factor: float = 1.0
    """Fraction of the pool dropped before adding an iteration's samples (ALT: 1.0)."""


@dataclass
class ConditioningConfig:
    """Where the control goes (the controls themselves follow from the algorithm)."""

    placement: Placement = "prefix"
    """prefix: ALT's layout; suffix: right before the generation (see conditioning.py)."""


@dataclass
class FeedbackConfig:
    """ALT-RM: each quantile's feedback phrase, written before the prompt as text.

    ALT's defaults: quantile k of 5 reads `Excellent.`, `Good.`, `Mediocre.`, `Bad.`,
    `Horrible.`, and the input is `"<phrase> input: <prompt>"`.
    """

    phrases: list[str] = field(
        default_factory=lambda: ["Excellent.", "Good.", "Mediocre.", "Bad.", "Horrible."]
    )
    """One per quantile, best first (as many as pool.num_quantiles)."""
    template: str = "{phrase} input: "
    """The control text of a phrase, placed at conditioning.placement."""


FEEDBACK_TEMPLATES = {"alt": "feedback: {feedback} input: ", "categories": "{feedback}.\n\n"}
"""ALT's inputs: `feedback: <text> input: <prompt>` (LMU) and `<category>.\n\n<prompt>` (LMC and
SteerLM, whose attribute strings take the category's place)."""


@dataclass
class FeedbackProviderConfig:
    """alt-feedback: who writes the feedback (an LLM), how its reply is read, what trains.

    ALT-LMU's defaults: gpt-3.5-turbo-0125 at temperature 0 through an OpenAI-compatible
    endpoint, asked `rewards.feedback.ALT_SUMMARY_PROMPT`, the reply read as Analysis /
    Feedback / Score 0..3. The category labels and SteerLM attribute strings default to the
    presets in rewards/feedback.py (ALT-LMC's Anthropic HH categories), asked with the shipped
    10-shot request `rewards.feedback.ALT_LMC_PROMPT` (rewards/prompts/alt_lmc_10shot.txt: our
    examples on real HH-RLHF turns, not ALT's text).
    """

    kind: Literal["hf", "chat"] = "chat"
    """chat: an OpenAI-compatible endpoint (cached, retried); hf: a local causal or seq2seq
    model, greedy."""
    model: str = "gpt-3.5-turbo-0125"
    base_url: str = "https://api.openai.com/v1"
    """chat only: the API root."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """chat only: NAME of the environment variable holding the key; null sends none."""
    cache_dir: str | None = None
    """chat only: cached replies; null = `<out_dir>/feedback_cache`."""
    max_workers: int = 8
    timeout: float = 60.0
    max_retries: int = 5
    temperature: float = 0.0
    """chat only (hf decodes greedily); ALT: 0."""
    max_new_tokens: int = 256
    """Reply length (chat: max_tokens); ALT-LMU's three answers take ~100 tokens."""
    batch_size: int = 8
    """hf only: replies generated together."""
    line_breaks: bool = False
    """hf only: flan-t5-dolly's `<_LB_>` / `<_T_>` convention for newlines and tabs."""
    parser: Literal["alt", "categories", "steerlm"] = "alt"
    """alt: ALT-LMU's reply; categories: one of `categories` (ALT-LMC); steerlm: a category
    mapped to its attribute string."""
    categories: list[str] | None = None
    """Category labels, best first; null = ALT-LMC's HH categories."""
    attributes: list[str] | None = None
    """steerlm: each category's attribute string (`harmful:0,helpful:2`), in `categories`
    order; null = SteerLM's HH strings."""
    prompt: str | None = None
    """The request, with `{prompt}` (the whole prompt) and `{completion}`; null = ALT-LMU's
    summary prompt (parser alt) or, for categories and steerlm with the HH presets, the shipped
    10-shot ALT-LMC request (rewards/prompts/alt_lmc_10shot.txt, filled with the prompt's last
    `Human:` turn); required with categories of your own."""
    system: str | None = None
    """System message sent with `prompt`."""
    template: str | None = None
    """The policy's condition, with `{feedback}`; null = FEEDBACK_TEMPLATES by parser."""
    exemplar: str | None = None
    """The feedback sampled and evaluated with from iteration 2 on; null = the best category,
    or for free text the most frequent top-score feedback of iteration 1 (docs/algorithm.md)."""

    @property
    def condition_template(self) -> str:
        if self.template is not None:
            return self.template
        return FEEDBACK_TEMPLATES["alt" if self.parser == "alt" else "categories"]

    def __post_init__(self) -> None:
        refuse_out_of_range(
            "feedback_provider",
            {
                "max_workers": (self.max_workers, ">= 1", lambda v: v >= 1),
                "max_new_tokens": (self.max_new_tokens, ">= 1", lambda v: v >= 1),
                "batch_size": (self.batch_size, ">= 1", lambda v: v >= 1),
                "timeout": (self.timeout, "> 0", lambda v: v > 0),
                "max_retries": (self.max_retries, ">= 0", lambda v: v >= 0),
                "temperature": (self.temperature, ">= 0", lambda v: v >= 0),
            },
        )
        if self.parser == "alt" and (self.categories is not None or self.attributes is not None):
            raise ValueError("feedback_provider.categories and .attributes need parser categories")
        if self.attributes is not None and self.parser != "steerlm":
            raise ValueError("feedback_provider.attributes needs parser steerlm")
        if (self.attributes is None) != (self.categories is None) and self.parser == "steerlm":
            raise ValueError(
                "feedback_provider.categories and .attributes go together with parser steerlm "
                "(one attribute string per category), or neither for the HH presets"
            )
        if self.attributes is not None and len(self.attributes) != len(self.categories or []):
            raise ValueError("feedback_provider.attributes needs one string per category")
        if self.categories is not None and self.prompt is None:
            raise ValueError(
                "feedback_provider.prompt is required with categories of your own (the shipped "
                "prompts ask for ALT-LMU's reply or for ALT-LMC's HH categories)"
            )
        if "{feedback}" not in self.condition_template:
            raise ValueError("feedback_provider.template must contain '{feedback}'")
        if self.exemplar is not None and not self.exemplar.strip():
            raise ValueError("feedback_provider.exemplar must be non-empty (or null)")


@dataclass
class LoraConfig:
    """LoRA adapters through peft for the conditional trainer (`train.lora`; null = off).

    The base model is frozen; the adapters and the control tokens' embedding rows train (peft's
    `trainable_token_indices`). One adapter per iteration: it starts fresh (B = 0, so the model is
    unchanged), trains, and is merged into the weights at the end of the iteration ("LoRA per
    iteration"); the next iteration starts a new one on the merged weights. The optimizer
    therefore restarts each iteration, as `train.reset_optimizer` (required with LoRA) does
    anyway, so a resumed run continues exactly. Several iterations add up to a rank of
    r x iterations at most. `checkpoint` says what each iteration's checkpoint holds.
    """

    r: int = 16
    alpha: float = 32.0
    """The update is scaled by alpha / r."""
    dropout: float = 0.05
    target_modules: list[str] | None = None
    """Module names to adapt; null = peft's default for the architecture: the attention
    projections `q_proj`, `v_proj` for GPT-J and Llama, `c_attn` (query, key and value in one
    Conv1D) for GPT-2."""
    checkpoint: Literal["merged", "adapter"] = "merged"
    """merged: a plain model folder, the adapter merged in (GPT-J 6B in bfloat16: 12.1 GB an
    iteration). adapter: peft's adapter alone (r 16 on q_proj, v_proj, in float32: 29 MB) plus
    the name of its base, the previous checkpoint (iteration 1: `model.policy`); loading one
    follows the bases and merges the adapters into the model a merged checkpoint would hold, so
    it needs every earlier checkpoint of the run and `model.policy` (docs/algorithm.md 19)."""

    def __post_init__(self) -> None:
        if self.checkpoint not in ("merged", "adapter"):
            raise ValueError(
                f"train.lora.checkpoint must be merged or adapter, got {self.checkpoint!r}"
            )
        refuse_out_of_range(
            "train.lora",
            {
                "r": (self.r, ">= 1", lambda v: v >= 1),
                "alpha": (self.alpha, "> 0", lambda v: v > 0),
                "dropout": (self.dropout, "in [0, 1)", lambda v: 0 <= v < 1),
            },
        )
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("train.lora.target_modules must name modules (or be null)")


UNFROZEN_LAYERS_RATIO = 0.3
"""ALT's: int(0.3 * 28) = 8 of GPT-J's blocks train."""


@dataclass
class TrainConfig:
    """The conditional-LM objective and its optimizer (ALT's values; see docs/algorithm.md)."""

    learning_rate: float = 2e-5
    adam_betas: tuple[float, float] = (0.8, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 3e-7
    warmup_ratio: float = 0.05
    num_epochs: int = 2
    batch_size: int = 8
    entropy_coef: float = 0.06
    mask_control_logits: bool = True
    """Leave the control tokens out of the softmax, as the sampler does. With tied embeddings
    (GPT-2, SmolLM2) the NLL otherwise pushes every control row down by the same output-side
    gradient, which swamps the input-side signal that tells the rows apart. False = ALT exactly."""
    control_lr_multiplier: float = 1.0
    """Scale the optimizer step of the control-token embedding rows (ALT: 1)."""
    kl_coef: float = 0.0
    """0 disables the KL term and skips loading a reference for training."""
    kl_direction: KLDirection = "ref_policy"
    """ref_policy: KL(ref || policy) as ALT; policy_ref: original Quark's direction."""
    unfrozen_layers_ratio: float = UNFROZEN_LAYERS_RATIO
    """Top fraction of transformer blocks that train; embeddings, final norm and head always do.
    Not read with `lora` (the base is frozen): another value with it is an error."""
    max_grad_norm: float | None = None
    batches_by_prompt: bool = False
    """Batch each prompt's items together (prompts shuffled, then items) instead of one uniform
    shuffle (ALT). Each prompt is then run once per batch for all its items: ~4x the training
    items per second with suffix placement, ~2x with prefix, at the price of less diverse
    batches (benchmarks/README.md). Same loss for the same batch either way."""
    reset_optimizer: bool = True
    """Fresh optimizer state and warm-up every iteration (ALT) instead of one schedule over the
    whole run. Either way the optimizer, scheduler and RNG state are checkpointed, so a resumed
    run continues exactly."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of the top blocks (`train.lora={}` for the defaults)."""

    def __post_init__(self) -> None:
        """Refuse values AdamW or the schedule would only reject (or turn into NaN weights) after
        minutes of sampling; comparisons are written so that NaN fails them."""
        checks = {
            "learning_rate": (self.learning_rate, "> 0", lambda v: v > 0),
            "adam_eps": (self.adam_eps, "> 0", lambda v: v > 0),
            "weight_decay": (self.weight_decay, ">= 0", lambda v: v >= 0),
            "warmup_ratio": (self.warmup_ratio, "in [0, 1]", lambda v: 0 <= v <= 1),
            "entropy_coef": (self.entropy_coef, ">= 0", lambda v: v >= 0),
            "kl_coef": (self.kl_coef, ">= 0", lambda v: v >= 0),
            "control_lr_multiplier": (self.control_lr_multiplier, ">= 0", lambda v: v >= 0),
            "unfrozen_layers_ratio": (
                self.unfrozen_layers_ratio,
                "in [0, 1]",
                lambda v: 0 <= v <= 1,
            ),
        }
        for i, beta in enumerate(self.adam_betas):
            checks[f"adam_betas[{i}]"] = (beta, "in [0, 1)", lambda v: 0 <= v < 1)
        if self.max_grad_norm is not None:
            checks["max_grad_norm"] = (self.max_grad_norm, "> 0 (or null)", lambda v: v > 0)
        refuse_out_of_range("train", checks)
        if self.lora is not None:
            if self.unfrozen_layers_ratio != UNFROZEN_LAYERS_RATIO:
                raise ValueError(
                    "train.unfrozen_layers_ratio does not apply with train.lora (the base model "
                    "is frozen and the adapters train): remove one of them"
                )
            if not self.reset_optimizer:
                raise ValueError(
                    "train.reset_optimizer=false needs one optimizer for the whole run, but "
                    "train.lora starts a new adapter (and so a new optimizer) every iteration"
                )


@dataclass
class PPOConfig:
    """PPO with a value head (`algorithm: ppo`): trlx's GPT-J TL;DR values (docs/algorithm.md
    section 14), except where a comment says otherwise."""

    learning_rate: float = 5e-6
    """Constant: trlx's cosine schedule has eta_min = lr, so it never decays."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    ppo_epochs: int = 4
    """Passes over one iteration's episodes."""
    batch_size: int = 4
    """Episodes per optimizer step (trlx train.batch_size)."""
    init_kl_coef: float = 0.1
    target_kl: float | None = 6.0
    """KL (nats per episode) the adaptive controller steers to; null: the coefficient is fixed."""
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.2
    cliprange_reward: float | None = 10.0
    """Scores are clipped to +-this before shaping; null: no clipping."""
    whiten_advantages: bool = True
    unfrozen_layers_ratio: float = 0.3
    """Top fraction of blocks that train: int(0.3 * 28) = 8 of GPT-J's, trlx's 8."""
    freeze_embeddings: bool = True
    """trlx freezes the input embeddings (with tied embeddings, the output head too)."""
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        """Refuse values that would only fail (or silently do nothing) mid-run."""
        checks = {
            "learning_rate": (self.learning_rate, "> 0", lambda v: v > 0),
            "adam_eps": (self.adam_eps, "> 0", lambda v: v > 0),
            "weight_decay": (self.weight_decay, ">= 0", lambda v: v >= 0),
            "ppo_epochs": (self.ppo_epochs, ">= 1", lambda v: v >= 1),
            "batch_size": (self.batch_size, ">= 1", lambda v: v >= 1),
            "init_kl_coef": (self.init_kl_coef, ">= 0", lambda v: v >= 0),
            "kl_horizon": (self.kl_horizon, ">= 1", lambda v: v >= 1),
            "gamma": (self.gamma, "in [0, 1]", lambda v: 0 <= v <= 1),
            "lam": (self.lam, "in [0, 1]", lambda v: 0 <= v <= 1),
            "cliprange": (self.cliprange, "> 0", lambda v: v > 0),
            "cliprange_value": (self.cliprange_value, "> 0", lambda v: v > 0),
            "vf_coef": (self.vf_coef, ">= 0", lambda v: v >= 0),
            "unfrozen_layers_ratio": (
                self.unfrozen_layers_ratio,
                "in (0, 1]",
                lambda v: 0 < v <= 1,
            ),
        }
        for i, beta in enumerate(self.adam_betas):
            checks[f"adam_betas[{i}]"] = (beta, "in [0, 1)", lambda v: 0 <= v < 1)
        for name in ("target_kl", "cliprange_reward", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None:
                checks[name] = (value, "> 0 (or null)", lambda v: v > 0)
        refuse_out_of_range("ppo", checks)


@dataclass
class BestOfNConfig:
    """Best-of-N: no training; the initial policy's best of N samples by the reward model."""

    n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """The Ns to report. One pool of max(n) samples per eval prompt serves them all (see
    alignment/best_of_n.py), so the largest N sets the sampling cost."""

    def __post_init__(self) -> None:
        if not self.n or min(self.n) < 1 or len(set(self.n)) != len(self.n):
            raise ValueError(f"best_of_n.n must be distinct integers >= 1, got {self.n}")


@dataclass
class GroupRLConfig:
    """What GRPO and RLOO share: both run through trl, which samples `data.samples_per_prompt`
    generations of each prompt itself and learns from their rewards relative to each other.

    trl's defaults except where said: one optimizer step per `prompts_per_step` prompts, so an
    iteration's `data.prompts_per_iteration` prompts are used once (the same sampling budget as
    every algorithm), and a new trl trainer (AdamW, linear decay) every iteration.
    """

    section: ClassVar[str]
    learning_rate: float = 1e-6
    beta: float = 0.0
    """KL coefficient to the reference model (0: no reference is used)."""
    num_iterations: int = 1
    """Optimizer passes over each batch of generations (GRPO's mu); >1 reuses them, clipped."""
    epsilon: float = 0.2
    """Clip range of the importance ratio (matters only with num_iterations > 1)."""
    prompts_per_step: int = 4
    """Prompts per optimizer step (their generations form one trl generation batch); must divide
    data.prompts_per_iteration."""
    batch_size: int = 8
    """Generations per forward pass; gradients accumulate over prompts_per_step x
    data.samples_per_prompt of them, which it must divide."""
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    """trl turns it on by default; off here, where the models are small (on for GPT-J)."""

    def __post_init__(self) -> None:
        checks = {
            "learning_rate": (self.learning_rate, "> 0", lambda v: v > 0),
            "beta": (self.beta, ">= 0", lambda v: v >= 0),
            "epsilon": (self.epsilon, "> 0", lambda v: v > 0),
            "max_grad_norm": (self.max_grad_norm, "> 0", lambda v: v > 0),
            "num_iterations": (self.num_iterations, ">= 1", lambda v: v >= 1),
            "prompts_per_step": (self.prompts_per_step, ">= 1", lambda v: v >= 1),
            "batch_size": (self.batch_size, ">= 1", lambda v: v >= 1),
        }
        refuse_out_of_range(self.section, checks)


@dataclass
class GrpoConfig(GroupRLConfig):
    """GRPO (DeepSeekMath): advantage = the reward standardized within its prompt's group."""

    section: ClassVar[str] = "grpo"
    beta: float = 0.04
    """The GRPO paper's KL coefficient (trl's default is 0): a learned reward needs the leash."""
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo"
    """How token losses are averaged (trl's default, dapo: over all tokens of the batch)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's reward std (group), the batch's, or not at all."""


@dataclass
class RlooConfig(GroupRLConfig):
    """RLOO: advantage = the reward minus the mean reward of the prompt's other generations."""

    section: ClassVar[str] = "rloo"
    beta: float = 0.05
    """trl's default: the KL to the reference is subtracted from the reward."""
    normalize_advantages: bool = False


@dataclass
class EvalConfig:
    samples_per_prompt: int = 4
    greedy: bool = True
    """Also decode greedily (one generation per prompt), as ALT validates."""
    conditioning_curve: bool = True
    """Reward-conditioned runs (quark, alt-rm): also sample under every control 0..K-1 and log
    the held-out reward of each and best minus worst, paired by prompt (whether the conditioning
    was learned). Sampled rewards only: K - 1 more sampling passes of the eval prompts."""


SHARED_SECTIONS = ("model", "data", "sampling", "reward", "eval")
ALGORITHM_SECTIONS: dict[str, tuple[str, ...]] = {
    "quark": ("pool", "conditioning", "train"),
    "rft": ("pool", "train"),
    "alt-rm": ("pool", "conditioning", "feedback", "train"),
    "alt-feedback": ("pool", "conditioning", "feedback_provider", "train"),
    "ppo": ("ppo",),
    "best-of-n": ("best_of_n",),
    "grpo": ("grpo",),
    "rloo": ("rloo",),
}
"""The config sections each algorithm reads besides the shared ones. A section written for one
algorithm in a run of another is an error: it would be silently ignored."""


@dataclass
class Config:
    """A whole run. YAML files and `key=value` overrides hold only what differs from here."""

    algorithm: str = "quark"
    """One of ALGORITHM_SECTIONS: quark, rft (rejection-sampling fine-tuning), alt-rm,
    alt-feedback (ALT-LMU / ALT-LMC / SteerLM: trained on LLM feedback), ppo, grpo, rloo (the
    last two through trl), best-of-n (no training: reward and KL of the best of N samples,
    iterations 0)."""
    out_dir: str = "runs/demo"
    iterations: int = 3
    seed: int = 42
    report_to: list[str] = field(default_factory=list)
    """Extra trackers through accelerate: 'tensorboard', 'wandb'."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    feedback_provider: FeedbackProviderConfig = field(default_factory=FeedbackProviderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    best_of_n: BestOfNConfig = field(default_factory=BestOfNConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    rloo: RlooConfig = field(default_factory=RlooConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHM_SECTIONS:
            raise ValueError(
                f"unknown algorithm {self.algorithm!r}; choose from {', '.join(ALGORITHM_SECTIONS)}"
            )
        if self.algorithm == "best-of-n":
            if self.iterations != 0:
                raise ValueError(
                    f"algorithm best-of-n trains nothing: set iterations: 0 (got "
                    f"{self.iterations}); it evaluates the initial policy and its best of "
                    "best_of_n.n samples"
                )
        elif self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        positive = {
            "data.prompts_per_iteration": self.data.prompts_per_iteration,
            "data.num_eval_prompts": self.data.num_eval_prompts,
            "data.samples_per_prompt": self.data.samples_per_prompt,
            "pool.num_quantiles": self.pool.num_quantiles,
            "pool.num_samples_per_quantile": self.pool.num_samples_per_quantile,
            "train.num_epochs": self.train.num_epochs,
            "train.batch_size": self.train.batch_size,
            "eval.samples_per_prompt": self.eval.samples_per_prompt,
            "reward.batch_size": self.reward.batch_size,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if self.algorithm == "alt-rm":
            phrases = self.feedback.phrases
            if len(phrases) != self.pool.num_quantiles or len(set(phrases)) != len(phrases):
                raise ValueError(
                    f"feedback.phrases must be {self.pool.num_quantiles} distinct phrases (one "
                    f"per quantile of pool.num_quantiles), got {phrases}"
                )
            if "{phrase}" not in self.feedback.template:
                raise ValueError("feedback.template must contain '{phrase}'")
        if self.algorithm == "alt-feedback" and (
            self.pool.num_quantiles != PoolConfig.num_quantiles
            or self.pool.scope != PoolConfig.scope
        ):
            raise ValueError(
                "pool.num_quantiles and pool.scope are not read by alt-feedback: its buckets are "
                "the feedback scores (num_samples_per_quantile is taken per score)"
            )
        if self.algorithm in ("grpo", "rloo"):
            self._check_group_batches(self.grpo if self.algorithm == "grpo" else self.rloo)
        if not 0.0 <= self.pool.drop_factor <= 1.0:
            raise ValueError("pool.drop_factor must be in [0, 1]")
        unknown = set(self.report_to) - {"tensorboard", "wandb"}
        if unknown:
            raise ValueError(f"report_to: unknown tracker(s) {sorted(unknown)}")

    def _check_group_batches(self, section: GroupRLConfig) -> None:
        """trl drops prompts that do not fill a generation batch: refuse budgets it would cut."""
        name, per_prompt = section.section, self.data.samples_per_prompt
        if per_prompt < 2:
            raise ValueError(
                f"data.samples_per_prompt must be >= 2 for {name} (its baseline is the group's "
                f"other generations), got {per_prompt}"
            )
        if self.data.prompts_per_iteration % section.prompts_per_step:
            raise ValueError(
                f"{name}.prompts_per_step ({section.prompts_per_step}) must divide "
                f"data.prompts_per_iteration ({self.data.prompts_per_iteration})"
            )
        if section.prompts_per_step * per_prompt % section.batch_size:
            raise ValueError(
                f"{name}.batch_size ({section.batch_size}) must divide {name}.prompts_per_step x "
                f"data.samples_per_prompt ({section.prompts_per_step * per_prompt})"
            )


# ---------------------------------------------------------------- loading and overrides


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- `base:` file <- YAML file ('-'/None: none) <- `a.b=value`; errors name keys."""
    tree: dict[str, Any] = {}
    if path is not None and str(path) != "-":
        tree = _read_tree(Path(path), ())
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key=value")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part!r} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, ValueError) as err:
            raise UserError(f"override {item!r}: invalid YAML value ({_one_line(err)})") from err
    try:
        config = _build(Config, tree, "")
        _check_sections(config.algorithm, tree)
    except ValueError as err:
        raise UserError(f"config {path or '<defaults>'}: {err}") from err
    return config


def _read_tree(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """One YAML file as a tree, on top of the file its `base:` key names (relative to it).

    A family of configs (experiments/configs/compare/) then states what they share once, and each
    file only what makes it different; the resolved config a run writes has no `base:`.
    """
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, ValueError) as err:  # ValueError: not UTF-8, or a bad date
        raise UserError(f"{path}: invalid YAML ({_one_line(err)})") from err
    if not isinstance(tree, dict):
        raise UserError(f"{path}: the top level must be a mapping")
    if "base" not in tree:
        return tree
    base = tree.pop("base")
    if not isinstance(base, str):
        raise UserError(f"{path}: 'base' must be the path of another config file")
    base_path = (path.parent / base).resolve()
    if base_path in chain or base_path == path.resolve():
        raise UserError(f"{path}: 'base: {base}' makes a cycle")
    return _merged(_read_tree(base_path, (*chain, path.resolve())), tree)


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (a key of `top` replaces; a section merges)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


MOVED = {
    "quark": "its settings moved: num_quantiles, scope, num_samples_per_quantile and drop_factor "
    "to 'pool', control_placement to 'conditioning.placement', samples_per_prompt to 'data'"
}


def _check_sections(algorithm: str, tree: dict[str, Any]) -> None:
    """Refuse a section that belongs to another algorithm (it would be silently ignored)."""
    own = ALGORITHM_SECTIONS[algorithm]
    for key in tree:
        owners = [name for name, sections in ALGORITHM_SECTIONS.items() if key in sections]
        if owners and algorithm not in owners:
            raise ValueError(
                f"section '{key}' is not read by algorithm '{algorithm}' (it reads "
                f"{', '.join(SHARED_SECTIONS + own)}; '{key}' belongs to {', '.join(owners)})"
            )


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _build(cls: type, tree: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key in tree:
        if key not in names:
            moved = f"; {MOVED[key]}" if not prefix and key in MOVED else ""
            raise ValueError(
                f"unknown key '{prefix}{key}' (known: {', '.join(sorted(names))}){moved}"
            )
    kwargs = {}
    for name, value in tree.items():
        key, hint = prefix + name, hints[name]
        # a section, or an optional one (`X | None`, e.g. train.lora) that is given
        section = hint if is_dataclass(hint) else next(filter(is_dataclass, get_args(hint)), None)
        if section is not None and (value is not None or section is hint):
            if not isinstance(value, dict):
                raise ValueError(f"'{key}' must be a section (mapping)")
            kwargs[name] = _build(section, value, key + ".")
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (UnionType, Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"'{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"'{key}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ValueError(f"'{key}' must be a list, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise ValueError(f"'{key}' must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
        return [_coerce(v, args[0], key) for v in value]
    if hint is float and not isinstance(value, bool):
        # YAML 1.1 reads "2e-5" (no dot) as a string; accept what float() accepts.
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            pass
        else:
            # No setting means anything at NaN or infinity; .nan/.inf are always typos or tests.
            if not math.isfinite(number):
                raise ValueError(f"'{key}' must be a finite number, got {value!r}")
            return number
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"'{key}' must be {hint.__name__}, got {value!r}")
    return value


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain data for YAML (tuples become lists), without the sections the algorithm ignores.

    Leaving them out keeps a resolved config loadable as it is (`_check_sections`) and keeps a
    resumed run from being refused over a setting that never mattered.
    """
    unused = {section for sections in ALGORITHM_SECTIONS.values() for section in sections} - set(
        ALGORITHM_SECTIONS[config.algorithm]
    )

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return {k: plain(v) for k, v in asdict(config).items() if k not in unused}


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
