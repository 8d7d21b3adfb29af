"""Linear probe of the frozen stage-1 model: the published features, per-layer top-1, the hidden
class, streaming statistics, batch-split independence, determinism, resume, refusals."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import CLASSES, K, K_VQ, N, VIEWS, sem_tokens, write_cache

import digit.evaluate.probe
import digit.generate.gpt
from digit.evaluate.probe import FrozenFeatures, feature_statistics, pooled_features, run_probe
from digit.generate.gpt import GPT, PRESETS, GPTConfig
from digit.generate.train import load_stage, run_train_ar
from digit.runtime.token_cache import load_token_cache

ARCHS = getattr(digit.generate.gpt, "ARCHS", ("prenorm",))


@pytest.fixture
def stage1(tiny_config, tmp_path):
    """Stage 1 trained on tokens that spell out the class, and that token cache."""
    labels = np.arange(N) % CLASSES
    tokens = write_cache(tmp_path / "tokens", "discriminative", sem_tokens(labels), labels, K,
                         codebook_sha256="c" * 64)
    tiny_config["stage1"].update(steps=20, batch_size=16)
    run_train_ar(tiny_config, tokens, tmp_path / "stage1")
    return tiny_config, tmp_path / "stage1", tokens


def outputs(probe_dir):
    """metrics.json, the tensors of probe.safetensors and log.tsv of a probe's output."""
    return (json.loads((probe_dir / "metrics.json").read_text()), load_file(probe_dir / "probe.safetensors"),
            (probe_dir / "log.tsv").read_text())


def epoch_losses(log):
    return [float(row.split("\t")[1]) for row in log.splitlines()[1:]]


def top1_per_layer(metrics, layers):
    return [metrics[f"probe_top1_layer{i:02d}"] for i in range(1, layers + 1)]


@pytest.mark.parametrize("arch", ARCHS)
def test_features_are_the_embedding_output_and_the_first_blocks_mean_pooled_with_the_start_token(arch):
    """fairseq's inner_states[0..L-1] averaged over all positions, [start, t1..t_{T-1}], by hand."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=7, seq_len=4, prefix_vocab_size=3, prefix_len=1, n_layer=3, n_head=2, n_embd=8,
                    n_ffn=16, **({} if arch == "prenorm" else {"arch": arch}))
    model = GPT(cfg).eval()
    prefix, tokens = torch.tensor([[2]]), torch.tensor([[4, 1, 6]])
    features = pooled_features(model, prefix, tokens)
    assert features.shape == (1, cfg.n_layer, cfg.n_embd) and features.dtype == torch.float32

    scale = getattr(model, "embed_scale", 1.0)
    with torch.no_grad():
        rows = [scale * model.prefix_emb.weight[2] + model.prefix_pos.weight[0]]
        rows += [scale * model.tok_emb.weight[t] + model.tok_pos.weight[i] for i, t in enumerate([4, 1, 6])]
        embedding = torch.stack(rows)  # the 4 positions, the start token first
        # layer 1: the embedding output, (start + t1 + t2 + t3) / 4
        torch.testing.assert_close(features[0, 0], (rows[0] + rows[1] + rows[2] + rows[3]) / 4)
        block1 = model.blocks[0](embedding[None])
        block2 = model.blocks[1](block1)
        torch.testing.assert_close(features[0, 1], block1[0].mean(0))
        torch.testing.assert_close(features[0, 2], block2[0].mean(0))
        # the model's own pass agrees, and its last block (and final norm) are not probed
        hidden = []
        model.trunk(embedding[None], hidden=hidden)
        torch.testing.assert_close(features[:, 1:], torch.stack([h.mean(1) for h in hidden[:-1]], dim=1))
    assert not torch.allclose(features[0, 1], block1[0, 1:].mean(0))  # the start token is averaged in


def test_probe_reads_the_class_from_every_layer(stage1, tmp_path):
    config, stage1_dir, tokens = stage1
    config["probe"].update(epochs=30, batch_size=16, lr=0.1)
    run_probe(config, stage1_dir, tokens, tmp_path / "probe")
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    layers = PRESETS[config["stage1"]["preset"]]["n_layer"]
    top1 = top1_per_layer(metrics, layers)
    # the tokens determine the class, so every layer's mean features separate the classes
    assert min(top1) == 1.0 and metrics["probe_top1_best"] == 1.0
    assert metrics["probe_chance"] == pytest.approx(1 / CLASSES)
    rows = (tmp_path / "probe" / "layers.tsv").read_text().splitlines()
    assert rows[0] == "layer\ttop1" and len(rows) == layers + 1
    epochs = (tmp_path / "probe" / "log.tsv").read_text().splitlines()[1:]
    assert len(epochs) == 30 and float(epochs[-1].split("\t")[1]) < float(epochs[0].split("\t")[1])
    assert not (tmp_path / "probe.partial").exists()


def test_unconditional_model_is_probed_from_its_start_token(tiny_config, tmp_path, monkeypatch):
    """The paper's setting: an unconditional stage 1."""
    labels = np.arange(N) % CLASSES
    tokens = write_cache(tmp_path / "tokens", "discriminative", sem_tokens(labels), labels, K,
                         codebook_sha256="c" * 64)
    tiny_config["stage1"].update(steps=20, batch_size=16, class_conditional=False, class_dropout=0.0)
    run_train_ar(tiny_config, tokens, tmp_path / "stage1")
    tiny_config["probe"].update(epochs=30, batch_size=16, lr=0.1)
    seen = []
    original = digit.evaluate.probe.pooled_features

    def spy(model, prefix, tokens):
        seen.append(prefix)
        return original(model, prefix, tokens)

    monkeypatch.setattr(digit.evaluate.probe, "pooled_features", spy)
    run_probe(tiny_config, tmp_path / "stage1", tokens, tmp_path / "probe")
    assert all(p.shape[1] == 1 and (p == 0).all() for p in seen)
    assert json.loads((tmp_path / "probe" / "metrics.json").read_text())["probe_top1_best"] == 1.0


def test_streaming_statistics_are_those_of_the_features(stage1):
    _, stage1_dir, tokens_dir = stage1
    model, meta = load_stage(stage1_dir, torch.device("cpu"))
    tokens = load_token_cache(tokens_dir, "train")[0]
    features = FrozenFeatures(model, tokens, meta["null_class"], 3, "fp32", torch.device("cpu"))
    views = np.arange(N) % VIEWS
    mean, std = feature_statistics(features, views, batch_size=5)  # batches of 5, 5, ..., 4
    everything = features(np.arange(N), views).double()
    torch.testing.assert_close(mean, everything.mean(0).float())
    torch.testing.assert_close(std, everything.std(0).float() + 1e-6)
    # the features of one image do not depend on the others in its forward pass
    torch.testing.assert_close(features(np.array([7]), np.array([1]))[0], everything[7].float(), rtol=0, atol=1e-5)


def test_probe_does_not_depend_on_how_the_batches_are_split(stage1, tmp_path):
    """Forward passes of 16 (a whole batch) or of 5 sequences: the same probe up to float rounding."""
    config, stage1_dir, tokens = stage1
    config["probe"].update(epochs=10, batch_size=16, lr=0.1, micro_batch_size=16)
    run_probe(config, stage1_dir, tokens, tmp_path / "whole")
    config["probe"]["micro_batch_size"] = 5
    run_probe(config, stage1_dir, tokens, tmp_path / "split")
    (whole_metrics, whole, whole_log), (split_metrics, split, split_log) = outputs(tmp_path / "whole"), outputs(
        tmp_path / "split")
    assert whole_metrics == split_metrics
    assert whole.keys() == split.keys() == {"weight", "bias", "feature_mean", "feature_std"}
    # GEMMs of other shapes round differently (AVX2, AVX-512, AMX kernels alike: fp32 here)
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert epoch_losses(split_log) == pytest.approx(epoch_losses(whole_log), abs=1e-4)


def test_same_seed_same_probe_and_another_seed_another(stage1, tmp_path):
    config, stage1_dir, tokens = stage1
    config["probe"].update(epochs=4, batch_size=16)
    run_probe(config, stage1_dir, tokens, tmp_path / "first")
    run_probe(config, stage1_dir, tokens, tmp_path / "second")
    for name in ("metrics.json", "layers.tsv", "log.tsv", "probe.safetensors"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name
    config["seed"] += 1
    run_probe(config, stage1_dir, tokens, tmp_path / "other")
    assert not torch.equal(outputs(tmp_path / "other")[1]["weight"], outputs(tmp_path / "first")[1]["weight"])


def test_interrupted_probe_resumes_to_the_result_of_an_uninterrupted_one(stage1, tmp_path, monkeypatch):
    config, stage1_dir, tokens = stage1
    config["probe"].update(epochs=4, batch_size=16)  # 24 images: 2 steps an epoch
    run_probe(config, stage1_dir, tokens, tmp_path / "straight")
    cosine = digit.evaluate.probe.cosine

    def interrupted(step, total):
        if step == 5:  # the second step of epoch 3: epoch 2's checkpoint is the last
            raise KeyboardInterrupt
        return cosine(step, total)

    monkeypatch.setattr(digit.evaluate.probe, "cosine", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_probe(config, stage1_dir, tokens, tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial" / "checkpoint").is_dir()
    monkeypatch.setattr(digit.evaluate.probe, "cosine", cosine)
    config["probe"]["lr"] *= 2
    with pytest.raises(ValueError, match="probe"):  # a checkpoint of other settings is refused
        run_probe(config, stage1_dir, tokens, tmp_path / "resumed")
    config["probe"]["lr"] /= 2
    run_probe(config, stage1_dir, tokens, tmp_path / "resumed")
    for name in ("metrics.json", "log.tsv", "probe.safetensors"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert not (tmp_path / "resumed.partial").exists()


def test_raw_features_without_standardisation(stage1, tmp_path):
    config, stage1_dir, tokens = stage1
    config["probe"].update(epochs=2, batch_size=16, standardize=False)
    run_probe(config, stage1_dir, tokens, tmp_path / "probe")
    tensors = outputs(tmp_path / "probe")[1]
    assert torch.equal(tensors["feature_mean"], torch.zeros_like(tensors["feature_mean"]))
    assert torch.equal(tensors["feature_std"], torch.ones_like(tensors["feature_std"]))


def test_probe_of_the_vq_token_baseline_reads_its_vq_token_cache(tiny_config, tmp_path):
    labels = np.arange(N) % CLASSES
    vq = write_cache(tmp_path / "vq_tokens", "vq", (3 * sem_tokens(labels) + 1) % K_VQ, labels, K_VQ,
                     vq_sha256="v" * 64)
    tiny_config["stage1"].update(steps=20, batch_size=16, tokens="vq")
    run_train_ar(tiny_config, vq, tmp_path / "stage1")
    tiny_config["probe"].update(epochs=30, batch_size=16, lr=0.1)
    run_probe(tiny_config, tmp_path / "stage1", vq, tmp_path / "probe")
    assert json.loads((tmp_path / "probe" / "metrics.json").read_text())["probe_top1_best"] == 1.0
    meta = json.loads((vq / "meta.json").read_text())
    (vq / "meta.json").write_text(json.dumps({**meta, "vq_sha256": "w" * 64}))
    with pytest.raises(ValueError, match="vq_sha256"):
        run_probe(tiny_config, tmp_path / "stage1", vq, tmp_path / "other")


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
