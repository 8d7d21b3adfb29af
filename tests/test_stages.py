"""The stage table (digit/stages.py): what each stage's outputs depend on, and nothing else.

A module edit changes the code hash of exactly the stages whose packages hold it; every module a
stage runs is in its packages; the same inputs give the same bytes across an unrelated commit; the
demo's synthetic images are the same bytes on every x86-64 machine."""
import ast
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ENV, REPO, tree_digest

from digit.data.synthetic import run_synthesize
from digit.runtime.config import load_config
from digit.stages import COMMANDS, PACKAGE, STAGE_OF_COMMAND, STAGES, code_sha256

PACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
MODULES = sorted(p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_package_is_the_code_of_a_stage_and_every_stage_names_real_packages():
    named = {package for stage in STAGES.values() for package in stage.code}
    assert named == set(PACKAGES)


@pytest.mark.parametrize("module", MODULES, ids=str)
def test_editing_a_module_changes_the_code_of_exactly_its_stages(module, tmp_path):
    copy = tmp_path / "digit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = {name: code_sha256(name, copy) for name in STAGES}
    with (copy / module).open("a") as f:
        f.write("\n# an edit\n")
    after = {name: code_sha256(name, copy) for name in STAGES}
    changed = {name for name in STAGES if after[name] != before[name]}
    # top-level modules (cli.py, stages.py) run stages but are the code of none: the table's changes
    # reach DVC and Snakemake as changed params and deps, the CLI only dispatches
    expected = {name for name, stage in STAGES.items() if module.parts[0] in stage.code} if len(module.parts) > 1 else set()
    assert changed == expected


def digit_imports(module: str) -> set[str]:
    """The digit modules that `module` imports, anywhere in it (inside functions too)."""
    path = REPO / (module.replace(".", "/") + ".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("digit"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if (REPO / node.module.replace(".", "/") / f"{a.name}.py").is_file()}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("digit")}
    return {m for m in found if (REPO / (m.replace(".", "/") + ".py")).is_file()}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_stage_runs_no_module_outside_its_code(command):
    stage = STAGES[STAGE_OF_COMMAND[command]]
    seen, todo = set(), [COMMANDS[command].target.split(":")[0]]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += digit_imports(module)
    outside = {m for m in seen if m != "digit.stages" and m.split(".")[1] not in stage.code}
    assert not outside, f"{command} runs {sorted(outside)}, outside its code {stage.code} (digit/stages.py)"


def run_stage(repo: Path, *args: str):
    """A stage of the checkout in `repo`, run with that checkout's own code."""
    env = {**ENV, "PYTHONPATH": str(repo), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    done = subprocess.run([sys.executable, "-m", "digit.cli", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def git(repo: Path, *args: str):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env={**ENV, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})


def test_an_unrelated_commit_leaves_the_outputs_byte_identical(tiny_config, tmp_path):
    from test_end_to_end import copy_repo

    repo = tmp_path / "repo"
    copy_repo(repo)
    (repo / "tiny.yaml").write_text(yaml.safe_dump(tiny_config))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "first")
    digests, logs = [], []
    for _ in range(2):
        logs.append(run_stage(repo, "synthesize", "--config", "tiny.yaml", "--out", "out/data"))
        run_stage(repo, "prepare", "--config", "tiny.yaml", "--data", "out/data", "--out", "out/prepare")
        digests.append(tree_digest(repo / "out"))
        with (repo / "README.md").open("a") as f:
            f.write("\nAn unrelated change.\n")
        git(repo, "commit", "-qam", "an unrelated change")
    assert digests[0] == digests[1]
    # the commit is in the run's log, outside the outputs
    commits = [line.split()[-1] for log in logs for line in log.splitlines() if ": code " in line]
    assert len(set(commits)) == 2


# The demo's images (config/config.yaml: 10 classes x 220, 64x64): sha256 over their paths and bytes.
# numpy's seeded generators, PIL's drawing and zlib's PNG encoding give the same bytes on any x86-64
# CPU, so that `dvc repro` or `dvc pull` on another machine starts from the same data.
DEMO_IMAGES_SHA256 = "9e716d2a48d96dfec884657426b87918c12a37cb272b63c3b1d627ace1941889"


def test_the_demo_images_are_pinned(tmp_path):
    config = load_config(REPO / "config/config.yaml")
    run_synthesize(config, tmp_path / "data")
    h = hashlib.sha256()
    for path, digest in tree_digest(tmp_path / "data").items():
        if path.endswith(".png"):
            h.update(f"{path}\0{digest}\n".encode())
    assert h.hexdigest() == DEMO_IMAGES_SHA256


def test_the_readme_layout_names_every_package_and_module():
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("```", layout.index("```") + 3)]
    for module in MODULES:
        if module.name == "__init__.py":
            continue
        if len(module.parts) == 1:
            assert f"digit/{module}" in layout, module
        else:
            row = layout[layout.index(f"digit/{module.parts[0]}/"):]
            row = row[:row.index("\ndigit/") if "\ndigit/" in row else len(row)]
            assert module.name.removesuffix(".py") in row, module
