"""Experiment config: one YAML file, validated against `config.schema.yaml`.

The same schema file is what the Snakefile validates with (workflow/schemas/ links here),
so a bad key stops a CLI call and a workflow run with the same message.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """A config file that does not fit the schema; the message names the key."""


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "<top level>"


def validate(config: dict, source: str = "config") -> dict:
    """Raise ConfigError naming every offending key; return the config unchanged."""
    schema = load_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_cls(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{source}: key '{_key_path(e)}': {e.message}" for e in errors]
        raise ConfigError("invalid config\n  " + "\n  ".join(lines))
    return config


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(config).__name__}")
    return validate(config, source=str(path))


def results_dir(config: dict) -> Path:
    return Path("results") / config["experiment"]


def data_root(config: dict) -> Path:
    """Where the image folder lives: generated under results/ for the demo, else `data.root`."""
    if config["data"]["source"] == "synthetic":
        return results_dir(config) / "data"
    return Path(config["data"]["root"])


def resolve_device(config: dict):
    import torch

    device = config["device"]
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'device' is 'cuda' but no CUDA device is available")
    return torch.device(device)
