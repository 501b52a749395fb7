"""`jaxem predict` argument checking: one sentence, exit code 2, nothing written."""

import numpy as np
import pytest

from jaxem.cli import main
from jaxem.data.volume import create_volume
from jaxem.errors import UserError
from jaxem.infer.job import parse_roi


def test_roi_parsing_and_bounds():
    assert parse_roi("0:4,2:10,:", (8, 16, 16)) == ((0, 4), (2, 10), (0, 16))
    assert parse_roi(None, (8, 16)) is None
    for bad in ("0:9,0:16,0:16", "0:4,0:16", "a:b,0:1,0:1", "4:4,0:16,0:16"):
        with pytest.raises(UserError):
            parse_roi(bad, (8, 16, 16))


def test_predict_bad_input_exit_2(tmp_path, capsys):
    assert main(["predict", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]) == 2
    assert "--run" in capsys.readouterr().err
    assert main(["predict", "--run", str(tmp_path), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    create_volume(tmp_path / "in", (4, 16, 16), np.float32, (1.0, 1.0, 1.0))
    assert main(["predict", "--run", str(tmp_path), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                 "--roi", "0:9,0:16,0:16"]) == 2
    assert "outside" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
