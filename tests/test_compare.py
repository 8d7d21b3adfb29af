"""`digit compare`: one table of the settings that differ between experiments, their metrics,
and the paper's published rows."""
import copy
import json

import pytest
import yaml

from digit.cli import main

METRICS = {
    "base": {"experiment": "base", "fid": 17.045661, "fid_calibrated": False, "inception_score": 1.000871,
             "kid": 0.040997, "gan_test": 0.48, "cas": 0.37, "chance": 0.1, "probe_top1_best": 0.995,
             "upper_bound_fid": 14.514546,
             "stage1_steps": 600},
    "big-k": {"experiment": "big-k", "fid": 12.3456, "fid_calibrated": False, "inception_score": 1.25,
              "kid": 0.02, "precision": 0.61, "recall": 0.4, "gan_test": 0.52, "chance": 0.1,
              "probe_top1_best": 0.75, "upper_bound_fid": 9.87},
}


def write_experiment(config: dict, name: str, k: int, decoder: str, root) -> str:
    """A config named `name` with kmeans.k and stage2.decoder set, and its results/<name>/metrics.json."""
    config = copy.deepcopy(config)
    config["experiment"] = name
    config["kmeans"]["k"] = k
    config["stage2"]["decoder"] = decoder
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    (root / "results" / name).mkdir(parents=True)
    (root / "results" / name / "metrics.json").write_text(json.dumps(METRICS[name]))
    if name == "base":  # the VQ reconstructions' IS is one of the report's details, not in metrics.json
        (root / "results" / name / "report.json").write_text(json.dumps({"details": {"vq_recon_inception_score": 42.0}}))
    return str(path)


@pytest.fixture
def configs(demo_config, in_tmp) -> list[str]:
    return [write_experiment(demo_config, "base", 256, "ar", in_tmp),
            write_experiment(demo_config, "big-k", 512, "nar", in_tmp)]


def compare(capsys, *args: str) -> str:
    assert main(["compare", *args]) == 0
    return capsys.readouterr().out


def tsv_rows(capsys, *args: str) -> dict[str, dict[str, str]]:
    """The TSV table as experiment -> {column header: cell}."""
    header, *rows = [line.split("\t") for line in compare(capsys, *args, "--format", "tsv").splitlines()]
    assert header[0] == "experiment"
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_settings_that_differ_and_the_metrics(configs, capsys):
    rows = tsv_rows(capsys, "--configs", *configs)
    assert list(rows) == ["base", "big-k"]
    settings = [column for column in rows["base"] if "." in column]
    assert settings == ["kmeans.k", "stage2.decoder"]  # equal keys (encoder.arch, sample.top_k, ...) left out
    assert (rows["base"]["kmeans.k"], rows["base"]["stage2.decoder"]) == ("256", "ar")
    assert (rows["big-k"]["kmeans.k"], rows["big-k"]["stage2.decoder"]) == ("512", "nar")
    assert {"FID": "17.05", "FID calibrated": "no", "IS": "1.00", "KID": "0.041", "GAN-test": "0.48", "CAS": "0.37",
            "chance": "0.1", "probe top-1": "0.995", "UB FID": "14.51"}.items() <= rows["base"].items()
    assert (rows["big-k"]["GAN-test"], rows["big-k"]["CAS"]) == ("0.52", "-")  # no CAS measured: '-'
    header = list(rows["base"])
    assert header.index("GAN-test") + 1 == header.index("CAS") == header.index("chance") - 1
    assert rows["base"]["precision"] == rows["base"]["recall"] == rows["base"]["VQ PSNR"] == "-"
    assert (rows["base"]["VQ IS"], rows["big-k"]["VQ IS"]) == ("42.00", "-")  # from report.json's details
    assert (rows["big-k"]["FID"], rows["big-k"]["precision"], rows["big-k"]["recall"]) == ("12.35", "0.61", "0.4")


def test_text_table_is_aligned(configs, capsys):
    header, base, big_k = compare(capsys, "--configs", *configs).splitlines()
    assert header.startswith("experiment") and base.startswith("base ") and big_k.startswith("big-k ")
    for column, base_value, big_k_value in (("kmeans.k", "256", "512"), ("stage2.decoder", "ar", "nar"),
                                            ("FID", "17.05", "12.35")):
        end = header.index(f" {column} ") + 1 + len(column)  # values are right-aligned under their header
        assert base[:end].endswith(f" {base_value}") and big_k[:end].endswith(f" {big_k_value}")


def test_markdown_table(configs, capsys):
    header, rule, base, _ = compare(capsys, "--configs", *configs, "--format", "markdown").splitlines()
    assert header.startswith("| experiment | kmeans.k | stage2.decoder | FID |")
    assert rule == "|" + " --- |" * header.count(" | ") + " --- |"
    assert base.startswith("| base | 256 | ar | 17.05 |")


def test_one_config_shows_the_key_settings(configs, capsys):
    rows = tsv_rows(capsys, "--configs", configs[1])
    settings = {column: value for column, value in rows["big-k"].items() if "." in column}
    assert settings == {"encoder.arch": "vit_small_patch14_reg4_dinov2", "kmeans.k": "512", "stage1.preset": "tiny",
                        "stage2.decoder": "nar", "sample.top_k": "50", "sample.cfg_scale": "1.0"}


def test_published_rows_are_labelled_and_in_the_metric_columns(configs, capsys):
    assert "DiGIT paper" not in compare(capsys, "--configs", *configs)
    rows = tsv_rows(capsys, "--configs", *configs, "--published")
    paper = {name: row for name, row in rows.items() if name.startswith("DiGIT paper (ImageNet 256): ")}
    assert len(paper) == 11 and list(rows)[:2] == ["base", "big-k"]
    class_cond = paper["DiGIT paper (ImageNet 256): class-cond. 219M + AR"]
    assert (class_cond["FID"], class_cond["IS"], class_cond["CAS"]) == ("4.79", "142.87", "-")
    assert (class_cond["kmeans.k"], class_cond["stage2.decoder"]) == ("", "")
    large = paper["DiGIT paper (ImageNet 256): uncond. 732M + AR"]
    assert (large["FID"], large["IS"]) == ("4.59", "141.29")
    upper = paper["DiGIT paper (ImageNet 256): upper bound (UB FID, UB IS)"]
    assert (upper["UB FID"], upper["UB IS"], upper["FID"]) == ("1.92", "184.40", "-")
    vq_only = paper["DiGIT paper (ImageNet 256): upper bound, VQ only (VQ FID, VQ IS)"]
    assert (vq_only["VQ FID"], vq_only["VQ IS"], vq_only["UB FID"], vq_only["FID"]) == ("1.67", "175.56", "-", "-")
    baseline = paper["DiGIT paper (ImageNet 256): uncond. VQ-token baseline 219M + AR"]
    assert (baseline["FID"], baseline["IS"], baseline["UB FID"]) == ("24.38", "30.93", "-")
    assert paper["DiGIT paper (ImageNet 256): linear probe 219M"]["probe top-1"] == "0.717"
    assert paper["DiGIT paper (ImageNet 256): linear probe 732M"]["probe top-1"] == "0.803"


def test_missing_metrics_names_the_experiment_and_path(configs, in_tmp, capsys):
    (in_tmp / "results" / "big-k" / "metrics.json").unlink()
    assert main(["compare", "--configs", *configs]) == 1
    err = capsys.readouterr().err
    assert "'big-k'" in err and "results/big-k/metrics.json not found" in err and "run its pipeline first" in err


def test_two_configs_of_one_experiment_are_refused(configs, in_tmp, capsys):
    copy_path = in_tmp / "base-copy.yaml"
    copy_path.write_text((in_tmp / "base.yaml").read_text())
    assert main(["compare", "--configs", configs[0], str(copy_path)]) == 1
    assert "both name experiment 'base'" in capsys.readouterr().err


def test_invalid_config_is_named(configs, in_tmp, capsys):
    config = yaml.safe_load((in_tmp / "base.yaml").read_text()) | {"unknown_key": 1}
    (in_tmp / "bad.yaml").write_text(yaml.safe_dump(config))
    assert main(["compare", "--configs", configs[0], str(in_tmp / "bad.yaml")]) == 2
    assert "bad.yaml" in capsys.readouterr().err
