"""The config factory, the checked dtype and device fields, and the shared CLI options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel, ConfigDict

from gradfree.base.configfile import DTYPES, Device, DType, check_device, make_strict
from gradfree.base.errors import GradfreeError
from gradfree.models.load import resolve_dtype


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    size: int = 1
    device: Device = "cpu"
    dtype: DType = "float32"


def test_one_factory_layers_and_one_sentence() -> None:
    cfg = make_strict(_Cfg, {"name": "a", "size": 2}, None, {"size": 3}, noun="toy")
    assert (cfg.name, cfg.size) == ("a", 3)
    assert make_strict(_Cfg, cfg, {"name": "b"}, noun="toy").size == 3
    cases = [
        ({"name": "a", "sise": 2}, "^Unknown toy option 'sise'\\.$"),
        ({}, "^The toy is missing the option 'name'\\.$"),
        ({"name": "a", "dtype": "int8"}, "^Invalid toy config: dtype: Input should be 'float32'"),
        ({"name": "a", "device": "gpu"}, "'gpu' is not a torch device"),
    ]
    for data, message in cases:
        with pytest.raises(GradfreeError, match=message):
            make_strict(_Cfg, data, noun="toy", invalid="toy config")
    with pytest.raises(GradfreeError, match="must be a mapping"):
        make_strict(_Cfg, ["a"], noun="toy")  # type: ignore[arg-type]


def test_every_config_dtype_resolves_in_the_loader_and_others_are_one_sentence() -> None:
    import torch

    assert set(get_args(DType)) == set(DTYPES)
    for name in DTYPES:
        assert resolve_dtype(name) == getattr(torch, name)
    with pytest.raises(GradfreeError, match=r"^Unknown dtype 'int8'; choose one of"):
        resolve_dtype("int8")


def test_a_cuda_device_validates_without_touching_cuda() -> None:
    assert check_device("cuda:1") == "cuda:1" and check_device("cpu") == "cpu"
    code = (
        "import torch\n"
        "from gradfree.experiment.config import make_experiment\n"
        "from gradfree.cli.options import DEVICE\n"
        "c = make_experiment({'teacher': 't', 'student': 's', 'rows': [], 'device': 'cuda:0'})\n"
        "assert c.device == 'cuda:0'\n"
        "print(torch.cuda.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--device", "gpu"], "error: 'gpu' is not a torch device (try 'cpu' or 'cuda:0')."),
        (["--dtype", "int8"], "error: Unknown dtype 'int8'; choose one of: float32, float64,"),
    ],
)
def test_bad_device_or_dtype_fails_before_anything_is_written(
    tmp_path: Path, run_cli, flag: list[str], message: str
) -> None:
    out = tmp_path / "out"
    argv = ["eval", "--model", "m", "--corpus", "c", "--out", str(out), *flag]
    code, _, err = run_cli(argv)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []
