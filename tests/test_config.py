"""Bad input is refused before anything trains: exit code 2 and a message naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from decoupled.cli import main
from decoupled.config import ConfigError, build_config, parse_overrides

BASE = {
    "name": "t",
    "runtime": "inprocess",
    "data": {"name": "digits"},
    "model": {"name": "mlp", "hidden": [16, 16]},
    "split": {"stages": 2},
    "train": {"epochs": 1, "progress": False},
}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output": {"dir": str(tmp_path / "runs")}}))
    return path


BAD = [
    (["colour=blue"], "colour: unknown key"),
    (["train.epoch=3"], "train.epoch: unknown key"),
    (["train.batch_size=abc"], "train.batch_size"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.batch_size=-4"], "train.batch_size"),
    (["optimizer.lr=0"], "optimizer.lr"),
    (["optimizer.lr=-0.1"], "optimizer.lr"),
    (["method.name=magic"], "method: unknown method 'magic'; expected one of: 'backprop', 'dgl', 'dni'"),
    (["method.name=dgl", "method.aux_hidden=many"], "method.aux_hidden"),
    (["split.stages=4"], "split.stages: 4 stages requested but model 'mlp' has only 3 blocks"),
    (["split.stages=0"], "split.stages"),
    (["data.name=image_folder", "data.path=/no/such/dir"], "data.path: Value error, directory does not exist"),
    (["data.name=idx", "data.path=/no/such/dir"], "data.path"),
    (["data.name=cifar10", "data.path=/no/such/dir", "data.download=false"], "data.path"),
    (["model.name=vgg"], "model.name: 'vgg' needs image inputs"),
    (["data.name=synthetic", "data.shape=[12]", "model.name=resnet"], "model.name"),
    (["train.batch_size=5000"], "train.batch_size: 5000 is larger than"),
    (["split.boundaries=[1,2]"], "split.boundaries"),
    (["model.depths=[1]", "model.name=resnet", "model.widths=[4,8]"], "model.depths"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_exits_2_naming_the_field_and_trains_nothing(config_file, tmp_path, capsys, overrides, expected):
    if overrides == ["model.name=vgg"]:
        overrides = ["model.name=vgg", "model.widths=[4]", "data.name=synthetic", "data.shape=[12]"]
    code = main(["train", "--config", str(config_file), *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert expected.replace("Value error, ", "") in err
    assert not (tmp_path / "runs").exists()  # nothing was trained or written


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "--config: file not found" in capsys.readouterr().err


def test_invalid_yaml_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed\n")
    assert main(["compare", "--config", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_compare_needs_methods_and_unique_labels(config_file, capsys):
    assert main(["compare", "--config", str(config_file)]) == 2
    assert "compare:" in capsys.readouterr().err
    dup = ["compare.methods=[{name: dgl}, {name: dgl}]"]
    assert main(["compare", "--config", str(config_file), *dup]) == 2
    assert "compare.methods: run names must be unique" in capsys.readouterr().err
    bad = ["compare.methods=[{name: dgl}, {name: nope}]"]
    assert main(["compare", "--config", str(config_file), *bad]) == 2
    assert "compare.methods[1]" in capsys.readouterr().err


def test_the_installed_command_exits_2(config_file, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "decoupled", "train", "--config", str(config_file), "train.batch_size=0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "train.batch_size" in proc.stderr and "Traceback" not in proc.stderr


def test_overrides_parse_yaml_values_and_reject_malformed_ones():
    assert parse_overrides(["a.b=3", "a.c=[1, 2]", "d=true", "e=1e-3"]) == {
        "a": {"b": 3, "c": [1, 2]}, "d": True, "e": "1e-3"
    }
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_overrides(["novalue"])
    for clash in (["a.b=2", "a=1"], ["a=1", "a.b=2"]):  # either order: a value and a section at once
        with pytest.raises(ConfigError, match="section"):
            parse_overrides(clash)
    # YAML reads 1e-3 as a string; the typed config still takes it as a float
    assert build_config(BASE, ["optimizer.lr=1e-3"]).optimizer.lr == pytest.approx(1e-3)


def test_changing_a_section_kind_drops_the_old_kinds_keys():
    cfg = build_config({**BASE, "method": {"name": "dni", "conditioned": True}}, ["method.name=dgl"])
    assert cfg.method.name == "dgl"
