from pathlib import Path

import pytest
import yaml

from alignment.config import Config, dump_config, load_config
from alignment.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "experiments" / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "tldr_gptj_quark.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    config = load_config(path)
    assert isinstance(config, Config)
    # the resolved config written to a run directory loads back to the same config
    resolved = tmp_path / "config.yaml"
    resolved.write_text(dump_config(config))
    assert load_config(resolved) == config


def test_published_gptj_setup():
    config = load_config(next(p for p in CONFIGS if p.name == "tldr_gptj_quark.yaml"))
    assert config.pool.num_quantiles == 5 and config.data.samples_per_prompt == 96
    assert config.train.unfrozen_layers_ratio == 0.3 and config.train.learning_rate == 2e-5
    assert config.train.adam_betas == (0.8, 0.999) and config.pool.drop_factor == 1.0
    assert config.sampling.temperature == 0.9 and config.sampling.top_p == 0.9
    assert config.train.entropy_coef == 0.06 and config.train.num_epochs == 2


def test_overrides_apply_in_order_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"learning_rate": "2e-5"}, "iterations": 2}))
    config = load_config(
        path,
        [
            "train.learning_rate=1e-3",
            "reward.options={tokenizer: gptj}",
            "model.reference=null",
            "train.max_grad_norm=1",
        ],
    )
    assert config.train.learning_rate == 1e-3 and config.iterations == 2
    assert config.reward.options == {"tokenizer": "gptj"}
    assert config.model.reference is None and config.train.max_grad_norm == 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trian.learning_rate=1"], "unknown key 'trian'"),
        (["train.lr=1"], "unknown key 'train.lr'"),
        (["train.batch_size=eight"], "'train.batch_size' must be int"),
        (["train.reset_optimizer=3"], "'train.reset_optimizer' must be bool"),
        (["pool.scope=everywhere"], "'pool.scope' must be one of"),
        (["algorithm=ppoo"], "unknown algorithm 'ppoo'; choose from quark, rft, alt-rm"),
        (["algorithm=rft", "conditioning.placement=suffix"], "section 'conditioning' is not read"),
        (["quark.num_quantiles=3"], "its settings moved"),
        (["feedback.phrases=[Good.]"], "section 'feedback' is not read by algorithm 'quark'"),
        (["algorithm=alt-rm", "pool.num_quantiles=2"], "feedback.phrases must be 2 distinct"),
        (["train.adam_betas=[0.9]"], "'train.adam_betas' must have 2 items"),
        (["iterations=0"], "iterations must be >= 1"),
        (["train=1"], "'train' must be a section"),
        (["novalue"], "must look like key=value"),
        # grpo/rloo: trl would drop the prompts that do not fill a step, so the budget must split
        (["algorithm=grpo", "grpo.prompts_per_step=3"], r"grpo.prompts_per_step \(3\) must divide"),
        (["algorithm=rloo", "rloo.batch_size=7"], r"rloo.batch_size \(7\) must divide .* \(40\)"),
        (["algorithm=grpo", "data.samples_per_prompt=1"], "samples_per_prompt must be >= 2"),
        (["algorithm=grpo", "train.kl_coef=0.1"], "section 'train' is not read by algorithm"),
        (["grpo.beta=0.1"], "section 'grpo' is not read by algorithm 'quark'"),
        (["algorithm=rloo", "rloo.beta=-0.1"], "rloo.beta must be >= 0"),
        (["algorithm=grpo", "grpo.learning_rate=0"], "grpo.learning_rate must be > 0"),
        (["algorithm=grpo", "grpo.loss_type=ppo"], "'grpo.loss_type' must be one of"),
        (["algorithm=rloo", "rloo.section=x"], "unknown key 'rloo.section'"),
    ],
)
def test_bad_keys_and_types_are_named(overrides, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        load_config(None, overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(bad)


def test_resolved_config_holds_only_the_sections_its_algorithm_reads(tmp_path):
    """A resolved rft config has no conditioning section, and loads back as it is."""
    config = load_config(None, ["algorithm=rft", "pool.num_quantiles=4"])
    tree = yaml.safe_load(dump_config(config))
    assert "conditioning" not in tree and tree["pool"]["num_quantiles"] == 4
    resolved = tmp_path / "config.yaml"
    resolved.write_text(dump_config(config))
    assert load_config(resolved) == config
    assert "conditioning" in yaml.safe_load(dump_config(load_config(None)))


def test_every_algorithm_has_its_sections_and_an_update():
    from alignment.algorithms import ALGORITHMS
    from alignment.config import ALGORITHM_SECTIONS

    assert set(ALGORITHMS) == set(ALGORITHM_SECTIONS)


def test_base_config_merges_section_by_section(tmp_path):
    (tmp_path / "common.yaml").write_text(
        "iterations: 4\ndata: {prompts_per_iteration: 6, samples_per_prompt: 8}\n"
    )
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "rft.yaml"
    child.write_text("base: ../common.yaml\nalgorithm: rft\ndata: {samples_per_prompt: 4}\n")
    config = load_config(child, ["iterations=5"])
    assert config.algorithm == "rft" and config.iterations == 5
    assert (config.data.prompts_per_iteration, config.data.samples_per_prompt) == (6, 4)
    assert "base" not in dump_config(config)


def test_base_config_errors_name_the_file(tmp_path):
    loop_a, loop_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    loop_a.write_text("base: b.yaml\n")
    loop_b.write_text("base: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_config(loop_a)
    missing = tmp_path / "c.yaml"
    missing.write_text("base: nowhere.yaml\n")
    with pytest.raises(UserError, match="nowhere.yaml: no such config file"):
        load_config(missing)
    bad = tmp_path / "d.yaml"
    bad.write_text("base: [a.yaml]\n")
    with pytest.raises(UserError, match="d.yaml: 'base' must be"):
        load_config(bad)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ppo.cliprange=0"], "ppo.cliprange must be > 0, got 0"),
        (["ppo.lam=1.5"], r"ppo.lam must be in \[0, 1\], got 1.5"),
        (["ppo.ppo_epochs=0"], "ppo.ppo_epochs must be >= 1, got 0"),
        (["ppo.target_kl=-1"], r"ppo.target_kl must be > 0 \(or null\), got -1"),
        (["ppo.learning_rate=.nan"], "'ppo.learning_rate' must be a finite number"),
        (["ppo.unfrozen_layers_ratio=0"], r"ppo.unfrozen_layers_ratio must be in \(0, 1\]"),
        (["ppo.cliprang=0.1"], "unknown key 'ppo.cliprang'"),
        (["ppo.vf_coef=0.5"], "section 'ppo' is not read by algorithm 'quark'"),
    ],
)
def test_bad_ppo_values_are_named(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, ["algorithm=ppo", *overrides] if "quark" not in message else overrides)


def test_ppo_defaults_are_trlx_tldr_and_null_fixes_the_kl_coefficient():
    config = load_config(None, ["algorithm=ppo", "ppo.target_kl=null"])
    ppo = config.ppo
    assert (ppo.ppo_epochs, ppo.init_kl_coef, ppo.kl_horizon, ppo.gamma, ppo.lam) == (
        4,
        0.1,
        10000,
        1.0,
        0.95,
    )
    assert (ppo.cliprange, ppo.cliprange_value, ppo.vf_coef, ppo.cliprange_reward) == (
        0.2,
        0.2,
        0.2,
        10.0,
    )
    assert ppo.learning_rate == 5e-6 and ppo.adam_betas == (0.9, 0.999) and ppo.target_kl is None
    assert "train" not in yaml.safe_load(dump_config(config))


def test_published_gptj_ppo_setup():
    config = load_config(next(p for p in CONFIGS if p.name == "tldr_gptj_ppo.yaml"))
    assert config.algorithm == "ppo" and config.reward.subtract_reference
    assert config.sampling.temperature == 1.0 and config.sampling.top_p == 1.0
    assert config.sampling.max_new_tokens == 50 and config.data.prompts_per_iteration == 128
    assert config.ppo.target_kl == 6.0 and config.ppo.unfrozen_layers_ratio == 0.3


def test_grpo_and_rloo_sections_default_to_trls_values_except_the_kl():
    grpo = load_config(None, ["algorithm=grpo"])
    rloo = load_config(None, ["algorithm=rloo"])
    assert (grpo.grpo.beta, rloo.rloo.beta) == (0.04, 0.05)
    assert grpo.grpo.loss_type == "dapo" and grpo.grpo.learning_rate == 1e-6
    tree = yaml.safe_load(dump_config(grpo))
    assert "grpo" in tree and not {"rloo", "train", "pool"} & set(tree)
