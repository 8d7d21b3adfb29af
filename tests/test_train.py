"""Training both stages on small hand-made token caches: learning, exact resume, refusals."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import digit.train
from digit.train import learning_rate, run_train_ar, run_train_decoder

N, VIEWS, T, K, K_VQ, CLASSES = 24, 2, 16, 16, 32, 3


def write_cache(path, kind, tokens, labels, vocab_size, **meta):
    """A token cache in the format of digit.tokens (train and val split alike)."""
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


def interrupt_at(stop_step, config, tokens_dir, out_dir, monkeypatch):
    """Run stage-1 training until it is interrupted at `stop_step`."""
    def interrupted(step, tc):
        if step == stop_step:
            raise KeyboardInterrupt
        return learning_rate(step, tc)

    monkeypatch.setattr(digit.train, "learning_rate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train_ar(config, tokens_dir, out_dir)


def test_resume_after_interruption_gives_the_same_weights(tiny_config, caches, tmp_path, monkeypatch):
    # steps 6, checkpoint every 3 (tiny config)
    run_train_ar(tiny_config, caches[0], tmp_path / "straight")

    interrupt_at(5, tiny_config, caches[0], tmp_path / "resumed", monkeypatch)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial" / "checkpoint").is_dir()
    monkeypatch.setattr(digit.train, "learning_rate", learning_rate)
    run_train_ar(tiny_config, caches[0], tmp_path / "resumed")

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_resume_refuses_a_checkpoint_of_another_vocabulary(tiny_config, caches, tmp_path, monkeypatch):
    interrupt_at(4, tiny_config, caches[0], tmp_path / "stage1", monkeypatch)
    monkeypatch.setattr(digit.train, "learning_rate", learning_rate)
    meta_path = caches[0] / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "vocab_size": 2 * K}))
    with pytest.raises(ValueError, match="vocab_size"):
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
