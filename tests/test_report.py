import json

import pytest

from digit.evaluate.report import run_report

LOGS = {
    "vq": "step\tloss\trecon\tcommit\n10\t0.5\t0.4\t0.1\n20\t0.3\t0.25\t0.05\n",
    "stage1": "step\tloss\tlr\ttokens_per_s\tgrad_norm\n5\t4.0\t0.001\t100\t1.0\n6\t3.5\t0.0009\t110\t0.9\n",
    "stage2": "step\tloss\tlr\ttokens_per_s\tgrad_norm\n6\t2.5\t0.001\t90\t1.2\n",
}
PROBE_LAYERS = "layer\ttop1\n1\t0.5\n2\t0.7\n"


@pytest.fixture
def stage_dirs(in_tmp):
    for stage, log in LOGS.items():
        (in_tmp / stage).mkdir()
        (in_tmp / stage / "log.tsv").write_text(log)
    (in_tmp / "evaluate").mkdir()
    (in_tmp / "evaluate" / "metrics.json").write_text(json.dumps({"fid": 12.5, "gan_test": 0.4, "chance": 0.1}))
    (in_tmp / "cas").mkdir()
    (in_tmp / "cas" / "metrics.json").write_text(json.dumps({"cas": 0.3, "cas_skipped": None, "cas_train_samples": 6}))
    (in_tmp / "probe").mkdir()
    (in_tmp / "probe" / "metrics.json").write_text(json.dumps({"probe_top1_best": 0.7, "probe_best_layer": 2}))
    (in_tmp / "probe" / "layers.tsv").write_text(PROBE_LAYERS)
    (in_tmp / "upper_bound").mkdir()
    (in_tmp / "upper_bound" / "metrics.json").write_text(json.dumps({"upper_bound_fid": 3.0, "vq_recon_psnr": 25.0}))
    (in_tmp / "samples").mkdir()
    (in_tmp / "samples" / "grid.png").write_bytes(b"\x89PNG fake")
    return {name: in_tmp / name for name in ("evaluate", "cas", "probe", "upper_bound", "stage1", "stage2", "vq",
                                             "samples")}


def report(config, dirs, out):
    run_report(config, dirs["evaluate"], dirs["cas"], dirs["probe"], dirs["upper_bound"], dirs["stage1"],
               dirs["stage2"], dirs["vq"], dirs["samples"], out)


def test_report_outputs(tiny_config, stage_dirs, in_tmp):
    out = in_tmp / "results" / "tiny"
    report(tiny_config, stage_dirs, out)
    metrics = json.loads((out / "metrics.json").read_text())
    # GAN-test from evaluate, CAS from the cas stage: both headline figures
    assert metrics == {"fid": 12.5, "gan_test": 0.4, "cas": 0.3, "chance": 0.1, "probe_top1_best": 0.7,
                       "upper_bound_fid": 3.0, "vq_recon_psnr": 25.0, "vq_final_loss": 0.3, "stage1_final_loss": 3.5,
                       "stage2_final_loss": 2.5}
    details = json.loads((out / "report.json").read_text())["details"]
    assert details == {"experiment": "tiny", "cas_skipped": None, "cas_train_samples": 6, "probe_best_layer": 2,
                       "vq_steps": 20, "stage1_steps": 6, "stage2_steps": 6}
    assert set(json.loads((out / "report.json").read_text())["provenance"]["inputs"]) >= {"metrics", "cas"}
    for stage, log in LOGS.items():
        assert (out / "curves" / f"{stage}.tsv").read_text() == log
    assert (out / "curves" / "probe.tsv").read_text() == PROBE_LAYERS
    assert (out / "grid.png").read_bytes() == b"\x89PNG fake"
    assert "inputs" in json.loads((out / "report.json").read_text())["provenance"]


def test_report_names_a_missing_log(tiny_config, stage_dirs, in_tmp):
    (stage_dirs["stage2"] / "log.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="stage2"):
        report(tiny_config, stage_dirs, in_tmp / "out")
    assert not (in_tmp / "out" / "metrics.json").exists()


def test_a_pretrained_vq_model_reports_zero_steps(tiny_config, stage_dirs, in_tmp):
    (stage_dirs["vq"] / "log.tsv").write_text(LOGS["vq"].splitlines(keepends=True)[0])  # header only
    report(tiny_config, stage_dirs, in_tmp / "out")
    metrics = json.loads((in_tmp / "out" / "metrics.json").read_text())
    details = json.loads((in_tmp / "out" / "report.json").read_text())["details"]
    assert details["vq_steps"] == 0 and "vq_final_loss" not in metrics


def test_unconditional_samples_have_no_gan_test_or_cas(tiny_config, stage_dirs, in_tmp):
    """Both null (unconditional samples): neither is a headline figure, and the reasons are details."""
    (stage_dirs["evaluate"] / "metrics.json").write_text(json.dumps(
        {"fid": 12.5, "gan_test": None, "gan_test_skipped": "unconditional samples", "chance": 0.1}))
    (stage_dirs["cas"] / "metrics.json").write_text(json.dumps(
        {"cas": None, "cas_skipped": "unconditional samples", "cas_train_samples": 6}))
    report(tiny_config, stage_dirs, in_tmp / "out")
    metrics = json.loads((in_tmp / "out" / "metrics.json").read_text())
    details = json.loads((in_tmp / "out" / "report.json").read_text())["details"]
    assert "gan_test" not in metrics and "cas" not in metrics and metrics["fid"] == 12.5
    assert details["gan_test_skipped"] == details["cas_skipped"] == "unconditional samples"


def test_a_report_without_a_probe_or_stage_2(tiny_config, stage_dirs, in_tmp):
    """A class-conditional model without a null class has no probe; the VQ-token baseline no stage 2;
    classifier.enabled: false, no CAS."""
    out = in_tmp / "out"
    run_report(tiny_config, stage_dirs["evaluate"], None, None, stage_dirs["upper_bound"], stage_dirs["stage1"], None,
               stage_dirs["vq"], stage_dirs["samples"], out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "probe_top1_best" not in metrics and "stage2_final_loss" not in metrics and metrics["fid"] == 12.5
    assert "cas" not in metrics and metrics["gan_test"] == 0.4
    assert sorted(p.name for p in (out / "curves").iterdir()) == ["stage1.tsv", "vq.tsv"]
    assert set(json.loads((out / "report.json").read_text())["provenance"]["inputs"]) == {
        "metrics", "upper_bound", "grid", "vq_log", "stage1_log"}
