"""Compare experiments: one table of each config's distinguishing settings and its metrics,
optionally with the DiGIT paper's published results beside them."""
from __future__ import annotations

from pathlib import Path

from digit.runtime.config import load_config, results_dir
from digit.runtime.io import read_json

# Shown when a single config leaves no differences to show.
KEY_SETTINGS = ("encoder.arch", "kmeans.k", "stage1.preset", "stage2.decoder", "sample.top_k", "sample.cfg_scale")

# metrics.json key -> column header, in table order. GAN-test: a classifier of real images scored on the
# samples; CAS: a classifier of the samples scored on the real val images (digit/evaluate/cas.py). UB: the
# upper bound (true val tokens -> stage 2 -> VQ decoder); VQ: the VQ autoencoder's reconstructions alone
# (VQ IS from report.json's details).
METRICS = {"fid": "FID", "fid_calibrated": "FID calibrated", "inception_score": "IS", "kid": "KID",
           "precision": "precision", "recall": "recall", "gan_test": "GAN-test", "cas": "CAS",
           "chance": "chance",
           "probe_top1_best": "probe top-1", "upper_bound_fid": "UB FID", "upper_bound_inception_score": "UB IS",
           "upper_bound_psnr": "UB PSNR", "vq_recon_fid": "VQ FID",
           "vq_recon_inception_score": "VQ IS", "vq_recon_psnr": "VQ PSNR",
           "stage1_final_loss": "stage-1 loss", "stage2_final_loss": "stage-2 loss"}

# The DiGIT paper (NeurIPS 2024), ImageNet 256x256. Probe top-1 as a fraction, as probe.py writes it.
PUBLISHED = (
    ("uncond. 219M + AR", {"fid": 9.13, "inception_score": 73.85}),
    ("uncond. 219M + MaskGIT", {"fid": 9.04, "inception_score": 75.04}),
    ("uncond. 732M + AR", {"fid": 4.59, "inception_score": 141.29}),
    ("class-cond. 219M + AR", {"fid": 4.79, "inception_score": 142.87}),
    ("class-cond. 219M + MaskGIT", {"fid": 4.62, "inception_score": 146.19}),
    ("class-cond. 732M + AR", {"fid": 3.39, "inception_score": 205.96}),
    ("uncond. VQ-token baseline 219M + AR", {"fid": 24.38, "inception_score": 30.93}),  # Table 3, ablation
    ("upper bound (UB FID, UB IS)", {"upper_bound_fid": 1.92, "upper_bound_inception_score": 184.40}),
    # "VQ only": MAGE's VQGAN reconstructing the val images, this pipeline's vq_recon_* metrics
    ("upper bound, VQ only (VQ FID, VQ IS)", {"vq_recon_fid": 1.67, "vq_recon_inception_score": 175.56}),
    ("linear probe 219M", {"probe_top1_best": 0.717}),
    ("linear probe 732M", {"probe_top1_best": 0.803}),
)
PUBLISHED_PREFIX = "DiGIT paper (ImageNet 256): "

FORMATS = ("text", "tsv", "markdown")


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested config -> {"dotted.key": leaf value}; lists are leaves."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def setting_columns(configs: list[dict]) -> list[str]:
    """The dotted keys whose values differ between the configs (or are missing from some), in
    config order; for one config, KEY_SETTINGS."""
    if len(configs) == 1:
        return list(KEY_SETTINGS)
    flats = [flatten(c) for c in configs]
    keys = dict.fromkeys(k for flat in flats for k in flat if k != "experiment")
    missing = object()
    return [k for k in keys if any(flat.get(k, missing) != flats[0].get(k, missing) for flat in flats)]


def read_metrics(config: dict) -> dict:
    """metrics.json, and the details of report.json (whether FID is calibrated, ...) where it exists."""
    path = results_dir(config) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"experiment '{config['experiment']}' has no metrics: {path} not found; "
                                f"run its pipeline first")
    report = path.with_name("report.json")
    details = read_json(report).get("details", {}) if report.is_file() else {}
    return details | read_json(path)


def setting_text(value) -> str:
    """A config value as it would read in the YAML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(setting_text(v) for v in value) + "]"
    return str(value)


def metric_text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # two decimals keep FID/IS as the paper prints them; fractions and small numbers keep 3 digits
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"
    return str(value)


def comparison(config_paths: list[str | Path], published: bool = False) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows: one row per config (and, if `published`, per paper result)."""
    configs = [load_config(p) for p in config_paths]
    seen = {}
    for path, config in zip(config_paths, configs):
        if config["experiment"] in seen:
            raise ValueError(f"{seen[config['experiment']]} and {path} both name experiment "
                             f"'{config['experiment']}'; they share one results folder")
        seen[config["experiment"]] = path
    settings = setting_columns(configs)
    rows = []
    for config in configs:
        flat, metrics = flatten(config), read_metrics(config)
        rows.append([config["experiment"]]
                    + [setting_text(flat[k]) if k in flat else "-" for k in settings]
                    + [metric_text(metrics.get(m)) for m in METRICS])
    if published:
        for label, metrics in PUBLISHED:
            rows.append([PUBLISHED_PREFIX + label] + [""] * len(settings)
                        + [metric_text(metrics.get(m)) for m in METRICS])
    return ["experiment", *settings, *METRICS.values()], rows


def render(header: list[str], rows: list[list[str]], fmt: str = "text") -> str:
    if fmt == "tsv":
        return "\n".join("\t".join(line) for line in [header, *rows])
    if fmt == "markdown":
        lines = [header, ["---"] * len(header), *rows]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    # the first column (names) reads best left-aligned, values right-aligned
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
                     for line in [header, *rows])


def compare_table(config_paths: list[str | Path], published: bool = False, fmt: str = "text") -> str:
    """`digit compare`: the experiments of the configs as one table, in `fmt` (one of FORMATS)."""
    return render(*comparison(config_paths, published), fmt)
