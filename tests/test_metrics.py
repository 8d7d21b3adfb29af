import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from digit.evaluate.cas import run_train_classifier
from digit.evaluate.fidelity import (
    ImagesOnly,
    SampleDataset,
    fidelity_metrics,
    generate_inception_weights,
    reference_fid_statistics,
    reference_images,
    run_evaluate,
)
from digit.runtime.images import ImageDataset, load_manifest
from digit.runtime.io import read_json, sha256_file


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "generated.pth"
    generate_inception_weights(path, seed=0)
    return path


def write_samples(directory, images, labels):
    (directory / "images").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(directory / "images" / f"{i:06d}.png")
    np.savez(directory / "samples.npz", labels=np.asarray(labels, dtype=np.int64))


def test_generated_weights_load_into_torch_fidelity(inception_weights, tmp_path):
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=str(inception_weights))
    features, logits = extractor((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8))
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(features).all() and features.std() > 0
    generate_inception_weights(tmp_path / "again.pth", seed=0)
    assert torch.equal(torch.load(tmp_path / "again.pth")["fc.weight"], torch.load(inception_weights)["fc.weight"])


def test_fid_is_zero_against_itself_and_positive_against_other_images(tiny_config, manifest, in_tmp,
                                                                      inception_weights):
    val = ImagesOnly(torch.utils.data.Subset(ImageDataset(load_manifest(manifest), "val", 32), range(0, 12, 2)))
    write_samples(in_tmp / "same", [val[i] for i in range(len(val))], [0] * len(val))
    noise = [(torch.rand(3, 32, 32) * 255).to(torch.uint8) for _ in range(len(val))]
    write_samples(in_tmp / "noise", noise, [0] * len(val))
    same = fidelity_metrics(in_tmp / "same" / "images", val, inception_weights, 8, False, 0, in_tmp / "cache")
    other = fidelity_metrics(in_tmp / "noise" / "images", val, inception_weights, 8, False, 0, in_tmp / "cache")
    assert abs(same["fid"]) < 1e-3 * other["fid"] and other["fid"] > 0
    assert other["kid"] > same["kid"] and same["inception_score"] >= 1.0
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert not (in_tmp / "cache").exists() or not any((in_tmp / "cache").iterdir())


def test_evaluate_gan_test_and_metrics_file(tiny_config, manifest, in_tmp):
    run_train_classifier(tiny_config, manifest, in_tmp / "classifier")
    classifier = read_json(in_tmp / "classifier" / "model.json")
    assert 0 <= classifier["val_accuracy"] <= 1 and classifier["classes"] == load_manifest(manifest)["classes"]

    # Samples that are the val images with their true labels: GAN-test is the classifier's val accuracy.
    val = ImageDataset(load_manifest(manifest), "val", 32)
    write_samples(in_tmp / "samples", [val[i][0] for i in range(len(val))], val.labels())
    run_evaluate(tiny_config, in_tmp / "samples", manifest, in_tmp / "classifier", in_tmp / "evaluate")
    metrics = read_json(in_tmp / "evaluate" / "metrics.json")
    assert metrics["gan_test"] == pytest.approx(classifier["val_accuracy"]) and "cas" not in metrics
    assert metrics["gan_test_classifier"] == "convnet trained on real train images"
    assert "gan_test_skipped" not in metrics
    assert metrics["chance"] == pytest.approx(1 / 3) and metrics["num_samples"] == 12
    assert metrics["fid_calibrated"] is False and metrics["inception_weights"] == "generated"
    assert metrics["reference"] == "val" and metrics["reference_images"] == 12
    assert metrics["feature_extractor"] == "torch-fidelity inception-v3-compat"
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    (in_tmp / "again").mkdir()
    generate_inception_weights(in_tmp / "again" / "inception-generated.pth", tiny_config["seed"])
    assert metrics["inception_weights_sha256"] == sha256_file(in_tmp / "again" / "inception-generated.pth")
    assert not (in_tmp / "evaluate" / "inception-generated.pth").exists()
    assert abs(metrics["fid"]) < 1e-2 and {"inception_score", "inception_score_std", "kid"} <= metrics.keys()
    assert all(not isinstance(v, (dict, list)) for v in metrics.values())


def test_evaluate_without_a_classifier_has_no_gan_test(tiny_config, manifest, in_tmp):
    """classifier.enabled: false (a training-free evaluation of released weights): FID and IS, no GAN-test."""
    val = ImageDataset(load_manifest(manifest), "val", 32)
    write_samples(in_tmp / "samples", [val[i][0] for i in range(len(val))], val.labels())
    run_evaluate(tiny_config, in_tmp / "samples", manifest, None, in_tmp / "evaluate")
    metrics = read_json(in_tmp / "evaluate" / "metrics.json")
    assert metrics["gan_test"] is None and metrics["classifier_val_accuracy"] is None and abs(metrics["fid"]) < 1e-2
    provenance = read_json(in_tmp / "evaluate" / "provenance.json")
    assert set(provenance["inputs"]) == {"manifest", "samples"}


def test_evaluate_rejects_a_missing_weights_file(tiny_config, in_tmp):
    tiny_config["evaluate"]["inception_weights"] = str(in_tmp / "missing.pth")
    with pytest.raises(FileNotFoundError, match="evaluate.inception_weights"):
        run_evaluate(tiny_config, in_tmp / "samples", in_tmp / "manifest.json", in_tmp / "classifier",
                     in_tmp / "evaluate")


def test_samples_must_match_their_labels(in_tmp):
    write_samples(in_tmp / "samples", [torch.zeros(3, 32, 32, dtype=torch.uint8)] * 3, [0, 1])
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        SampleDataset(in_tmp / "samples", 32)


def test_reference_features_are_cached_once_and_keyed_by_the_reference(tiny_config, manifest, in_tmp,
                                                                        inception_weights, capsys):
    """Two experiments on the same val images share the reference's features (one .npz); other images never do."""
    tiny_config["evaluate"]["inception_weights"] = str(inception_weights)
    run_train_classifier(tiny_config, manifest, in_tmp / "classifier")
    val = ImageDataset(load_manifest(manifest), "val", 32)
    write_samples(in_tmp / "samples", [val[i][0].flip(-1) for i in range(len(val))], val.labels())
    cache = in_tmp / tiny_config["evaluate"]["cache_dir"]

    run_evaluate(tiny_config, in_tmp / "samples", manifest, in_tmp / "classifier", in_tmp / "first")
    first = read_json(in_tmp / "first" / "metrics.json")
    assert "evaluate: reference features computed" in capsys.readouterr().out
    assert "reference_statistics" not in first  # the same numbers either way: metrics.json never says
    cached = sorted(cache.iterdir())
    assert [p.suffix for p in cached] == [".npz"]
    with np.load(cached[0], allow_pickle=False) as npz:
        assert npz.files == ["features"] and npz["features"].shape == (12, 2048)
        features = npz["features"]

    # The second experiment reads the cache: doctored cached features change its FID.
    np.savez(cached[0], features=features * 0.5)
    run_evaluate(tiny_config, in_tmp / "samples", manifest, in_tmp / "classifier", in_tmp / "second")
    assert sorted(cache.iterdir()) == cached
    second = read_json(in_tmp / "second" / "metrics.json")
    assert second["fid"] != pytest.approx(first["fid"])
    assert "evaluate: reference features cached" in capsys.readouterr().out

    # A reference with one image stored in other bytes (the same pixels) gets its own entry and its own features.
    loaded = load_manifest(manifest)  # written back as a manifest of JSON entries, with absolute paths
    changed = {"classes": loaded["classes"],
               "splits": {split: list(entries) for split, entries in loaded["splits"].items()}}
    entry = changed["splits"]["val"][0]
    Image.open(load_manifest(manifest)["splits"]["val"][0]["path"]).save(in_tmp / "again.png", compress_level=0)
    entry.update(path=str(in_tmp / "again.png"), sha256=sha256_file(in_tmp / "again.png"))
    (in_tmp / "changed.json").write_text(json.dumps(changed))
    run_evaluate(tiny_config, in_tmp / "samples", in_tmp / "changed.json", in_tmp / "classifier", in_tmp / "third")
    third = read_json(in_tmp / "third" / "metrics.json")
    assert third["reference_sha256"] != first["reference_sha256"] and third["fid"] == pytest.approx(first["fid"])
    assert "evaluate: reference features computed" in capsys.readouterr().out and len(list(cache.iterdir())) == 2


def test_an_adm_reference_batch(tiny_config, manifest, in_tmp, inception_weights):
    val = ImageDataset(load_manifest(manifest), "val", 32)
    images = torch.stack([val[i][0] for i in range(len(val))])
    np.savez(in_tmp / "ref.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    tiny_config["evaluate"].update(reference=str(in_tmp / "ref.npz"), inception_weights=str(inception_weights))
    reference, record = reference_images(tiny_config, load_manifest(manifest))
    assert len(reference) == 12 and torch.equal(reference[3], images[3])
    assert record == {"reference": str(in_tmp / "ref.npz"), "reference_images": 12,
                      "reference_sha256": sha256_file(in_tmp / "ref.npz")}
    np.savez(in_tmp / "big.npz", arr_0=np.zeros((2, 64, 64, 3), np.uint8))
    tiny_config["evaluate"]["reference"] = str(in_tmp / "big.npz")
    with pytest.raises(ValueError, match="64x64 images, the samples are 32x32"):
        reference_images(tiny_config, load_manifest(manifest))


def test_a_corrupt_sample_is_named(tiny_config, manifest, in_tmp):
    run_train_classifier(tiny_config, manifest, in_tmp / "classifier")
    write_samples(in_tmp / "samples", [torch.zeros(3, 32, 32, dtype=torch.uint8)] * 3, [0, 1, 2])
    (in_tmp / "samples" / "images" / "000001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="cannot read image .*000001.png"):
        run_evaluate(tiny_config, in_tmp / "samples", manifest, in_tmp / "classifier", in_tmp / "evaluate")
    assert not (in_tmp / "evaluate").exists()


def inception_pool_features(images, weights):
    """The 2048-d pool3 features of uint8 [N, 3, H, W] images, with the extractor FID uses."""
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=str(weights)).eval()
    with torch.no_grad():
        return extractor(images)[0].double().numpy()


def frechet_distance(features, mu, sigma):
    """FID of features [n, d] against (mu, sigma), written independently of torch-fidelity: with
    n <= d the nonzero eigenvalues of cov(features) @ sigma are those of C sigma C^T / (n - 1),
    C the centered features, a small symmetric PSD matrix."""
    centered = features - features.mean(0)
    small = centered @ sigma @ centered.T / (len(features) - 1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0, None)).sum()
    diff = features.mean(0) - mu
    return diff @ diff + (centered ** 2).sum() / (len(features) - 1) + np.trace(sigma) - 2 * tr_covmean


def adm_batch_statistics(features, seed=0):
    """mu [2048] and sigma [2048, 2048] (float64, as in ADM's files) of other features than the
    images': those of 64 random vectors of about the features' scale, shifted."""
    rng = np.random.default_rng(seed)
    other = rng.normal(features.mean(0), features.std(0) + 1e-3, size=(64, features.shape[1]))
    return other.mean(0) + features.std(0), np.cov(other, rowvar=False)


@pytest.fixture
def adm_setup(tiny_config, manifest, in_tmp, inception_weights):
    """Samples (the val images flipped) with their features, a trained classifier and the val images."""
    tiny_config["evaluate"]["inception_weights"] = str(inception_weights)
    run_train_classifier(tiny_config, manifest, in_tmp / "classifier")
    val = ImageDataset(load_manifest(manifest), "val", 32)
    samples = torch.stack([val[i][0].flip(-1) for i in range(len(val))])
    write_samples(in_tmp / "samples", list(samples), val.labels())
    images = torch.stack([val[i][0] for i in range(len(val))]).permute(0, 2, 3, 1).numpy()
    return inception_pool_features(samples, inception_weights), images


def evaluate_against(tiny_config, manifest, in_tmp, name, **arrays):
    np.savez(in_tmp / f"{name}.npz", **arrays)
    tiny_config["evaluate"]["reference"] = str(in_tmp / f"{name}.npz")
    run_evaluate(tiny_config, in_tmp / "samples", manifest, in_tmp / "classifier", in_tmp / name)
    return read_json(in_tmp / name / "metrics.json")


def test_fid_against_an_adm_batch_uses_its_mu_sigma(tiny_config, manifest, in_tmp, adm_setup):
    """ADM's protocol: FID against the batch's own mu/sigma (not its images'); IS, KID and P/R as
    against the images alone."""
    features, images = adm_setup
    mu, sigma = adm_batch_statistics(features)
    adm = evaluate_against(tiny_config, manifest, in_tmp, "adm", arr_0=images, mu=mu, sigma=sigma)
    expected = frechet_distance(features, mu, sigma)
    assert adm["fid"] == pytest.approx(expected, rel=1e-5)
    assert adm["fid_reference_statistics"] == "npz mu/sigma" and adm["reference_images"] == len(images)
    assert adm["kid"] is not None

    images_only = evaluate_against(tiny_config, manifest, in_tmp, "images", arr_0=images)
    assert images_only["fid_reference_statistics"] == "computed from reference images"
    image_features = inception_pool_features(torch.from_numpy(images).permute(0, 3, 1, 2),
                                             tiny_config["evaluate"]["inception_weights"])
    assert not np.allclose(image_features.mean(0), mu)  # the batch's mu/sigma are not its images' statistics
    assert images_only["fid"] == pytest.approx(
        frechet_distance(features, image_features.mean(0), np.cov(image_features, rowvar=False)), rel=1e-3)
    assert images_only["fid"] != pytest.approx(adm["fid"], rel=1e-2)
    for key in ("inception_score", "inception_score_std", "kid", "kid_std", "precision", "recall"):
        assert adm[key] == pytest.approx(images_only[key]), key
    assert "kid_precision_recall_skipped" not in adm


def test_an_adm_batch_of_statistics_alone_gives_fid_only(tiny_config, manifest, in_tmp, adm_setup):
    """MAR's adm_in256_stats.npz: mu/sigma and no images; KID and P/R are null, and say why."""
    features, _ = adm_setup
    mu, sigma = adm_batch_statistics(features, seed=1)
    metrics = evaluate_against(tiny_config, manifest, in_tmp, "stats", mu=mu.astype(np.float32), sigma=sigma)
    assert metrics["fid"] == pytest.approx(frechet_distance(features, mu.astype(np.float32), sigma), rel=1e-5)
    assert metrics["fid_reference_statistics"] == "npz mu/sigma"
    assert metrics["reference_images"] == 0
    assert all(metrics[key] is None for key in ("kid", "kid_std", "precision", "recall"))
    assert "no arr_0 images" in metrics["kid_precision_recall_skipped"] and str(in_tmp / "stats.npz") in \
        metrics["kid_precision_recall_skipped"]
    assert metrics["inception_score"] >= 1.0 and metrics["gan_test"] is not None


@pytest.mark.parametrize("arrays, message", [
    ({"mu": np.zeros(10), "sigma": np.eye(2048)}, r"mu must be a float array \[2048\].*float64 \[10\]"),
    ({"mu": np.zeros(2048), "sigma": np.eye(10)}, r"sigma must be a float array \[2048, 2048\].*\[10, 10\]"),
    ({"mu": np.zeros(2048), "sigma": np.zeros((2048, 2048), np.uint8)}, "sigma must be a float array"),
    ({"mu": np.full(2048, np.nan), "sigma": np.eye(2048)}, "mu holds NaN or infinite values"),
    ({"arr_0": np.zeros((2, 32, 32, 3), np.uint8), "mu": np.zeros(2048)}, "has 'mu' but no 'sigma'"),
    ({"mu": np.array([{"x": 1}] * 2048, dtype=object), "sigma": np.eye(2048)}, "allow_pickle=False"),
])
def test_malformed_adm_statistics_are_refused_naming_the_file(tiny_config, in_tmp, arrays, message):
    np.savez(in_tmp / "bad.npz", **arrays)
    tiny_config["evaluate"]["reference"] = str(in_tmp / "bad.npz")
    with pytest.raises(ValueError, match=message) as error:
        reference_fid_statistics(tiny_config)
    assert f"{in_tmp / 'bad.npz'} (evaluate.reference)" in str(error.value)
