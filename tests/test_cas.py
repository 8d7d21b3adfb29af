"""The classifier metrics (digit/evaluate/cas.py): CAS, a classifier trained on the samples and scored
on the real val images; GAN-test's classifier read from a pretrained weights file; what unconditional
samples get. GAN-test itself (a classifier of real images scored on the samples): tests/test_metrics.py."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision.models.resnet import BasicBlock, ResNet

from digit.evaluate.cas import classifier_net, load_classifier, run_cas, run_train_classifier
from digit.evaluate.fidelity import generate_inception_weights, run_evaluate
from digit.runtime.config import ConfigError, check_feasible, validate
from digit.runtime.images import ImageDataset, load_image, load_manifest, preprocess
from digit.runtime.io import read_json, sha256_file


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """Generated once for the module's evaluate runs (evaluate would generate them on every run)."""
    path = tmp_path_factory.mktemp("inception") / "generated.pth"
    generate_inception_weights(path, seed=0)
    return str(path)


def write_samples(directory, images, labels):
    (directory / "images").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(directory / "images" / f"{i:06d}.png")
    np.savez(directory / "samples.npz", labels=np.asarray(labels, dtype=np.int64))


def train_copies(manifest, directory, labels=None):
    """Samples that are the train images (as the classifiers read them) with their labels, or `labels`."""
    train = ImageDataset(load_manifest(manifest), "train", 32)
    write_samples(directory, [train[i][0] for i in range(len(train))], train.labels() if labels is None else labels)
    return len(train)


@torch.no_grad()
def val_accuracy_of(model, manifest, transform=lambda x: x):
    """The accuracy of `model` on the real val images, image by image from their files: written here
    apart from digit's datasets and its accuracy()."""
    entries = load_manifest(manifest)["splits"]["val"]
    right = 0
    for entry in entries:
        x = preprocess(load_image(entry["path"]), 32).float()[None] / 127.5 - 1
        right += int(model(transform(x)).argmax(1).item() == entry["label"])
    return right / len(entries)


def test_cas_trains_on_the_samples_and_scores_the_real_val_images(tiny_config, manifest, in_tmp):
    """Class-conditional samples that are copies of the train images, with their labels: CAS is the
    accuracy on the val images of the classifier trained on them, which is the classifier that
    train_classifier trains on the train images themselves."""
    count = train_copies(manifest, in_tmp / "samples")
    run_cas(tiny_config, in_tmp / "samples", manifest, in_tmp / "cas")
    metrics = read_json(in_tmp / "cas" / "metrics.json")
    model = classifier_net(3)
    model.load_state_dict(load_file(in_tmp / "cas" / "model.safetensors"))
    assert metrics["cas"] == val_accuracy_of(model.eval(), manifest)
    assert metrics["cas_skipped"] is None and metrics["cas_train_samples"] == count == 24
    assert metrics["cas_val_images"] == 12
    assert read_json(in_tmp / "cas" / "model.json")["trained_on"] == "samples"
    log = (in_tmp / "cas" / "log.tsv").read_text().splitlines()
    assert log[0] == "step\tloss\taccuracy" and log[-1].startswith(f"{tiny_config['classifier']['steps']}\t")
    assert set(read_json(in_tmp / "cas" / "provenance.json")["inputs"]) == {"manifest", "samples"}

    # the same images in the same order, the same seed and settings: the classifier of the real images
    run_train_classifier(tiny_config, manifest, in_tmp / "classifier")
    real = load_file(in_tmp / "classifier" / "model.safetensors")
    assert all(torch.equal(real[k], v) for k, v in load_file(in_tmp / "cas" / "model.safetensors").items())
    assert metrics["cas"] == read_json(in_tmp / "classifier" / "model.json")["val_accuracy"]


def test_unconditional_samples_have_neither_cas_nor_gan_test(tiny_config, manifest, in_tmp, inception_weights):
    train_copies(manifest, in_tmp / "samples", labels=[-1] * 24)
    run_cas(tiny_config, in_tmp / "samples", manifest, in_tmp / "cas")
    metrics = read_json(in_tmp / "cas" / "metrics.json")
    assert metrics["cas"] is None and "unconditional samples (labels -1)" in metrics["cas_skipped"]
    assert not (in_tmp / "cas" / "model.safetensors").exists()

    run_train_classifier(tiny_config, manifest, in_tmp / "classifier")
    tiny_config["evaluate"]["inception_weights"] = inception_weights
    run_evaluate(tiny_config, in_tmp / "samples", manifest, in_tmp / "classifier", in_tmp / "evaluate")
    metrics = read_json(in_tmp / "evaluate" / "metrics.json")
    assert metrics["gan_test"] is None and "unconditional samples (labels -1)" in metrics["gan_test_skipped"]
    assert metrics["classifier_val_accuracy"] is not None


def test_sample_labels_outside_the_classes_are_refused(tiny_config, manifest, in_tmp):
    train_copies(manifest, in_tmp / "samples", labels=[0, 1, 2, 3] * 6)
    with pytest.raises(ValueError, match=r"labels outside 0 \.\. 2"):
        run_cas(tiny_config, in_tmp / "samples", manifest, in_tmp / "cas")
    assert not (in_tmp / "cas").exists()


# -- a pretrained classifier for GAN-test (classifier.weights: file) -----------------------------------

def small_resnet(num_classes=3, seed=0):
    """A torchvision ResNet of one basic block per stage: the layout of torchvision's ResNet weights."""
    torch.manual_seed(seed)
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes).eval()
    for module in net.modules():  # BN statistics that are not the identity, as trained weights have
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return net


def torchvision_eval(x):
    """torchvision's ImageNet eval transform on [-1, 1] images: Resize(256), CenterCrop(224), normalize."""
    x = F.interpolate((x + 1) / 2, size=(256, 256), mode="bilinear", align_corners=False, antialias=True)[..., 16:240, 16:240]
    return (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def pretrained_config(config, path):
    config["classifier"].update(weights="file", weights_file=str(path))
    return config


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_pretrained_classifier_file_is_gan_tests_classifier(tiny_config, manifest, in_tmp, inception_weights,
                                                             suffix):
    net = small_resnet()
    path = in_tmp / f"resnet{suffix}"
    if suffix == ".pth":
        torch.save(net.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    config = pretrained_config(tiny_config, path)
    run_train_classifier(config, manifest, in_tmp / "classifier")
    meta = read_json(in_tmp / "classifier" / "model.json")
    assert (meta["arch"], meta["block"], meta["layers"], meta["num_classes"]) == ("resnet", "basic", [1, 1, 1, 1], 3)
    assert meta["trained_on"] == "pretrained" and meta["weights_file"] == str(path)
    assert meta["weights_file_sha256"] == sha256_file(path)
    assert not (in_tmp / "classifier" / "log.tsv").exists()  # read, not trained
    assert meta["val_accuracy"] == val_accuracy_of(net, manifest, torchvision_eval)

    model, _ = load_classifier(in_tmp / "classifier")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(images), net(torchvision_eval(images)))
        at_256 = torch.rand(1, 3, 256, 256) * 2 - 1  # ImageNet's 256-pixel images are only cropped
        torch.testing.assert_close(model(at_256), net(torchvision_eval(at_256)))

    if suffix != ".pth":
        return
    # GAN-test with it: on samples that are the val images, its val accuracy
    val = ImageDataset(load_manifest(manifest), "val", 32)
    write_samples(in_tmp / "samples", [val[i][0] for i in range(len(val))], val.labels())
    config["evaluate"]["inception_weights"] = inception_weights
    run_evaluate(config, in_tmp / "samples", manifest, in_tmp / "classifier", in_tmp / "evaluate")
    metrics = read_json(in_tmp / "evaluate" / "metrics.json")
    assert metrics["gan_test"] == pytest.approx(meta["val_accuracy"])
    assert metrics["gan_test_classifier"] == f"pretrained resnet ({path})"


class Payload:
    """Unpickling it opens (creates) a file: what a weights file must never get to do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_weights_file_that_needs_unpickling_is_refused(tiny_config, manifest, in_tmp):
    path, marker = in_tmp / "resnet.pth", in_tmp / "unpickled"
    torch.save({**small_resnet().state_dict(), "payload": Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"resnet\.pth \(config key 'classifier\.weights_file'\) needs unpickling"):
        run_train_classifier(pretrained_config(tiny_config, path), manifest, in_tmp / "classifier")
    assert not marker.exists() and not (in_tmp / "classifier").exists()

    torch.save(small_resnet(), path)  # a whole pickled module
    with pytest.raises(ValueError, match=r"resnet\.pth \(config key 'classifier\.weights_file'\) needs unpickling"):
        run_train_classifier(tiny_config, manifest, in_tmp / "classifier")


def test_a_pretrained_classifier_of_other_classes_or_layout_is_refused(tiny_config, manifest, in_tmp):
    path = in_tmp / "resnet.pth"
    torch.save(small_resnet(num_classes=1000).state_dict(), path)
    config = pretrained_config(tiny_config, path)
    with pytest.raises(ValueError, match="classifies 1000 classes, .*manifest.json has 3"):
        run_train_classifier(config, manifest, in_tmp / "classifier")
    torch.save(classifier_net(3).state_dict(), path)
    with pytest.raises(ValueError, match="is not a torchvision ResNet state dict"):
        run_train_classifier(config, manifest, in_tmp / "classifier")
    state = small_resnet().state_dict()
    del state["layer2.0.bn1.running_var"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="is not the weights of a torchvision resnet of 3 classes"):
        run_train_classifier(config, manifest, in_tmp / "classifier")


def test_the_classifier_config_keys(tiny_config, in_tmp):
    pretrained_config(tiny_config, in_tmp / "missing.pth")
    check_feasible(tiny_config, machine=False)  # planning: the file is checked where the run is
    with pytest.raises(ConfigError, match=r"key 'classifier.weights_file': no such file .*missing.pth"):
        check_feasible(tiny_config)
    tiny_config["classifier"]["enabled"] = False
    check_feasible(tiny_config)  # no classifier, no file needed
    tiny_config["classifier"].update(enabled=True, weights_file=None)
    with pytest.raises(ConfigError, match="classifier.weights_file"):
        validate(tiny_config)
    tiny_config["classifier"].update(weights="train", batch_size=7)  # 24 train images, 2 x 3 = 6 samples
    with pytest.raises(ConfigError, match=r"key 'classifier.batch_size': 7 is more than the 6 samples CAS trains on"):
        check_feasible(tiny_config, machine=False)
    tiny_config["stage1"]["class_conditional"] = False  # no CAS to train on unconditional samples
    check_feasible(tiny_config, machine=False)
