"""ConfigMixin through ModelMixin: config.json round trip, metadata, unknown and missing keys, bad JSON."""
from __future__ import annotations

import json
import logging

import pytest

from runtime.models.config import read_json
from runtime.models.errors import CheckpointNotFoundError, ConfigError

from toy_model import RequiredToyModel, ToyModel, make_toy


def test_round_trip_keeps_values_and_metadata(tmp_path):
    model = make_toy(width=6, channels=2)
    model.save_config(tmp_path)
    raw = read_json(tmp_path / "config.json")
    assert raw["_class_name"] == "ToyModel"
    assert raw["_diffusers_version"]
    assert (raw["width"], raw["channels"], raw["vocab"]) == (6, 2, 5)
    rebuilt = ToyModel.from_config(ToyModel.load_config(tmp_path))
    assert dict(rebuilt.config) == dict(model.config)


def test_from_pretrained_records_name_and_keeps_file_metadata(tmp_path):
    make_toy(width=4).save_pretrained(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw["_diffusers_version"] = "0.30.0"  # a checkpoint written by an older diffusers
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    loaded = ToyModel.from_pretrained(tmp_path / "m")
    assert loaded.config["_name_or_path"] == str(tmp_path / "m")
    assert loaded.config["_diffusers_version"] == "0.30.0"
    assert loaded.config.width == 4
    # _name_or_path describes where a model came from, so it is not written back
    loaded.save_pretrained(tmp_path / "again")
    assert "_name_or_path" not in json.loads((tmp_path / "again" / "config.json").read_text())


def test_config_is_read_only():
    model = make_toy()
    with pytest.raises(TypeError):
        model.config["width"] = 3
    with pytest.raises(AttributeError, match="no_such_key"):
        model.config.no_such_key


def test_unknown_key_warns_naming_it(tmp_path, caplog):
    make_toy().save_pretrained(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw["flux_capacitor"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING):
        ToyModel.from_pretrained(tmp_path / "m")
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("flux_capacitor" in m and "config.json" in m for m in messages), messages


def test_missing_required_key_names_file_and_key(tmp_path):
    folder = tmp_path / "m"
    RequiredToyModel(width=4).save_pretrained(folder)
    raw = json.loads((folder / "config.json").read_text())
    del raw["width"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as info:
        RequiredToyModel.from_pretrained(folder)
    assert "width" in str(info.value) and str(folder / "config.json") in str(info.value)


def test_invalid_json_names_file(tmp_path):
    folder = tmp_path / "m"
    make_toy().save_pretrained(folder)
    (folder / "config.json").write_text('{"width": 4,,}')
    with pytest.raises(ConfigError, match="config.json.*invalid JSON"):
        ToyModel.from_pretrained(folder)
    with pytest.raises(ConfigError, match=str(folder / "config.json")):
        ToyModel.load_config(folder)


def test_config_not_an_object_and_absent(tmp_path):
    folder = tmp_path / "m"
    make_toy().save_pretrained(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ToyModel.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        ToyModel.from_pretrained(folder)


def test_config_overrides_in_from_pretrained(tmp_path, caplog):
    """An unknown keyword is ignored (diffusers ignores it) with a warning naming it."""
    make_toy(width=4).save_pretrained(tmp_path / "m")
    with caplog.at_level(logging.WARNING):
        model = ToyModel.from_pretrained(tmp_path / "m", not_a_key=1)
    assert "not_a_key" in caplog.text and "not_a_key" not in model.config
