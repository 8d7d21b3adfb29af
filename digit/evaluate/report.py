"""The experiment's summary: metrics.json (the numbers experiments are compared by, for `dvc metrics`
and `dvc exp show`), report.json (what they were measured with, and the provenance), loss curves for
`dvc plots`, and the sample grid."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

from digit.runtime.io import atomic_dir, atomic_path, read_json, write_json
from digit.stages import provenance

STAGES = ("vq", "stage1", "stage2")
# metrics.json: numbers that differ between experiments, one column each in `dvc exp show`. The rest
# of what the stages measured (names, hashes, counts, flags, per-layer figures) goes to report.json.
# gan_test: the real-data classifier's accuracy on the samples (evaluate); cas: the accuracy on real val
# images of a classifier trained on the samples (the cas stage); digit/evaluate/cas.py.
HEADLINE = ("fid", "inception_score", "kid", "precision", "recall", "gan_test", "cas", "chance", "probe_top1_best",
            "upper_bound_fid", "upper_bound_inception_score", "upper_bound_psnr", "vq_recon_fid", "vq_recon_psnr",
            "vq_final_loss", "stage1_final_loss", "stage2_final_loss")


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


def run_report(config: dict, evaluate_dir: str | Path, cas_dir: str | Path | None, probe_dir: str | Path | None,
               upper_bound_dir: str | Path, stage1_dir: str | Path, stage2_dir: str | Path | None, vq_dir: str | Path,
               samples_dir: str | Path, out_dir: str | Path) -> None:
    """out_dir/metrics.json (the HEADLINE figures of evaluate, cas, probe and upper bound, final losses),
    out_dir/report.json (the rest of their metrics.json under "details", and the provenance),
    out_dir/curves/<stage>.tsv (and probe.tsv, top-1 per layer) and out_dir/grid.png (out_dir:
    results/<experiment>)."""
    out_dir = Path(out_dir)
    # no stage 2 in the VQ-token baseline
    logs = {stage: Path(d) / "log.tsv" for stage, d in zip(STAGES, (vq_dir, stage1_dir, stage2_dir)) if d is not None}
    measured = ({"experiment": config["experiment"]} | read_json(Path(evaluate_dir) / "metrics.json")
                | (read_json(Path(cas_dir) / "metrics.json") if cas_dir is not None else {})
                | (read_json(Path(probe_dir) / "metrics.json") if probe_dir is not None else {})
                | read_json(Path(upper_bound_dir) / "metrics.json"))
    for stage, log in logs.items():
        last = final_row(log)
        if last is not None:
            measured[f"{stage}_final_loss"] = last["loss"]
        measured[f"{stage}_steps"] = 0 if last is None else int(last["step"])
    metrics = {key: measured[key] for key in HEADLINE if measured.get(key) is not None}  # null: not measured
    grid = Path(samples_dir) / "grid.png"
    if not grid.is_file():
        raise FileNotFoundError(f"sample grid not found: {grid}")

    with atomic_dir(out_dir / "curves") as tmp:
        for stage, log in logs.items():
            shutil.copyfile(log, tmp / f"{stage}.tsv")
        if probe_dir is not None:  # no probe of a class-conditional model without a null class
            shutil.copyfile(Path(probe_dir) / "layers.tsv", tmp / "probe.tsv")  # top-1 per layer
    with atomic_path(out_dir / "grid.png") as tmp:
        shutil.copyfile(grid, tmp)
    inputs = {"metrics": Path(evaluate_dir) / "metrics.json",
              **({"cas": Path(cas_dir) / "metrics.json"} if cas_dir is not None else {}),
              **({"probe": Path(probe_dir) / "metrics.json"} if probe_dir is not None else {}),
              "upper_bound": Path(upper_bound_dir) / "metrics.json", "grid": grid} | {f"{s}_log": p for s, p in logs.items()}
    write_json(out_dir / "report.json", {"details": {k: v for k, v in measured.items() if k not in metrics},
                                         "provenance": provenance(config, "report", inputs)})
    write_json(out_dir / "metrics.json", metrics)
