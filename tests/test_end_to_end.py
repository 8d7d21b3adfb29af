"""The whole chain on a shrunk demo config: through Snakemake, and through DVC (twice)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from digit.gpt import PRESETS

pytestmark = pytest.mark.e2e

ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


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


@pytest.mark.parametrize("decoder", ["ar", "nar"])
def test_snakemake_runs_the_chain(decoder, tiny_config, in_tmp):
    tiny_config["stage2"]["decoder"] = decoder
    (in_tmp / "tiny.yaml").write_text(yaml.safe_dump(tiny_config))
    run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
         "--profile", str(REPO / "workflow/profiles/default"), "--configfile", "tiny.yaml",
         "-d", str(in_tmp)], cwd=in_tmp)
    check_results(in_tmp / "results" / "tiny", tiny_config)
    again = run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                 "--profile", str(REPO / "workflow/profiles/default"), "--configfile", "tiny.yaml",
                 "-d", str(in_tmp), "-n"], cwd=in_tmp)
    assert "Nothing to be done" in again


def copy_repo(dest: Path):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel, follow_symlinks=False)


def test_dvc_repro_runs_the_chain_then_has_nothing_to_do(tiny_config, tmp_path):
    repo = tmp_path / "repo"
    copy_repo(repo)
    (repo / "config" / "config.yaml").write_text(yaml.safe_dump(tiny_config))
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo)
    run(["dvc", "repro"], repo)
    check_results(repo / "results" / "tiny", tiny_config)
    second = run(["dvc", "repro"], repo)
    assert "Running stage" not in second
    assert "up to date" in run(["dvc", "status"], repo)
