"""Training both stages on small hand-made token caches: learning, exact resume, refusals."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import digit.generate.train
from digit.generate.train import learning_rate, run_train_ar, run_train_decoder

N, VIEWS, T, K, K_VQ, CLASSES = 24, 2, 16, 16, 32, 3


def write_cache(path, kind, tokens, labels, vocab_size, **meta):
    """A token cache in the format of digit.tokenizer.tokens (train and val split alike)."""
    path.mkdir(parents=True)
    for split in ("train", "val"):
        np.save(path / f"{split}.npy", tokens.astype(np.uint16))
        np.save(path / f"{split}_labels.npy", labels.astype(np.int64))
    (path / "meta.json").write_text(json.dumps({
        "kind": kind, "vocab_size": vocab_size, "grid": [4, 4], "views": ["identity", "hflip"],
        "num_classes": CLASSES, "classes": [f"c{i}" for i in range(CLASSES)], **meta}))
    return path


def sem_tokens(labels):
    """Discriminative tokens that depend on the class, the position and the view."""
    n, v, t = np.meshgrid(np.arange(len(labels)), np.arange(VIEWS), np.arange(T), indexing="ij")
    return (5 * labels[n] + t + 7 * v) % K


@pytest.fixture
def caches(tmp_path):
    labels = np.arange(N) % CLASSES
    sem = sem_tokens(labels)
    vq_dir = write_cache(tmp_path / "vq_tokens", "vq", (3 * sem + 1) % K_VQ, labels, K_VQ, vq_sha256="v" * 64)
    return write_cache(tmp_path / "tokens", "discriminative", sem, labels, K, codebook_sha256="c" * 64), vq_dir


def losses(out_dir):
    rows = (out_dir / "log.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["step", "loss", "lr", "tokens_per_s", "grad_norm"]
    return [float(r.split("\t")[1]) for r in rows[1:]]


def test_stage1_learns_and_writes_a_complete_output(tiny_config, caches, tmp_path):
    tiny_config["stage1"].update(steps=30, batch_size=16, warmup_steps=5, precision="fp32")
    run_train_ar(tiny_config, caches[0], tmp_path / "stage1")
    loss = losses(tmp_path / "stage1")
    assert len(loss) == 30 and np.mean(loss[-5:]) < 0.6 * np.mean(loss[:5])
    meta = json.loads((tmp_path / "stage1" / "model.json").read_text())
    assert meta["vocab_size"] == K and meta["seq_len"] == T and meta["num_classes"] == CLASSES
    # the classes and the null class of classifier-free guidance (stage1.class_dropout > 0)
    assert meta["model"]["prefix_vocab_size"] == CLASSES + 1 and meta["null_class"] == CLASSES
    assert meta["codebook_sha256"] == "c" * 64
    assert set(meta["provenance"]["inputs"]) == {"tokens", "tokens_meta"}
    state = torch.load(tmp_path / "stage1" / "state.pt", weights_only=True)
    assert state["step"] == 30 and state["optimizer"]["state"]
    assert not (tmp_path / "stage1.partial").exists()


def test_stage2_learns_the_vq_part(tiny_config, caches, tmp_path):
    tiny_config["stage2"].update(steps=30, batch_size=16, warmup_steps=5, precision="fp32")
    run_train_decoder(tiny_config, *caches, tmp_path / "stage2")
    loss = losses(tmp_path / "stage2")
    assert np.mean(loss[-5:]) < 0.6 * np.mean(loss[:5])
    meta = json.loads((tmp_path / "stage2" / "model.json").read_text())
    assert meta["sep_token"] == K and meta["model"]["prefix_len"] == T + 1
    assert meta["model"]["vocab_size"] == K_VQ and meta["vq_sha256"] == "v" * 64


def test_stage2_maskgit_decoder_learns_the_masked_tokens(tiny_config, caches, tmp_path):
    tiny_config["stage2"].update(decoder="nar", steps=100, batch_size=16, warmup_steps=5, lr=0.003)
    run_train_decoder(tiny_config, *caches, tmp_path / "stage2")
    loss = losses(tmp_path / "stage2")
    assert np.mean(loss[-5:]) < 0.6 * np.mean(loss[:5])
    meta = json.loads((tmp_path / "stage2" / "model.json").read_text())
    assert meta["decoder"] == "nar" and meta["model"]["causal"] is False
    weights = load_file(tmp_path / "stage2" / "model.safetensors")
    assert weights["tok_emb.weight"].shape[0] == K_VQ + 1 and weights["tok_pos.weight"].shape[0] == T


@pytest.mark.parametrize("decoder", ["ar", "nar"])
def test_trained_stages_load_back_as_the_same_models(tiny_config, caches, tmp_path, decoder):
    from digit.generate.train import load_stage
    tiny_config["stage2"]["decoder"] = decoder
    run_train_ar(tiny_config, caches[0], tmp_path / "stage1")
    run_train_decoder(tiny_config, *caches, tmp_path / "stage2")
    for stage in ("stage1", "stage2"):
        model, meta = load_stage(tmp_path / stage, "cpu")
        saved = load_file(tmp_path / stage / "model.safetensors")
        assert model.state_dict().keys() == saved.keys()
        assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)
        assert not model.training and model.cfg.causal == (stage == "stage1" or decoder == "ar")


def interrupt_at(stop_step, config, tokens_dir, out_dir, monkeypatch):
    """Run stage-1 training until it is interrupted at `stop_step`."""
    def interrupted(step, tc):
        if step == stop_step:
            raise KeyboardInterrupt
        return learning_rate(step, tc)

    monkeypatch.setattr(digit.generate.train, "learning_rate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train_ar(config, tokens_dir, out_dir)


def test_resume_after_interruption_gives_the_same_weights(tiny_config, caches, tmp_path, monkeypatch):
    # steps 6, checkpoint every 3 (tiny config)
    run_train_ar(tiny_config, caches[0], tmp_path / "straight")

    interrupt_at(5, tiny_config, caches[0], tmp_path / "resumed", monkeypatch)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial" / "checkpoint").is_dir()
    monkeypatch.setattr(digit.generate.train, "learning_rate", learning_rate)
    run_train_ar(tiny_config, caches[0], tmp_path / "resumed")

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_resume_refuses_a_checkpoint_of_another_vocabulary(tiny_config, caches, tmp_path, monkeypatch):
    interrupt_at(4, tiny_config, caches[0], tmp_path / "stage1", monkeypatch)
    monkeypatch.setattr(digit.generate.train, "learning_rate", learning_rate)
    meta_path = caches[0] / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "vocab_size": 2 * K}))
    with pytest.raises(ValueError, match="vocab_size"):
        run_train_ar(tiny_config, caches[0], tmp_path / "stage1")


def test_resume_refuses_a_checkpoint_of_another_codebook(tiny_config, caches, tmp_path, monkeypatch):
    interrupt_at(4, tiny_config, caches[0], tmp_path / "stage1", monkeypatch)
    monkeypatch.setattr(digit.generate.train, "learning_rate", learning_rate)
    meta_path = caches[0] / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "codebook_sha256": "d" * 64}))
    with pytest.raises(ValueError, match="codebook_sha256"):
        run_train_ar(tiny_config, caches[0], tmp_path / "stage1")


def test_refuses_tokens_outside_the_vocabulary(tiny_config, tmp_path):
    labels = np.arange(N) % CLASSES
    cache = write_cache(tmp_path / "tokens", "discriminative", sem_tokens(labels), labels, K - 4,
                        codebook_sha256="c" * 64)
    with pytest.raises(ValueError, match="vocab_size"):
        run_train_ar(tiny_config, cache, tmp_path / "stage1")


def test_refuses_a_cache_of_the_wrong_kind(tiny_config, caches, tmp_path):
    with pytest.raises(ValueError, match="kind"):
        run_train_ar(tiny_config, caches[1], tmp_path / "stage1")
    with pytest.raises(ValueError, match="kind"):
        run_train_decoder(tiny_config, caches[1], caches[0], tmp_path / "stage2")


def test_stage2_refuses_caches_of_different_images(tiny_config, caches, tmp_path):
    labels = np.arange(N) % CLASSES
    labels[0] = (labels[0] + 1) % CLASSES
    other = write_cache(tmp_path / "other", "vq", sem_tokens(labels), labels, K_VQ, vq_sha256="v" * 64)
    with pytest.raises(ValueError, match="labels"):
        run_train_decoder(tiny_config, caches[0], other, tmp_path / "stage2")


def trained_weights(config, tokens_dir, out_dir):
    run_train_ar(config, tokens_dir, out_dir)
    return load_file(out_dir / "model.safetensors")


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


def test_gradient_accumulation_matches_one_big_batch(tiny_config, caches, tmp_path):
    tiny_config["stage1"].update(batch_size=8)
    whole = trained_weights(tiny_config, caches[0], tmp_path / "whole")
    tiny_config["stage1"]["grad_accum_steps"] = 4
    accumulated = trained_weights(tiny_config, caches[0], tmp_path / "accumulated")
    assert_same_weights(whole, accumulated, atol=1e-5)


def test_activation_checkpointing_trains_the_same_weights(tiny_config, caches, tmp_path):
    plain = trained_weights(tiny_config, caches[0], tmp_path / "plain")
    tiny_config["stage1"]["activation_checkpointing"] = True
    assert_same_weights(plain, trained_weights(tiny_config, caches[0], tmp_path / "recomputed"), atol=0)


def test_compiled_model_trains_the_same_weights(tiny_config, caches, tmp_path):
    plain = trained_weights(tiny_config, caches[0], tmp_path / "plain")
    tiny_config["stage1"]["compile"] = True
    compiled = trained_weights(tiny_config, caches[0], tmp_path / "compiled")
    # inductor's fused kernels round differently; Adam turns that into ~1e-5 steps on near-zero gradients
    assert_same_weights(plain, compiled, atol=1e-4)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "plain"), abs=1e-4)


def test_two_processes_train_the_weights_of_one(tiny_config, caches, tmp_path):
    """DDP under torchrun (gloo on the CPU): each process takes half of every global batch."""
    tiny_config["stage1"].update(batch_size=8, grad_accum_steps=2)
    single = trained_weights(tiny_config, caches[0], tmp_path / "single")
    tiny_config["stage1"]["grad_accum_steps"] = 1
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(tiny_config))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "digit.cli", "train-ar", "--tokens", str(caches[0]), "--out", str(tmp_path / "ddp"),
         "--config", str(tmp_path / "ddp.yaml")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(single, load_file(tmp_path / "ddp" / "model.safetensors"), atol=1e-5)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), abs=1e-4)


def test_refuses_a_batch_that_does_not_split_into_micro_batches(tiny_config, caches, tmp_path):
    tiny_config["stage1"].update(batch_size=6, grad_accum_steps=4)
    with pytest.raises(ValueError, match="stage1.grad_accum_steps"):
        run_train_ar(tiny_config, caches[0], tmp_path / "stage1")


def test_refuses_a_cache_of_another_vocabulary_than_the_config(tiny_config, caches, tmp_path):
    tiny_config["kmeans"]["k"] = 2 * K
    with pytest.raises(ValueError, match="vocab_size"):
        run_train_ar(tiny_config, caches[0], tmp_path / "stage1")


def test_unconditional_model_has_one_start_token_and_no_null_class(tiny_config, caches, tmp_path):
    tiny_config["stage1"].update(class_conditional=False, class_dropout=0.0)
    run_train_ar(tiny_config, caches[0], tmp_path / "stage1")
    meta = json.loads((tmp_path / "stage1" / "model.json").read_text())
    assert meta["model"]["prefix_vocab_size"] == 1 and meta["null_class"] is None
    tiny_config["stage1"]["class_dropout"] = 0.1
    with pytest.raises(ValueError, match="class_conditional"):
        run_train_ar(tiny_config, caches[0], tmp_path / "other")
