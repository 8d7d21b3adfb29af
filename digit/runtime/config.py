"""Experiment config: one YAML file, validated against `config.schema.yaml`.

The same schema file is what the Snakefile validates with (workflow/schemas/ links here),
so a bad key stops a CLI call and a workflow run with the same message.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """A config that does not fit the schema, or could not run; the message names the key."""


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


def _encoder_grid(enc: dict) -> tuple[list[int], int]:
    """(input height and width, patch size) of the configured encoder, from its name and overrides;
    timm's pretrained config gives the input size only where the overrides do not."""
    patch = enc["overrides"].get("patch_size") or int(re.search(r"_patch(\d+)", enc["arch"]).group(1))
    size = enc["overrides"].get("img_size")
    if size is None:
        from timm.models import get_pretrained_cfg

        pretrained = get_pretrained_cfg(enc["arch"])
        if pretrained is None:
            raise ConfigError(f"key 'encoder.arch': timm has no model {enc['arch']}")
        size = pretrained.input_size[-1]
    return ([size, size] if isinstance(size, int) else list(size)), patch


def _value_problems(config: dict, counts: tuple[int, int, int] | None) -> list[str]:
    """Values that some stage would reject after the ones before it ran; `counts` (train images,
    val images, classes) enables the checks that depend on the data."""
    problems = []
    for stage in ("stage1", "stage2"):
        batch, accum = config[stage]["batch_size"], config[stage]["grad_accum_steps"]
        if batch % accum:
            problems.append(f"key '{stage}.batch_size': {batch} does not split into {stage}.grad_accum_steps "
                            f"{accum} equal micro-batches")
    size, levels = config["data"]["image_size"], len(config["vq"]["channel_mult"]) - 1
    if size % 2 ** levels:
        problems.append(f"key 'data.image_size': {size} is not divisible by the VQ downsampling 2^{levels} "
                        "(vq.channel_mult)")
    enc = config["encoder"]
    enc_size, patch = _encoder_grid(enc)
    if any(side % patch for side in enc_size):
        problems.append(f"key 'encoder.overrides.img_size': {enc_size} is not divisible by the patch size {patch} "
                        f"of {enc['arch']}")
    patches = math.prod(side // patch for side in enc_size)
    if counts is None:
        return problems
    train_images, val_images, classes = counts
    km = config["kmeans"]
    sampled = max(1, round(km["sample_fraction"] * train_images))
    if km["k"] > sampled * patches:
        problems.append(f"key 'kmeans.k': {km['k']} clusters but K-means gets only {sampled * patches} patch "
                        f"features (kmeans.sample_fraction {km['sample_fraction']} of {train_images} train images "
                        f"x {patches} patches); lower kmeans.k or raise kmeans.sample_fraction")
    for key, shards, items in (("kmeans.feature_shards", km["feature_shards"], sampled),
                               ("tokenize.shards", config["tokenize"]["shards"], train_images + val_images)):
        if shards > items:
            problems.append(f"key '{key}': {shards} shards but only {items} images to split")
    batch_keys = ["classifier.batch_size"] + (["vq.batch_size"] if config["vq"]["weights"] == "train" else [])
    for key in batch_keys:
        section, name = key.split(".")
        if config[section][name] > train_images:
            problems.append(f"key '{key}': {config[section][name]} is more than the {train_images} train images")
    sc = config["sample"]
    blocks = math.ceil(sc["per_class"] * classes / sc["batch_size"])
    if sc["shards"] > blocks:
        problems.append(f"key 'sample.shards': {sc['shards']} shards but only {blocks} blocks of sample.batch_size "
                        f"{sc['batch_size']} ({sc['per_class']} per class x {classes} classes)")
    return problems


def _file_problems(config: dict) -> list[str]:
    """Weight and reference files the config names that are not there."""
    vq, ev = config["vq"], config["evaluate"]
    named = {
        "encoder.weights_file": config["encoder"]["weights_file"] if config["encoder"]["weights"] == "file" else None,
        "vq.weights_file": vq["weights_file"] if vq["weights"] == "file" else None,
        "vq.perceptual_weights_file": vq["perceptual_weights_file"]
        if vq["weights"] == "train" and vq["perceptual_weight"] > 0 else None,
        "evaluate.inception_weights": ev["inception_weights"],
        "evaluate.reference": None if ev["reference"] == "val" else ev["reference"],
    }
    return [f"key '{key}': no such file {path}" for key, path in named.items()
            if path is not None and not Path(path).is_file()]


def check_feasible(config: dict, source: str = "config", machine: bool = True, gpu: bool = True) -> None:
    """Raise ConfigError naming the key of every value that would only fail hours into a run.

    Always: batch sizes that do not divide, image sizes the encoder patches or the VQ downsampling do
    not divide, and (for the synthetic set, whose size the config gives) K-means' K against its sample,
    batch sizes and shard counts against the data. With `machine`, also what this machine must hold:
    the image folder (counted, not read, for the data checks), the weight files the config names, and,
    with `gpu`, a CUDA device when `device: cuda`.
    """
    if config["data"]["source"] == "synthetic":
        spec = config["data"]["synthetic"]
        counts = (spec["num_classes"] * spec["train_per_class"], spec["num_classes"] * spec["val_per_class"],
                  spec["num_classes"])
    else:
        counts = None
    problems = []
    if machine:
        problems = _file_problems(config)
        if counts is None:
            from digit.runtime.images import count_images

            try:
                counts = count_images(config["data"]["root"])
            except FileNotFoundError as e:
                problems.append(f"key 'data.root': {e}")
        if gpu and config["device"] == "cuda":
            try:
                resolve_device(config)
            except ValueError as e:
                problems.append(str(e))
    problems = _value_problems(config, counts) + problems
    if problems:
        raise ConfigError(f"{source} would fail:\n  " + "\n  ".join(problems))


def resolve_device(config: dict):
    import torch

    device = config["device"]
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'device' is 'cuda' but no CUDA device is available")
    return torch.device(device)
