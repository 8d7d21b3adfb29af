"""Sample quality: FID, IS, KID, precision and recall from torch-fidelity's InceptionV3 features,
and the evaluate stage (those and GAN-test, digit/evaluate/cas.py) of the samples against the reference images.

torch-fidelity computes the features (its feature extractor) and the metrics from them (its metric
functions); digit feeds it the images and keeps the reference's features itself, in .npz files that
are read without unpickling. torch-fidelity's own input handling and cache, which unpickle files
(torch.load without weights_only), are never used, and the Inception weights reach it as the
tensors read and hashed here, not as a file it would read again.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch_fidelity
import torchvision
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor

from digit.evaluate.cas import SampleDataset, accuracy, classifier_description, load_classifier, unconditional_reason
from digit.runtime.config import resolve_device
from digit.runtime.images import ImageDataset, load_image, load_manifest
from digit.runtime.io import atomic_dir, atomic_path, sha256_file, sha256_json, write_json
from digit.runtime.loader import image_batches
from digit.stages import provenance


class ImagesOnly(torch.utils.data.Dataset):
    """The uint8 images of an (image, label) dataset: the input form torch-fidelity accepts."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset[index][0]


class PngImages(torch.utils.data.Dataset):
    """The PNGs of a folder in name order, as they are (no resizing), as uint8 [3, H, W] tensors."""

    def __init__(self, folder: str | Path):
        self.paths = sorted(Path(folder).glob("*.png"))
        if not self.paths:
            raise FileNotFoundError(f"no PNG samples in {folder}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torchvision.transforms.functional.pil_to_tensor(load_image(self.paths[index]))


def generate_inception_weights(path: str | Path, seed: int) -> None:
    """Deterministic random weights for torch-fidelity's InceptionV3, in the state-dict form it loads.

    Its module names are torchvision's, so torchvision's InceptionV3 with 1008 classes has exactly
    its parameters. Convolutions get He init so that activations keep their scale through the depth.
    With these weights FID and IS rank sample sets but are not comparable with published numbers.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)


@dataclass(frozen=True)
class InceptionWeights:
    """InceptionV3 weights as read once: the tensors the feature extractor gets, and the hash and
    name of the file they were read from."""

    state_dict: dict
    sha256: str
    path: Path


def read_inception_weights(path: str | Path) -> InceptionWeights:
    """The tensors of an InceptionV3 weights file (evaluate.inception_weights), read with
    weights_only=True from the very bytes that are hashed; a file that needs unpickling is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config key 'evaluate.inception_weights': no such file {path}")
    data = path.read_bytes()
    try:
        state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} (evaluate.inception_weights) holds objects other than tensors, and it is not "
                         "unpickled here for safety; use torch-fidelity's released weights file") from None
    return InceptionWeights(state_dict, hashlib.sha256(data).hexdigest(), path)


def check_inception_weights(config: dict) -> None:
    """A configured InceptionV3 weights file must exist and hold nothing but tensors: checked before any work."""
    if config["evaluate"]["inception_weights"] is not None:
        read_inception_weights(config["evaluate"]["inception_weights"])


def inception_weights(config: dict, scratch: Path) -> tuple[InceptionWeights, bool]:
    """The InceptionV3 weights of evaluate.inception_weights, or deterministic generated ones
    (written to `scratch` to be hashed as a file; kept by their hash only, not the 96 MB file); and
    whether FID is calibrated."""
    if config["evaluate"]["inception_weights"] is not None:
        return read_inception_weights(config["evaluate"]["inception_weights"]), True
    generated = scratch / "inception-generated.pth"
    generate_inception_weights(generated, config["seed"])
    return read_inception_weights(generated), False


FEATURE_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's port of the TF Inception of FID; also for P/R, as ADM
FID_FEATURES = 2048  # FID's features: Inception pool3, the "2048" layer of FEATURE_EXTRACTOR, as in ADM's mu/sigma
POOL, LOGITS = "2048", "logits_unbiased"  # the layers: pool3 for FID, KID and P/R (as ADM), the logits for IS
FID_FROM_NPZ = "npz mu/sigma"  # metrics.json fid_reference_statistics: FID against the reference batch's own statistics
FID_FROM_IMAGES = "computed from reference images"


def inception_extractor(weights: InceptionWeights, cuda: bool) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 with exactly the tensors of `weights`: they reach it serialized in
    memory (torch.load, which it calls, takes a file object), so no file is read a second time."""
    buffer = io.BytesIO()
    torch.save(weights.state_dict, buffer)
    buffer.seek(0)
    return create_feature_extractor(FEATURE_EXTRACTOR, [LOGITS, POOL], cuda=cuda,
                                    feature_extractor_weights_path=buffer, verbose=False)


def read_cached_features(path: Path, count: int) -> torch.Tensor | None:
    """The reference's pool3 features cached at `path` (float32 [count, 2048]), or None when there are
    none, or the file is not such an array (it is then recomputed and replaced): nothing is unpickled."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            features = npz["features"]
    except (OSError, ValueError, KeyError, AttributeError, EOFError, zipfile.BadZipFile) as e:
        print(f"evaluate: {path} is not a cache entry of reference features ({e}); recomputing it")
        return None
    if features.dtype != np.float32 or features.shape != (count, FID_FEATURES) or not np.isfinite(features).all():
        print(f"evaluate: {path} holds {features.dtype} {list(features.shape)}, not the finite float32 "
              f"[{count}, {FID_FEATURES}] features of the reference; recomputing it")
        return None
    return torch.from_numpy(features)


def reference_features(reference: torch.utils.data.Dataset, extract, cache_root: str | Path,
                       reference_name: str | None) -> tuple[torch.Tensor, str]:
    """The reference's pool3 features and whether they were 'cached' or 'computed'. With
    `reference_name` (see `reference_cache_name`) they are kept in cache_root/<name>.npz for the
    next evaluation against the same reference."""
    if reference_name is None:
        return extract(reference)[POOL], "computed"
    path = Path(cache_root) / f"{reference_name}.npz"
    cached = read_cached_features(path, len(reference))
    if cached is not None:
        return cached, "cached"
    features = extract(reference)[POOL]
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez(f, features=features.numpy())
    return features, "computed"


def fidelity_metrics(samples: str | Path | torch.utils.data.Dataset, reference: torch.utils.data.Dataset | None,
                     weights: str | Path | InceptionWeights, batch_size: int, cuda: bool, seed: int,
                     cache_root: str | Path, reference_name: str | None = None,
                     fid_statistics: dict | None = None) -> dict:
    """FID, IS, KID, precision and recall of samples (a folder of PNGs or a dataset of uint8 images)
    against a reference dataset of uint8 images, with torch-fidelity's feature extractor and metric
    functions; no downloads. With `reference_name`, the reference's features are cached under that
    name in `cache_root` and the next call naming it reuses them: the name must identify the images
    and the weights (see `reference_cache_name`). `reference_statistics` says which it was.

    With `fid_statistics` ({"mu": [2048], "sigma": [2048, 2048]}, an ADM reference batch's, see
    `npz_fid_statistics`), FID is the Frechet distance between the samples' statistics and those,
    not the reference images'; KID and precision/recall still use the reference images, and are
    None when there are none (`reference` None)."""
    if not isinstance(samples, torch.utils.data.Dataset):
        samples = PngImages(samples)
    if reference is None and fid_statistics is None:
        raise ValueError("fidelity_metrics needs reference images, FID statistics or both")
    if not isinstance(weights, InceptionWeights):
        weights = read_inception_weights(weights)
    n_samples = len(samples)
    n_reference = len(reference) if reference is not None else n_samples
    options = dict(rng_seed=seed, kid_subset_size=min(1000, n_samples, n_reference),
                   prc_neighborhood=min(3, n_samples - 1, n_reference - 1),
                   save_cpu_ram=not cuda, verbose=False)  # precision/recall in parts on the CPU: less memory
    extractor = inception_extractor(weights, cuda)
    device = torch.device("cuda" if cuda else "cpu")

    @torch.no_grad()
    def extract(images: torch.utils.data.Dataset) -> dict:
        """torch-fidelity's get_featuresdict_from_dataset (the same batches, in order), the images read by
        loader workers (digit/runtime/loader.py)."""
        batches = []
        for batch in image_batches(images, device, min(batch_size, len(images))):
            features = extractor.convert_features_tuple_to_dict(extractor(batch.to(device, non_blocking=True)))
            batches.append({key: value.cpu() for key, value in features.items()})
        return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}

    features = extract(samples)
    raw = isc_features_to_metric(features[LOGITS], min(10, n_samples), True, seed)
    raw |= {"kernel_inception_distance_mean": None, "kernel_inception_distance_std": None,
            "precision": None, "recall": None, "reference_statistics": "unused"}
    if reference is not None:
        reference_pool, raw["reference_statistics"] = reference_features(reference, extract, cache_root,
                                                                         reference_name)
        raw |= kid_features_to_metric(features[POOL], reference_pool, **options)
        raw |= prc_features_to_metric(features[POOL], reference_pool, **options)
    samples_statistics = fid_features_to_statistics(features[POOL])
    if fid_statistics is None:
        raw |= fid_statistics_to_metric(samples_statistics, fid_features_to_statistics(reference_pool), False)
    else:
        # in float64, as the ADM evaluator computes it (torch-fidelity's own mu is float32; it wants equal dtypes)
        stats_1, stats_2 = ({k: np.asarray(stats[k], np.float64) for k in ("mu", "sigma")}
                            for stats in (samples_statistics, fid_statistics))
        raw |= fid_statistics_to_metric(stats_1, stats_2, False)
    return {"fid": raw["frechet_inception_distance"],
            "inception_score": raw["inception_score_mean"], "inception_score_std": raw["inception_score_std"],
            "kid": raw["kernel_inception_distance_mean"], "kid_std": raw["kernel_inception_distance_std"],
            "precision": raw["precision"], "recall": raw["recall"],
            "reference_statistics": raw["reference_statistics"]}


def open_reference_npz(path: Path) -> np.lib.npyio.NpzFile:
    """An ADM-style reference batch, opened without unpickling anything (an object array in it is refused)."""
    if not path.is_file():
        raise FileNotFoundError(f"config key 'evaluate.reference': no such file {path}")
    return np.load(path, allow_pickle=False)


def read_npz_array(npz: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    """One array of a reference batch; an object array (a pickle) is refused, naming the file."""
    try:
        return npz[key]
    except ValueError as error:  # "Object arrays cannot be loaded when allow_pickle=False"
        raise ValueError(f"{path} (evaluate.reference): {key}: {error}") from None


class NpzImages(torch.utils.data.Dataset):
    """The images of an ADM-style reference batch (`arr_0`: uint8 [N, H, W, 3]) as [3, H, W] tensors."""

    def __init__(self, path: str | Path, size: int):
        path = Path(path)
        with open_reference_npz(path) as npz:
            if "arr_0" not in npz.files:
                raise ValueError(f"{path} (evaluate.reference) has no 'arr_0' image array; keys {npz.files}")
            images = read_npz_array(npz, path, "arr_0")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"{path} (evaluate.reference): arr_0 must be uint8 [N, H, W, 3], "
                             f"got {images.dtype} {list(images.shape)}")
        if images.shape[1:3] != (size, size):
            raise ValueError(f"{path} (evaluate.reference) holds {images.shape[1]}x{images.shape[2]} images, "
                             f"the samples are {size}x{size} (data.image_size)")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[index]).permute(2, 0, 1)


def npz_fid_statistics(path: str | Path) -> dict | None:
    """The FID statistics an ADM reference batch ships (`mu` [2048], `sigma` [2048, 2048]: Inception
    pool3 of the whole ImageNet train set, not of its arr_0 images), or None if it has none. MAR's
    adm_in256_stats.npz holds these alone."""
    path = Path(path)
    with open_reference_npz(path) as npz:
        present = [key for key in ("mu", "sigma") if key in npz.files]
        if not present:
            return None
        if len(present) == 1:
            missing = ({"mu", "sigma"} - set(present)).pop()
            raise ValueError(f"{path} (evaluate.reference) has '{present[0]}' but no '{missing}'; keys {npz.files}")
        stats = {key: read_npz_array(npz, path, key) for key in ("mu", "sigma")}
    for key, shape in (("mu", (FID_FEATURES,)), ("sigma", (FID_FEATURES, FID_FEATURES))):
        value = stats[key]
        if not np.issubdtype(value.dtype, np.floating) or value.shape != shape:
            raise ValueError(f"{path} (evaluate.reference): {key} must be a float array {list(shape)} (the "
                             f"statistics of Inception pool3 features), got {value.dtype} {list(value.shape)}")
        if not np.isfinite(value).all():
            raise ValueError(f"{path} (evaluate.reference): {key} holds NaN or infinite values")
    return stats


def val_reference_record(entries: list[dict], size: int) -> dict:
    """What makes a reference of val images: their files' contents and the preprocessing (runtime/images.preprocess)."""
    key = sha256_json({"images": [e["sha256"] for e in entries], "size": size,
                       "preprocess": "resize shorter side (bicubic, antialias) + center crop"})
    return {"reference": "val", "reference_images": len(entries), "reference_sha256": key}


def reference_images(config: dict, manifest: dict) -> tuple[torch.utils.data.Dataset | None, dict]:
    """The reference images of evaluate.reference and a record that identifies them: `val` (the val
    split, prepared like the data) or an ADM reference batch .npz file (None if it holds only
    mu/sigma, see `npz_fid_statistics`)."""
    size, reference = config["data"]["image_size"], config["evaluate"]["reference"]
    if reference == "val":
        dataset = ImageDataset(manifest, "val", size)
        return ImagesOnly(dataset), val_reference_record(dataset.entries, size)
    with open_reference_npz(Path(reference)) as npz:
        has_images = "arr_0" in npz.files or not {"mu", "sigma"} & set(npz.files)
    images = NpzImages(reference, size) if has_images else None
    return images, {"reference": str(reference), "reference_images": len(images) if has_images else 0,
                    "reference_sha256": sha256_file(reference)}


def reference_fid_statistics(config: dict) -> dict | None:
    """The FID statistics evaluate.reference ships (an ADM batch's mu/sigma), or None: FID is then
    computed against the reference images."""
    reference = config["evaluate"]["reference"]
    return None if reference == "val" else npz_fid_statistics(reference)


def reference_cache_name(record: dict, weights_sha256: str) -> str:
    """The cache entry of a reference's features, named by the hash of all they depend on: a new
    reference, new weights or another feature extractor never meet old features."""
    key = sha256_json({"reference_sha256": record["reference_sha256"], "inception_weights_sha256": weights_sha256,
                       "feature_extractor": FEATURE_EXTRACTOR, "layer": POOL,
                       "torch_fidelity": torch_fidelity.__version__})
    return f"digit-reference-{key[:32]}"


def run_evaluate(config: dict, samples_dir: str | Path, manifest_path: str | Path,
                 classifier_dir: str | Path | None, out_dir: str | Path) -> None:
    """metrics.json: FID/IS/KID/precision/recall against the reference, GAN-test of the samples (the
    accuracy on them of the classifier of train_classifier; without one, classifier.enabled: false,
    none; for unconditional samples none, and gan_test_skipped says why), and what the numbers were
    measured with (reference, feature extractor, its weights). CAS is the cas stage's (cas.py)."""
    check_inception_weights(config)
    device = resolve_device(config)
    size, batch_size = config["data"]["image_size"], config["evaluate"]["batch_size"]
    manifest = load_manifest(manifest_path)
    samples = SampleDataset(samples_dir, size)
    gan_test_skipped = None
    if classifier_dir is not None:
        classifier, classifier_meta = load_classifier(classifier_dir, device)
        if classifier_meta["classes"] != manifest["classes"]:
            raise ValueError(f"{classifier_dir} was trained on other classes than {manifest_path} lists")
        gan_test_skipped = unconditional_reason(samples, samples_dir, len(manifest["classes"]), "GAN-test")
    reference, record = reference_images(config, manifest)
    fid_statistics = reference_fid_statistics(config)

    # GAN-test first: it decodes every sample through load_image, which names a file it cannot read
    gan_test = (accuracy(classifier, samples, batch_size, device)
                if classifier_dir is not None and gan_test_skipped is None else None)
    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory() as scratch:
        weights, calibrated = inception_weights(config, Path(scratch))
        metrics = fidelity_metrics(PngImages(Path(samples_dir) / "images"), reference, weights, batch_size,
                                   device.type == "cuda", config["seed"], config["evaluate"]["cache_dir"],
                                   reference_name=reference_cache_name(record, weights.sha256),
                                   fid_statistics=fid_statistics)
        if reference is None:
            metrics["kid_precision_recall_skipped"] = (
                f"{record['reference']} (evaluate.reference) holds mu/sigma but no arr_0 images; "
                "KID, precision and recall need reference images")
        if gan_test_skipped is not None:
            metrics["gan_test_skipped"] = gan_test_skipped
        metrics |= {
            "gan_test": gan_test,
            "chance": 1 / len(manifest["classes"]),
            "classifier_val_accuracy": classifier_meta["val_accuracy"] if classifier_dir is not None else None,
            "gan_test_classifier": classifier_description(classifier_meta) if classifier_dir is not None else None,
            "num_samples": len(samples), **record,
            "fid_reference_statistics": FID_FROM_IMAGES if fid_statistics is None else FID_FROM_NPZ,
            "feature_extractor": f"torch-fidelity {FEATURE_EXTRACTOR}",
            "fid_calibrated": calibrated,
            "inception_weights": str(weights.path) if calibrated else "generated",
            "inception_weights_sha256": weights.sha256,
        }
        # cached or computed: the same numbers either way, so the log says it and metrics.json does not
        reference_source = metrics.pop("reference_statistics")
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "provenance.json", provenance(
            config, "evaluate",
            {"manifest": manifest_path, "samples": Path(samples_dir) / "samples.npz"}
            | ({"classifier": Path(classifier_dir) / "model.safetensors"} if classifier_dir is not None else {})))
    pr = ("no precision/recall (no reference images)" if metrics["precision"] is None
          else f"precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f}")
    gan_test_text = ("no GAN-test (classifier.enabled: false)" if classifier_dir is None
                     else f"no GAN-test ({gan_test_skipped})" if gan_test is None
                     else f"GAN-test {gan_test:.3f} (chance {metrics['chance']:.3f})")
    print(f"evaluate: reference features {reference_source}")
    print(f"evaluate: FID {metrics['fid']:.3f} ({metrics['fid_reference_statistics']}), "
          f"IS {metrics['inception_score']:.3f}, {pr}, {gan_test_text}")
