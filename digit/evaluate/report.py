"""The experiment's summary: flat metrics.json, loss curves for `dvc plots`, and the sample grid."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

from digit.runtime.io import atomic_dir, atomic_path, provenance, read_json, write_json

STAGES = ("vq", "stage1", "stage2")


def final_row(log_path: Path) -> dict | None:
    """The last row of a training log.tsv, as column -> float; None if nothing was trained (a
    pretrained VQ model)."""
    if not log_path.is_file():
        raise FileNotFoundError(f"training log not found: {log_path}")
    with log_path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        return None
    return {k: float(v) for k, v in rows[-1].items()}


def run_report(config: dict, evaluate_dir: str | Path, probe_dir: str | Path, upper_bound_dir: str | Path,
               stage1_dir: str | Path, stage2_dir: str | Path, vq_dir: str | Path, samples_dir: str | Path, out_dir: str | Path) -> None:
    """out_dir/metrics.json (evaluate, probe and upper-bound metrics, final losses), out_dir/curves/<stage>.tsv (and probe.tsv, top-1 per layer) and out_dir/grid.png
    (out_dir: results/<experiment>)."""
    out_dir = Path(out_dir)
    logs = {stage: Path(d) / "log.tsv" for stage, d in zip(STAGES, (vq_dir, stage1_dir, stage2_dir))}
    metrics = ({"experiment": config["experiment"]} | read_json(Path(evaluate_dir) / "metrics.json")
               | read_json(Path(probe_dir) / "metrics.json") | read_json(Path(upper_bound_dir) / "metrics.json"))
    for stage, log in logs.items():
        last = final_row(log)
        if last is not None:
            metrics[f"{stage}_final_loss"] = last["loss"]
        metrics[f"{stage}_steps"] = 0 if last is None else int(last["step"])
    grid = Path(samples_dir) / "grid.png"
    if not grid.is_file():
        raise FileNotFoundError(f"sample grid not found: {grid}")

    with atomic_dir(out_dir / "curves") as tmp:
        for stage, log in logs.items():
            shutil.copyfile(log, tmp / f"{stage}.tsv")
        shutil.copyfile(Path(probe_dir) / "layers.tsv", tmp / "probe.tsv")  # top-1 per layer
    with atomic_path(out_dir / "grid.png") as tmp:
        shutil.copyfile(grid, tmp)
    write_json(out_dir / "report.json", provenance(
        {"experiment": config["experiment"]},
        {"metrics": Path(evaluate_dir) / "metrics.json", "probe": Path(probe_dir) / "metrics.json",
         "upper_bound": Path(upper_bound_dir) / "metrics.json", "grid": grid} | {f"{s}_log": p for s, p in logs.items()}))
    write_json(out_dir / "metrics.json", metrics)
