"""The project's own files: environment.yml matches pyproject, the CLI documents every stage."""
import re
import subprocess
import sys

import tomllib
import yaml
from conftest import REPO


def test_environment_yml_has_the_pyproject_packages():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]).union(*project["optional-dependencies"].values())
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(pip) - {"-e ."} == wanted
    assert "-e ." in pip
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert re.fullmatch(r"python=3\.1[0-9]", python)


def test_cli_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "digit.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for stage in ("synthesize", "prepare", "features", "kmeans", "tokenize", "train-vq", "tokenize-vq",
                  "train-ar", "train-decoder", "sample", "train-classifier", "evaluate", "cas", "report"):
        assert stage in out


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert "make test" in (REPO / "README.md").read_text()
