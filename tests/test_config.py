import pytest

from lpd.config import apply_override, config_to_dict, diff_configs, load_config
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


def test_fields_added_later_read_as_their_old_behaviour():
    # A stage made before `num_ancestors` existed was made with 0 (independent
    # initial policies): the same config now; another value is a change.
    old = {"archive": {"env": "walker2d_uni"}}
    same = {"archive": {"env": "walker2d_uni", "num_ancestors": 0}}
    other = {"archive": {"env": "walker2d_uni", "num_ancestors": 1}}
    assert diff_configs(old["archive"], same["archive"], "archive") == []
    assert diff_configs(old, other) == ["config.archive.num_ancestors: 0 -> 1"]
    assert diff_configs({}, {"new_field": 1}) == ["config.new_field: None -> 1"]
    # A stage made before `return_dropout` dropped the return rank at
    # cond_dropout: it matches that setting left unset, not the default 0.3.
    from conftest import CONFIGS

    new = config_to_dict(load_config(str(CONFIGS / "default.py")).diffusion)
    old = {k: v for k, v in new.items() if k != "return_dropout"}
    assert diff_configs(old, {**new, "return_dropout": None}, "diffusion") == []
    assert diff_configs(old, new, "diffusion") == [
        "diffusion.return_dropout: None -> 0.3"
    ]


@pytest.mark.parametrize(
    "spec",
    [
        "default.py",
        "default.py:hopper_uni",
        "medium.py",
        "paper.py:walker2d",
        "paper.py:ant",
        "tiny.py",
        "tiny.py:hopper_uni",
    ],
)
def test_shipped_configs_pass_every_stage_check(spec):
    from conftest import CONFIGS
    from lpd import pipeline

    config = load_config(str(CONFIGS / spec))
    pipeline.validate(config, pipeline.STAGES)  # Raises on a config that cannot run.


def test_default_grid_follows_the_descriptor_size():
    from conftest import CONFIGS

    hopper = load_config(f"{CONFIGS / 'default.py'}:hopper_uni").archive
    assert hopper.env == "hopper_uni" and len(hopper.grid_shape) == 1
    assert load_config(str(CONFIGS / "default.py")).archive.grid_shape == (32, 32)
    medium = load_config(str(CONFIGS / "medium.py"))
    assert medium.archive.episode_length == 1000 and medium.evaluate.episodes == 50


def test_shipped_configs_load_by_bare_name(tmp_path, monkeypatch):
    # An installed lpd has no clone: `--config tiny.py` finds the packaged one,
    # the same file experiments/configs/ links to.
    from conftest import CONFIGS

    monkeypatch.chdir(tmp_path)
    assert load_config("tiny.py") == load_config(str(CONFIGS / "tiny.py"))
    hopper = load_config("default.py:hopper_uni")
    assert hopper.archive.env == "hopper_uni"
    (tmp_path / "tiny.py").write_text("raise ValueError")  # A file here wins.
    with pytest.raises(LpdError, match="failed to load"):
        load_config("tiny.py")
    shipped = "shipped configs: dcrl.py, default.py, medium.py"
    with pytest.raises(LpdError, match=shipped):
        load_config("nope.py")
