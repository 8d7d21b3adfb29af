"""The workflow layer: config validation, the Snakemake DAG, and its agreement with dvc.yaml."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RULES = {"synthesize", "prepare", "features_shard", "features", "kmeans", "tokenize_shard", "tokenize", "train_vq", "tokenize_vq",
         "train_ar", "train_decoder", "probe", "sample_shard", "sample", "train_classifier", "evaluate",
         "upper_bound", "stability", "report"}
# Rules with inputs only, targets that name a group of shard jobs; the full DAG does not plan them.
TARGETS = {"features"}
# DVC stages that run several rules (`--allowed-rules A B ... -- target`): the stage is named after its target.
GROUPED = {"features": ["features_shard", "features"], "tokenize": ["tokenize_shard", "tokenize"],
           "sample": ["sample_shard", "sample"]}


def snakemake(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *args],
                          cwd=cwd, capture_output=True, text=True)


def planned_jobs(output: str) -> dict[str, dict[str, list[str]]]:
    """Parse a dry run's job listing: rule -> {'input': [...], 'output': [...]}, over all its jobs."""
    jobs = {}
    for block in re.split(r"\n(?=(?:localrule|rule) )", output):
        head = re.match(r"(?:localrule|rule) (\w+):", block)
        if not head:
            continue
        fields = jobs.setdefault(head.group(1), {"input": [], "output": []})
        for key in fields:
            m = re.search(rf"^\s+{key}: (.+)$", block, re.M)
            if m:
                fields[key] += [p.strip() for p in m.group(1).split(",")]
    return jobs


def fake_imagenet(root: Path, classes=("n01440764", "n01443537")):
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            (root / split / c / f"{c}_1.JPEG").write_bytes(b"")


def test_dry_run_plans_every_stage_of_the_demo(in_tmp):
    result = snakemake("-n", "--configfile", str(REPO / "config/config.yaml"), "-d", str(in_tmp))
    assert result.returncode == 0, result.stderr
    assert set(planned_jobs(result.stdout)) == RULES - TARGETS | {"all"}


@pytest.mark.parametrize("name", ["imagenet-base", "imagenet-large"])
def test_imagenet_configs_plan(in_tmp, name):
    config = yaml.safe_load((REPO / f"config/{name}.yaml").read_text())
    fake_imagenet(in_tmp / "imagenet")
    config["data"]["root"] = str(in_tmp / "imagenet")
    (in_tmp / "c.yaml").write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--configfile", "c.yaml", "-d", str(in_tmp), cwd=in_tmp)
    assert result.returncode == 0, result.stderr
    jobs = planned_jobs(result.stdout)
    assert set(jobs) == RULES - TARGETS - {"synthesize"} | {"all"}
    assert jobs["prepare"]["input"] == [str(in_tmp / "imagenet")]
    assert jobs["report"]["output"][0] == f"results/{name}/metrics.json"
    for rule, count in (("features_shard", config["kmeans"]["feature_shards"]),
                        ("tokenize_shard", config["tokenize"]["shards"]), ("sample_shard", 50)):
        shards = re.findall(rf"rule {rule}:\n(?:.*\n)*?\s+wildcards: shard=(\d+)", result.stdout)
        assert sorted(map(int, shards)) == list(range(count)), rule


def test_bad_config_key_stops_snakemake_and_cli(in_tmp):
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["kmeans"]["clusters"] = 10
    config["stage1"]["lr"] = -1
    (in_tmp / "bad.yaml").write_text(yaml.safe_dump(config))
    result = snakemake("-n", "--configfile", "bad.yaml", cwd=in_tmp)
    assert result.returncode != 0
    assert "clusters" in result.stderr + result.stdout
    cli = subprocess.run([sys.executable, "-m", "digit.cli", "check-config", "--config", "bad.yaml"],
                         cwd=in_tmp, capture_output=True, text=True)
    assert cli.returncode == 2
    assert "key 'kmeans'" in cli.stderr and "clusters" in cli.stderr and "key 'stage1.lr'" in cli.stderr


def test_command_line_overrides_are_refused(in_tmp):
    result = snakemake("-n", "--configfile", str(REPO / "config/config.yaml"),
                       "--config", "seed=3", cwd=in_tmp)
    assert result.returncode != 0
    assert "overrides are not supported" in result.stderr + result.stdout


def test_lint_is_clean():
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dvc_stages_mirror_the_snakemake_rules(in_tmp):
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert dvc["vars"] == ["config/config.yaml"]
    stages = dvc["stages"]
    grouped = {rule for rules in GROUPED.values() for rule in rules}
    assert set(stages) == RULES - grouped | set(GROUPED)

    dry = snakemake("-n", "--configfile", str(REPO / "config/config.yaml"), "-d", str(in_tmp), "all", *TARGETS)
    jobs = planned_jobs(dry.stdout)
    sys.path.insert(0, str(REPO / "workflow" / "rules"))
    stage_params = _stage_params()

    def resolve(path):
        return path.replace("${experiment}", config["experiment"])

    def paths(entries):
        return sorted(resolve(next(iter(e)) if isinstance(e, dict) else e) for e in entries)

    # the shards of a target-only group are one DVC output: their folder
    folder_of = {out: os.path.dirname(out) for target in TARGETS for out in jobs[GROUPED[target][0]]["output"]}
    for name, stage in stages.items():
        rules = " ".join(GROUPED.get(name, [name]))
        assert f"--allowed-rules {rules} --forcerun {rules} -- {name}" in stage["cmd"], name
        deps = [d for d in paths(stage.get("deps", [])) if not d.startswith("digit/")]
        made_inside = {folder_of.get(o, o) for rule in GROUPED.get(name, [name]) for o in jobs[rule]["output"]}
        inputs = {folder_of.get(i, i) for rule in GROUPED.get(name, [name]) for i in jobs[rule]["input"]} - made_inside
        assert deps == sorted(inputs), name
        outs = paths(stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []))
        made = jobs[name]["output"] or made_inside  # a target-only rule: its shards' folder
        assert outs == sorted(made), name
        (params,) = stage["params"]
        assert params["config/config.yaml"] == stage_params[name], name
        for dep in stage.get("deps", []):
            if dep.startswith("digit/"):
                assert (REPO / dep).is_file(), dep


def _stage_params() -> dict:
    """STAGE_PARAMS from common.smk, read without running Snakemake."""
    source = (REPO / "workflow/rules/common.smk").read_text()
    block = source[source.index("STAGE_PARAMS = {"):]
    block = block[: block.index("\n}\n") + 3]
    namespace = {}
    exec(block, namespace)
    return namespace["STAGE_PARAMS"]
