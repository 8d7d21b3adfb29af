"""Sampling the whole chain (stage 1 -> stage 2 -> VQ decoder) from tiny trained stages."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_train import CLASSES, K_VQ, K, N, sem_tokens, write_cache

from digit.evaluate.upper_bound import chosen_images, run_upper_bound
from digit.generate.sample import run_sample, run_sample_shard, shard_indices
from digit.generate.train import run_train_ar, run_train_decoder
from digit.pixels.model import build_vq
from digit.runtime.io import sha256_file

# a random 8 px VQ model with a 4x4 grid of K_VQ codes
VQ_ARCH = {"arch": "compact", "codebook_size": K_VQ, "code_dim": 4, "channels": 8, "channel_mult": [1, 1],
           "num_res_blocks": 1, "beta": 0.25, "pixel_range": [-1, 1]}


def sample(config, stage1, stage2, vq, out):
    """All of config's sample shards, then their merge, into `out` (shards under out.shards/)."""
    shards = out.with_name(out.name + ".shards")
    for shard in range(config["sample"]["shards"]):
        run_sample_shard(config, stage1, stage2, vq, shard, shards / str(shard))
    run_sample(config, shards, out)


def random_vq(tmp_path):
    """A VQ model directory (model.safetensors, model.json) of VQ_ARCH's random weights (seed 0)."""
    torch.manual_seed(0)
    vq_dir = tmp_path / "vq"
    vq_dir.mkdir()
    save_file(build_vq(VQ_ARCH).state_dict(), vq_dir / "model.safetensors")
    (vq_dir / "model.json").write_text(json.dumps(VQ_ARCH | {"image_size": 8, "grid": [4, 4]}))
    return vq_dir


@pytest.fixture(params=["ar", "nar"])
def chain(request, tiny_config, tmp_path):
    """A random VQ model (VQ_ARCH), and both stages trained a few steps; stage 2 is the AR or the
    MaskGIT decoder."""
    tiny_config["data"]["image_size"] = 8
    tiny_config["stage2"]["decoder"] = request.param
    for stage in ("stage1", "stage2"):
        tiny_config[stage]["precision"] = "fp32"
    vq_dir = random_vq(tmp_path)
    labels = np.arange(N) % CLASSES
    sem = sem_tokens(labels)
    tokens = write_cache(tmp_path / "tokens", "discriminative", sem, labels, K, codebook_sha256="c" * 64)
    vq_tokens = write_cache(tmp_path / "vq_tokens", "vq", (3 * sem + 1) % K_VQ, labels, K_VQ,
                            vq_sha256=sha256_file(vq_dir / "model.safetensors"))
    run_train_ar(tiny_config, tokens, tmp_path / "stage1")
    run_train_decoder(tiny_config, tokens, vq_tokens, tmp_path / "stage2")
    return tiny_config, tmp_path / "stage1", tmp_path / "stage2", vq_dir


def test_sampling_writes_every_class_and_is_deterministic(chain, tmp_path):
    config, stage1, stage2, vq = chain
    sample(config, stage1, stage2, vq, tmp_path / "a")
    sample(config, stage1, stage2, vq, tmp_path / "b")
    per_class = config["sample"]["per_class"]
    images = sorted((tmp_path / "a" / "images").glob("*.png"))
    assert [p.name for p in images] == [f"{i:06d}.png" for i in range(CLASSES * per_class)]
    assert Image.open(images[0]).size == (8, 8)
    for a in images:
        assert a.read_bytes() == (tmp_path / "b" / "images" / a.name).read_bytes()
    samples = np.load(tmp_path / "a" / "samples.npz")
    assert samples["sem"].shape == (CLASSES * per_class, 16) and samples["sem"].max() < K
    assert samples["vq"].shape == (CLASSES * per_class, 16) and samples["vq"].max() < K_VQ
    assert samples["labels"].tolist() == np.repeat(np.arange(CLASSES), per_class).tolist()
    assert np.array_equal(samples["vq"], np.load(tmp_path / "b" / "samples.npz")["vq"])
    # one row per class, per_class columns, 2 px padding
    assert Image.open(tmp_path / "a" / "grid.png").size == (2 + per_class * 10, 2 + CLASSES * 10)
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["num_samples"] == CLASSES * per_class and meta["classes"] == ["c0", "c1", "c2"]


def test_another_seed_gives_other_samples(chain, tmp_path):
    config, stage1, stage2, vq = chain
    sample(config, stage1, stage2, vq, tmp_path / "a")
    config["sample"]["seed"] = 1
    sample(config, stage1, stage2, vq, tmp_path / "b")
    assert not np.array_equal(np.load(tmp_path / "a" / "samples.npz")["sem"],
                              np.load(tmp_path / "b" / "samples.npz")["sem"])


def test_refuses_a_vq_model_that_stage2_was_not_trained_for(chain, tmp_path):
    config, stage1, stage2, vq = chain
    torch.manual_seed(1)  # other random weights
    save_file(build_vq(VQ_ARCH).state_dict(), vq / "model.safetensors")
    with pytest.raises(ValueError, match="vq_sha256"):
        sample(config, stage1, stage2, vq, tmp_path / "samples")
    assert not (tmp_path / "samples").exists()


def test_guidance_changes_the_samples_deterministically(chain, tmp_path):
    config, stage1, stage2, vq = chain
    sample(config, stage1, stage2, vq, tmp_path / "plain")
    config["sample"]["cfg_scale"] = 4.0
    sample(config, stage1, stage2, vq, tmp_path / "a")
    sample(config, stage1, stage2, vq, tmp_path / "b")
    plain, a, b = (np.load(tmp_path / d / "samples.npz")["sem"] for d in ("plain", "a", "b"))
    assert np.array_equal(a, b) and not np.array_equal(a, plain)


def test_stage2_top_p_is_the_ar_decoders_nucleus_and_maskgit_samples_plainly(chain, tmp_path):
    """The official NAR decoder samples from the whole distribution; top-p 0.8 is the AR decoder's."""
    config, stage1, stage2, vq = chain
    decoder = config["stage2"]["decoder"]
    for name, top_p in (("off", 1.0), ("nucleus", 0.8), ("narrow", 0.05)):
        config["sample"]["stage2_top_p"] = top_p
        sample(config, stage1, stage2, vq, tmp_path / name)
    off, nucleus, narrow = (np.load(tmp_path / d / "samples.npz") for d in ("off", "nucleus", "narrow"))
    assert np.array_equal(off["sem"], narrow["sem"])  # stage 1 is not concerned
    if decoder == "nar":
        assert np.array_equal(off["vq"], nucleus["vq"]) and np.array_equal(off["vq"], narrow["vq"])
        for name in ("nucleus", "narrow"):
            assert (tmp_path / "off" / "grid.png").read_bytes() == (tmp_path / name / "grid.png").read_bytes()
    else:
        assert not np.array_equal(off["vq"], narrow["vq"])


def test_guidance_refuses_a_model_without_a_null_class(chain, tmp_path):
    config, stage1, stage2, vq = chain
    meta = json.loads((stage1 / "model.json").read_text())
    (stage1 / "model.json").write_text(json.dumps({**meta, "null_class": None}))
    config["sample"]["cfg_scale"] = 2.0
    with pytest.raises(ValueError, match="stage1.class_dropout"):
        sample(config, stage1, stage2, vq, tmp_path / "samples")


def val_manifest(tmp_path):
    """A manifest of N random 8 px images (train and val alike), the val images whose tokens the caches hold."""
    rng = np.random.default_rng(0)
    entries = []
    for i in range(N):
        path = tmp_path / "val" / f"{i:03d} image.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
        entries.append({"path": str(path), "label": i % CLASSES, "sha256": sha256_file(path)})
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"classes": [f"c{i}" for i in range(CLASSES)],
                                    "splits": {"train": entries, "val": entries}}))
    return manifest, entries


def test_upper_bound_decodes_the_ground_truth_tokens_of_the_val_images(chain, tmp_path):
    config, stage1, stage2, vq = chain
    manifest, entries = val_manifest(tmp_path)
    config["upper_bound"]["num_images"] = 12
    run_upper_bound(config, manifest, tmp_path / "tokens", stage2, vq, tmp_path / "ub")
    metrics = json.loads((tmp_path / "ub" / "metrics.json").read_text())
    assert metrics["upper_bound_num_images"] == 12 and metrics["upper_bound_fid_calibrated"] is False
    for name in ("upper_bound", "vq_recon"):
        assert metrics[f"{name}_fid"] >= 0 and metrics[f"{name}_inception_score"] >= 1
        assert 0 < metrics[f"{name}_psnr"] < 100
    assert Image.open(tmp_path / "ub" / "grid.png").size == (2 + 3 * 10, 2 + 8 * 10)  # original, VQ, stage 2

    manifest.write_text(json.dumps({"classes": [f"c{i}" for i in range(CLASSES)],
                                    "splits": {"train": entries, "val": entries[:-1]}}))
    with pytest.raises(ValueError, match=f"holds {N} val images"):
        run_upper_bound(config, manifest, tmp_path / "tokens", stage2, vq, tmp_path / "ub2")
    assert not (tmp_path / "ub2").exists()


def test_the_samples_do_not_depend_on_the_sharding(chain, tmp_path):
    config, stage1, stage2, vq = chain
    config["sample"].update(batch_size=1, shards=1)  # 6 samples: 6 blocks
    sample(config, stage1, stage2, vq, tmp_path / "one")
    config["sample"]["shards"] = 4
    sample(config, stage1, stage2, vq, tmp_path / "four")
    assert len(list((tmp_path / "four.shards").iterdir())) == 4
    one, four = (np.load(tmp_path / d / "samples.npz") for d in ("one", "four"))
    for key in ("sem", "vq", "labels"):
        assert np.array_equal(one[key], four[key]), key
    for png in sorted((tmp_path / "one" / "images").glob("*.png")):
        assert png.read_bytes() == (tmp_path / "four" / "images" / png.name).read_bytes()
    assert (tmp_path / "one" / "grid.png").read_bytes() == (tmp_path / "four" / "grid.png").read_bytes()


def test_a_killed_shard_redoes_only_itself(chain, tmp_path, monkeypatch):
    config, stage1, stage2, vq = chain
    config["sample"].update(batch_size=2, shards=3)
    sample(config, stage1, stage2, vq, tmp_path / "whole")
    shards = tmp_path / "run.shards"
    for shard in (0, 2):
        run_sample_shard(config, stage1, stage2, vq, shard, shards / str(shard))
    done = {shard: (shards / str(shard) / "shard.npz").stat().st_mtime_ns for shard in (0, 2)}

    import digit.generate.sample
    real_save, saved = digit.generate.sample.save_png, []

    def dies_after_one(image, path):  # the job is killed while writing its second image
        if len(saved) == 1:
            raise KeyboardInterrupt
        saved.append(path)
        real_save(image, path)

    monkeypatch.setattr(digit.generate.sample, "save_png", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_sample_shard(config, stage1, stage2, vq, 1, shards / "1")
    monkeypatch.setattr(digit.generate.sample, "save_png", real_save)
    assert not (shards / "1").exists() and sorted(p.name for p in shards.iterdir()) == ["0", "2"]
    with pytest.raises(FileNotFoundError, match="run.shards/1 is missing or unfinished"):
        run_sample(config, shards, tmp_path / "run")

    run_sample_shard(config, stage1, stage2, vq, 1, shards / "1")
    run_sample(config, shards, tmp_path / "run")
    assert {s: (shards / str(s) / "shard.npz").stat().st_mtime_ns for s in (0, 2)} == done
    for key in ("sem", "vq", "labels"):
        assert np.array_equal(np.load(tmp_path / "run" / "samples.npz")[key],
                              np.load(tmp_path / "whole" / "samples.npz")[key])


def test_shards_of_another_run_are_refused(chain, tmp_path):
    config, stage1, stage2, vq = chain
    config["sample"].update(batch_size=2, shards=2)
    shards = tmp_path / "shards"
    run_sample_shard(config, stage1, stage2, vq, 0, shards / "0")
    config["sample"]["top_k"] = 3
    run_sample_shard(config, stage1, stage2, vq, 1, shards / "1")
    with pytest.raises(ValueError, match="sample shard .*shards/0 was made by another run than shard 0 or under other settings"):
        run_sample(config, shards, tmp_path / "samples")
    assert not (tmp_path / "samples").exists()


def test_shards_split_the_blocks_evenly():
    blocks = shard_indices(10, 3, shards=2, shard=0) + shard_indices(10, 3, shards=2, shard=1)
    assert [b.tolist() for b in blocks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert len(shard_indices(10, 3, shards=2, shard=0)) == 2
    with pytest.raises(ValueError, match="sample.shards is 5 but there are only 4 blocks of sample.batch_size"):
        shard_indices(10, 3, shards=5, shard=0)


def test_upper_bound_spreads_its_images_over_the_split():
    assert chosen_images(10, None).tolist() == list(range(10))
    assert chosen_images(10, 50).tolist() == list(range(10))
    assert chosen_images(100, 5).tolist() == [0, 25, 50, 74, 99]


@pytest.fixture
def vq_baseline(tiny_config, tmp_path):
    """The paper's VQ-token baseline: stage 1 trained on the VQ tokens of a random VQ model (VQ_ARCH)."""
    tiny_config["data"]["image_size"] = 8
    tiny_config["stage1"] |= {"tokens": "vq", "precision": "fp32"}
    vq_dir = random_vq(tmp_path)
    labels = np.arange(N) % CLASSES
    vq_tokens = write_cache(tmp_path / "vq_tokens", "vq", (3 * sem_tokens(labels) + 1) % K_VQ, labels, K_VQ,
                            vq_sha256=sha256_file(vq_dir / "model.safetensors"))
    run_train_ar(tiny_config, vq_tokens, tmp_path / "stage1")
    return tiny_config, tmp_path / "stage1", vq_dir


def test_the_vq_token_baseline_samples_without_stage_2(vq_baseline, tmp_path):
    config, stage1, vq = vq_baseline
    meta = json.loads((stage1 / "model.json").read_text())
    assert meta["tokens"] == "vq" and meta["vocab_size"] == K_VQ and "codebook_sha256" not in meta
    sample(config, stage1, None, vq, tmp_path / "a")
    samples = np.load(tmp_path / "a" / "samples.npz")
    assert np.array_equal(samples["sem"], samples["vq"]) and samples["vq"].max() < K_VQ
    assert len(list((tmp_path / "a" / "images").glob("*.png"))) == CLASSES * config["sample"]["per_class"]


def test_a_discriminative_stage_1_without_stage_2_is_refused(chain, tmp_path):
    config, stage1, _, vq = chain
    with pytest.raises(ValueError, match="stage1.tokens: vq"):
        run_sample_shard(config, stage1, None, vq, 0, tmp_path / "shard")


def test_the_vq_token_baseline_needs_a_vq_cache(tiny_config, tmp_path):
    tiny_config["stage1"]["tokens"] = "vq"
    labels = np.arange(N) % CLASSES
    tokens = write_cache(tmp_path / "tokens", "discriminative", sem_tokens(labels), labels, K, codebook_sha256="c" * 64)
    with pytest.raises(ValueError, match="kind is 'discriminative', expected 'vq'"):
        run_train_ar(tiny_config, tokens, tmp_path / "stage1")


def test_the_upper_bound_of_the_vq_token_baseline_is_the_vq_reconstruction(vq_baseline, tmp_path):
    config, _, vq = vq_baseline
    manifest, _ = val_manifest(tmp_path)
    config["upper_bound"]["num_images"] = 12
    run_upper_bound(config, manifest, None, None, vq, tmp_path / "ub")
    metrics = json.loads((tmp_path / "ub" / "metrics.json").read_text())
    for score in ("fid", "inception_score", "psnr"):
        assert metrics[f"upper_bound_{score}"] == metrics[f"vq_recon_{score}"]
    provenance = json.loads((tmp_path / "ub" / "provenance.json").read_text())
    assert set(provenance["inputs"]) == {"manifest", "vq"}
