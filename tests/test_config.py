"""Config loading, dotted overrides and their errors; CLI exit codes for bad configs."""

import json

import ml_collections
import pytest

from jaxem import cli
from jaxem.config import apply_overrides, load_config, save_config
from jaxem.errors import UserError


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config(arg=''):\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.seed = 0\n"
        "    c.name = 'exp' + arg\n"
        "    c.train = ml_collections.ConfigDict(dict(steps=10, lr=0.1, shape=(4, 4), ema=False))\n"
        "    return c\n")
    return path


def test_load_with_argument(config_file):
    assert load_config(f"{config_file}:_big").name == "exp_big"
    assert load_config(str(config_file)).name == "exp"


def test_overrides_keep_types(config_file):
    cfg = apply_overrides(load_config(str(config_file)), [
        "--config.train.steps=50", "--config.train.lr=1", "--config.train.shape=(8, 16)",
        "--config.train.ema", "true", "--config.name=other"])
    assert cfg.train.steps == 50 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.shape == (8, 16)
    assert cfg.train.ema is True
    assert cfg.name == "other"


@pytest.mark.parametrize("override, fragment", [
    ("--config.train.stepz=5", "unknown config key 'train.stepz'"),
    ("--config.nothing.steps=5", "has no field 'nothing'"),
    ("--config.train.steps=many", "expects an integer"),
    ("--config.train.steps=1.5", "expects an integer"),
    ("--config.train.ema=maybe", "expects true or false"),
    ("--config.train=3", "is a section"),
])
def test_bad_overrides_name_the_field(config_file, override, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(load_config(str(config_file)), [override])


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "nope.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(UserError, match="could not be read"):
        load_config(str(broken))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(UserError, match="no get_config"):
        load_config(str(empty))


def test_saved_config_round_trips(config_file, tmp_path):
    cfg = apply_overrides(load_config(str(config_file)), ["--config.train.steps=7"])
    path = save_config(cfg, tmp_path / "run")
    saved = json.loads(path.read_text())
    assert saved["train"]["steps"] == 7
    assert ml_collections.ConfigDict(saved).train.shape == [4, 4]


def test_cli_exits_2_with_one_line(config_file, tmp_path, capsys):
    code = cli.main(["train", "--config", str(config_file), "--workdir", str(tmp_path / "w"), "--config.train.bogus=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "bogus" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()
    assert cli.main(["train", "--config", str(tmp_path / "missing.py"), "--workdir", str(tmp_path / "w")]) == 2


def test_demo_config_loads_with_every_section():
    cfg = load_config("demo")
    for section in ("data", "augment", "target", "model", "loss", "optimizer", "train", "predict"):
        assert section in cfg
    assert cfg.model.ndim == 2 and len(cfg.data.crop_shape) == 2
