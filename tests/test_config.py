import pytest

from lpd.config import apply_override, diff_configs, load_config
from lpd.errors import LpdError


def test_load_with_arg_and_overrides(tiny_config_path):
    config = load_config(
        f"{tiny_config_path}:hopper_uni",
        ["--config.archive.num_iterations=8", "--config.archive.grid_shape=(7,)"],
    )
    assert config.archive.env == "hopper_uni"
    assert config.archive.num_iterations == 8
    assert config.archive.grid_shape == (7,)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.archive.num_iteration=3", "did you mean 'num_iterations'"),
        ("--config.archiv.env=x", "did you mean 'archive'"),
        ("--config.archive.batch_size=many", "not a valid int"),
        ("--config.archive.normalise_obs=maybe", "not a valid bool"),
        ("--config.archive=3", "is a group"),
        ("--config.seed.x=3", "is not a group"),
        ("--config.seed", "expected --config.a.b=value"),
    ],
)
def test_bad_overrides_name_the_problem(tiny_config_path, override, message):
    config = load_config(tiny_config_path)
    with pytest.raises(LpdError, match=message):
        apply_override(config, override)


def test_bool_float_and_tuple_overrides(tiny_config_path):
    config = load_config(tiny_config_path)
    apply_override(config, "--config.archive.normalise_obs=true")
    apply_override(config, "--config.archive.iso_sigma=0.5")
    apply_override(config, "--config.archive.policy_hidden_sizes=(4,4)")
    assert config.archive.normalise_obs is True
    assert config.archive.iso_sigma == 0.5
    assert config.archive.policy_hidden_sizes == (4, 4)


def test_config_is_locked(tiny_config_path):
    config = load_config(tiny_config_path)
    with pytest.raises(AttributeError):
        config.archive.new_field = 1


def test_missing_file(tmp_path):
    with pytest.raises(LpdError, match="not found"):
        load_config(str(tmp_path / "nope.py"))


def test_paper_config_rejects_unknown_env():
    from conftest import CONFIGS

    with pytest.raises(LpdError, match="failed to load"):
        load_config(f"{CONFIGS / 'paper.py'}:cartpole")
    assert load_config(f"{CONFIGS / 'paper.py'}:ant").archive.grid_shape == (10,) * 4


def test_diff_configs_lists_changed_paths():
    old = {"a": {"b": 1, "c": 2}, "d": 3}
    new = {"a": {"b": 1, "c": 5}, "d": 3}
    assert diff_configs(old, new) == ["config.a.c: 2 -> 5"]
