"""Linear probe of the frozen stage-1 model: per-layer top-1, the hidden class, refusals."""
import json

import numpy as np
import pytest
from test_train import CLASSES, K, N, sem_tokens, write_cache

from digit.evaluate.probe import run_probe
from digit.generate.gpt import PRESETS
from digit.generate.train import run_train_ar


@pytest.fixture
def stage1(tiny_config, tmp_path):
    """Stage 1 trained on tokens that spell out the class, and that token cache."""
    labels = np.arange(N) % CLASSES
    tokens = write_cache(tmp_path / "tokens", "discriminative", sem_tokens(labels), labels, K,
                         codebook_sha256="c" * 64)
    tiny_config["stage1"].update(steps=20, batch_size=16)
    run_train_ar(tiny_config, tokens, tmp_path / "stage1")
    return tiny_config, tmp_path / "stage1", tokens


def test_probe_reads_the_class_from_every_layer(stage1, tmp_path):
    config, stage1_dir, tokens = stage1
    config["probe"].update(epochs=30, batch_size=16, lr=0.1)
    run_probe(config, stage1_dir, tokens, tmp_path / "probe")
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    layers = PRESETS[config["stage1"]["preset"]]["n_layer"]
    top1 = [metrics[f"probe_top1_layer{i:02d}"] for i in range(1, layers + 1)]
    # the tokens determine the class, so every layer's mean features separate the classes
    assert min(top1) == 1.0 and metrics["probe_top1_best"] == 1.0
    assert metrics["probe_chance"] == pytest.approx(1 / CLASSES)
    rows = (tmp_path / "probe" / "layers.tsv").read_text().splitlines()
    assert rows[0] == "layer\ttop1" and len(rows) == layers + 1
    epochs = (tmp_path / "probe" / "log.tsv").read_text().splitlines()[1:]
    assert len(epochs) == 30 and float(epochs[-1].split("\t")[1]) < float(epochs[0].split("\t")[1])


def test_probe_refuses_a_model_that_would_be_told_the_class(stage1, tmp_path):
    config, stage1_dir, tokens = stage1
    meta = json.loads((stage1_dir / "model.json").read_text())
    (stage1_dir / "model.json").write_text(json.dumps({**meta, "null_class": None}))
    with pytest.raises(ValueError, match="class_dropout"):
        run_probe(config, stage1_dir, tokens, tmp_path / "probe")
    assert not (tmp_path / "probe").exists()


def test_probe_refuses_a_cache_of_another_codebook(stage1, tmp_path):
    config, stage1_dir, tokens = stage1
    meta = json.loads((tokens / "meta.json").read_text())
    (tokens / "meta.json").write_text(json.dumps({**meta, "codebook_sha256": "d" * 64}))
    with pytest.raises(ValueError, match="codebook_sha256"):
        run_probe(config, stage1_dir, tokens, tmp_path / "probe")
