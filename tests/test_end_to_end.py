"""The whole chain on a shrunk demo config through Snakemake, with either stage-2 decoder (the
chain through DVC: tests/test_dvc.py)."""
import json
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ENV, REPO, snakemake_args
from digit.gpt import PRESETS

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("workflow_run")]


def run(args, cwd):
    result = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def check_results(results: Path, config: dict):
    metrics = json.loads((results / "metrics.json").read_text())
    for key in ("fid", "inception_score", "cas", "chance", "fid_calibrated", "probe_top1_best", "probe_best_layer",
                "upper_bound_fid", "upper_bound_inception_score", "upper_bound_psnr", "vq_recon_fid", "vq_recon_psnr"):
        assert key in metrics, key
    assert 0 < metrics["upper_bound_psnr"] < 100 and metrics["upper_bound_num_images"] >= 2
    assert metrics["chance"] == pytest.approx(1 / config["data"]["synthetic"]["num_classes"])
    assert 0 <= metrics["cas"] <= 1 and metrics["fid"] >= 0
    assert (results / "grid.png").stat().st_size > 0
    samples = sorted((results / "samples" / "images").glob("*.png"))
    assert len(samples) == config["sample"]["per_class"] * config["data"]["synthetic"]["num_classes"]
    for curve in ("vq", "stage1", "stage2"):
        lines = (results / "curves" / f"{curve}.tsv").read_text().splitlines()
        assert lines[0].split("\t")[0] == "step" and len(lines) > 1
    layers = (results / "curves" / "probe.tsv").read_text().splitlines()
    assert layers[0] == "layer\ttop1" and len(layers) == 1 + PRESETS[config["stage1"]["preset"]]["n_layer"]


def test_snakemake_runs_the_chain(workflow_run):
    """The session's run of the whole chain (ar decoder), then a dry run with nothing left to do."""
    config = yaml.safe_load((workflow_run / "tiny.yaml").read_text())
    assert config["stage2"]["decoder"] == "ar"
    check_results(workflow_run / "results" / "tiny", config)
    assert "Nothing to be done" in run(snakemake_args("-n"), cwd=workflow_run)


def test_snakemake_runs_the_chain_with_the_nar_decoder(workflow_run, tmp_path):
    """The nar decoder in a copy of the session's run: Snakemake re-runs stage 2 and what follows
    it (its config keys changed), and none of the stages before it, whose outputs do not depend on
    the decoder."""
    directory = tmp_path / "nar"
    shutil.copytree(workflow_run, directory)  # file times kept: Snakemake sees the same outputs
    for path in [directory, *directory.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    config = yaml.safe_load((directory / "tiny.yaml").read_text())
    config["stage2"]["decoder"] = "nar"
    (directory / "tiny.yaml").write_text(yaml.safe_dump(config))
    log = run(snakemake_args(), cwd=directory)
    ran = set(re.findall(r"^(?:local)?rule (\w+):", log, re.M))
    assert {"train_decoder", "sample_shard", "sample", "evaluate", "upper_bound", "report"} <= ran, log
    assert not ran & {"synthesize", "prepare", "features_shard", "kmeans", "tokenize", "train_vq", "tokenize_vq",
                      "train_ar", "probe", "train_classifier", "stability"}, log
    assert json.loads((directory / "results/tiny/stage2/model.json").read_text())["decoder"] == "nar"
    check_results(directory / "results" / "tiny", config)
    assert "Nothing to be done" in run(snakemake_args("-n"), cwd=directory)


def copy_repo(dest: Path):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel, follow_symlinks=False)
