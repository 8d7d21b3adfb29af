"""Experiment config: one YAML file, read strictly and validated against `config.schema.yaml`.

The Snakefile reads the config file with `load_config` too (workflow/schemas/ links the schema here),
so a bad file or key stops a CLI call and a workflow run with the same message.
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


# Longest value text an error message quotes: a message never repeats a whole (possibly huge) value.
MESSAGE_LIMIT = 200
# Most schema errors listed; the rest are counted.
ERROR_LIMIT = 20


def _short(text: str, limit: int = MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _is_integer(checker, instance) -> bool:
    # Python's bool is an int and jsonschema's integer takes 256.0: stages index and range with these.
    return isinstance(instance, int) and not isinstance(instance, bool)


def _is_number(checker, instance) -> bool:
    # NaN passes every comparison-based bound (minimum, maximum), so finiteness is part of the type.
    if isinstance(instance, bool) or not isinstance(instance, (int, float)):
        return False
    try:
        return math.isfinite(instance)
    except OverflowError:  # an int past the float range, where stages compute with floats
        return False


def _validator_class(schema: dict):
    base = jsonschema.validators.validator_for(schema)
    checker = base.TYPE_CHECKER.redefine_many({"integer": _is_integer, "number": _is_number})
    return jsonschema.validators.extend(base, type_checker=checker)


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "<top level>"


def _message(error: jsonschema.ValidationError) -> str:
    value, expected = error.instance, error.validator_value
    expected = expected if isinstance(expected, list) else [expected]
    if error.validator == "type" and isinstance(value, (int, float)) and not isinstance(value, bool):
        if "number" in expected and isinstance(value, int):
            return f"{_short(str(value), 40)} is past the float range"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{value} is not a finite number"
        if "integer" in expected and isinstance(value, float) and value.is_integer():
            return f"{value} is a float, where an integer is expected (write {int(value)})"
    return _short(error.message)


def _shown(errors: list[jsonschema.ValidationError]) -> list[jsonschema.ValidationError]:
    """The errors worth reading: a failed `allOf` member makes every property of its object
    'unevaluated', which only repeats an error found below it."""
    paths = [tuple(e.absolute_path) for e in errors]
    return [e for e, path in zip(errors, paths)
            if not (e.validator == "unevaluatedProperties"
                    and any(len(p) > len(path) and p[:len(path)] == path for p in paths))]


def validate(config: dict, source: str = "config") -> dict:
    """Raise ConfigError naming every offending key; return the config unchanged."""
    schema = load_schema()
    errors = _shown(sorted(_validator_class(schema)(schema).iter_errors(config),
                           key=lambda e: [str(p) for p in e.absolute_path]))
    if errors:
        lines = [f"{source}: key '{_short(_key_path(e))}': {_message(e)}" for e in errors[:ERROR_LIMIT]]
        if len(errors) > ERROR_LIMIT:
            lines.append(f"{source}: and {len(errors) - ERROR_LIMIT} more")
        raise ConfigError("invalid config\n  " + "\n  ".join(lines))
    return config


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader without what a config never needs and a reader must not trust: aliases (an
    alias of an alias... expands without bound) and duplicate keys (the last one would silently win)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{_short(event.anchor, 40)}: aliases are not allowed in a config "
                "(write the value out)", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    line = first_line.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:
                    continue  # unhashable: SafeLoader's own error follows
                if line != key_node.start_mark.line + 1:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_short(repr(key), 60)} (first on line {line})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """One YAML document, read strictly; every problem is one ConfigError line naming file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}, line {line}: byte 0x{data[e.start]:02x} is not UTF-8 (save the file as UTF-8)") from None
    loader = None
    try:
        loader = _StrictLoader(text)
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = ", ".join(part for part in (e.context, e.problem) if part)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ConfigError(f"{path}, {where}: {_short(what)}") from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(f"{path}, line {line}: character U+{e.character:04X} is not allowed in YAML") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {_short(str(e))}") from None
    except RecursionError:
        raise ConfigError(f"{path}: values nested too deeply to be a config") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    config = read_yaml(path)
    if config is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping of config keys")
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(config).__name__}")
    if "__use_yte__" in config:
        raise ConfigError(
            f"{path}: key '__use_yte__' makes the file a YTE template, which Snakemake evaluates as Python "
            "code while it reads the file, before any check: a config file is code to Snakemake. An "
            "experiment config is plain YAML: remove the key and write the values out")
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
    patch = enc["overrides"].get("patch_size")
    if patch is None:
        patch = int(re.search(r"_patch(\d+)", enc["arch"]).group(1))
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
    if config["stage1"]["weights"] == "file" and config["stage1"]["tokens"] == "vq":
        problems.append("key 'stage1.weights': 'file' converts DiGIT's released stage 1, a model of the "
                        "discriminative tokens; the VQ-token baseline (stage1.tokens: vq) was not released")
    if config["stage2"]["weights"] == "file" and config["kmeans"]["weights"] == "cluster":
        problems.append("key 'stage2.weights': a released stage 2 reads the tokens of the released centroids; "
                        "set kmeans.weights: file (a codebook clustered here numbers its clusters otherwise)")
    if config["stage1"]["weights"] == "file" and config["kmeans"]["weights"] == "cluster":
        problems.append("key 'stage1.weights': a released stage 1 models the tokens of the released centroids; "
                        "set kmeans.weights: file (a codebook clustered here numbers its clusters otherwise)")
    size, levels = config["data"]["image_size"], len(config["vq"]["channel_mult"]) - 1
    if size % 2 ** levels:
        problems.append(f"key 'data.image_size': {size} is not divisible by the VQ downsampling 2^{levels} "
                        "(vq.channel_mult)")
    enc = config["encoder"]
    enc_size, patch = _encoder_grid(enc)
    if any(side % patch for side in enc_size):
        problems.append(f"key 'encoder.overrides.img_size': {enc_size} is not divisible by the patch size {patch} "
                        f"of {enc['arch']}")
    dim, heads = enc["overrides"].get("embed_dim"), enc["overrides"].get("num_heads")
    if dim is not None and heads is not None and dim % heads:
        problems.append(f"key 'encoder.overrides.embed_dim': {dim} does not split into encoder.overrides.num_heads "
                        f"{heads} attention heads")
    patches = math.prod(side // patch for side in enc_size)
    if counts is None:
        return problems
    train_images, val_images, classes = counts
    km = config["kmeans"]
    sampled = max(1, round(km["sample_fraction"] * train_images))
    clustered = km["weights"] == "cluster"  # released centroids need no sample
    if clustered and km["k"] > sampled * patches:
        problems.append(f"key 'kmeans.k': {km['k']} clusters but K-means gets only {sampled * patches} patch "
                        f"features (kmeans.sample_fraction {km['sample_fraction']} of {train_images} train images "
                        f"x {patches} patches); lower kmeans.k or raise kmeans.sample_fraction")
    shard_counts = ((("kmeans.feature_shards", km["feature_shards"], sampled),) if clustered else ()) + (
        ("tokenize.shards", config["tokenize"]["shards"], train_images + val_images),)
    for key, shards, items in shard_counts:
        if shards > items:
            problems.append(f"key '{key}': {shards} shards but only {items} images to split")
    classifier = config["classifier"]
    batch_keys = ((["classifier.batch_size"] if classifier["enabled"] and classifier["weights"] == "train" else [])
                  + (["vq.batch_size"] if config["vq"]["weights"] == "train" else []))
    for key in batch_keys:
        section, name = key.split(".")
        if config[section][name] > train_images:
            problems.append(f"key '{key}': {config[section][name]} is more than the {train_images} train images")
    sc = config["sample"]
    samples = sc["per_class"] * classes
    if classifier["enabled"] and config["stage1"]["class_conditional"] and classifier["batch_size"] > samples:
        problems.append(f"key 'classifier.batch_size': {classifier['batch_size']} is more than the {samples} samples "
                        f"CAS trains on (sample.per_class {sc['per_class']} x {classes} classes)")
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
        **{f"{section}.weights_file": config[section]["weights_file"]
           for section in ("kmeans", "stage1", "stage2") if config[section]["weights"] == "file"},
        "evaluate.inception_weights": ev["inception_weights"],
        "evaluate.reference": None if ev["reference"] == "val" else ev["reference"],
        "classifier.weights_file": config["classifier"]["weights_file"]
        if config["classifier"]["enabled"] and config["classifier"]["weights"] == "file" else None,
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
