import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import tokenize_vq_all
from safetensors.torch import load_file, save_file

from digit.pixels.losses import PerceptualLoss
from digit.pixels.model import Quantizer, VQModel, codebook_usage, load_vq
from digit.pixels.tokenize import run_tokenize_vq, run_tokenize_vq_shard
from digit.pixels.train import run_train_vq
from digit.runtime.images import ImageDataset, load_manifest, to_float
from digit.runtime.io import read_json, sha256_file


def test_straight_through_gradient_reaches_the_encoder():
    torch.manual_seed(0)
    model = VQModel("vqgan", codebook_size=16, code_dim=4, channels=8, channel_mult=[1, 1, 1], num_res_blocks=1, beta=0.25)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, z, indices, vq_loss = model(x)
    assert recon.shape == x.shape and indices.shape == (2, 4, 4) and z.shape == (2, 4, 4, 4)
    F.l1_loss(recon, x).backward()  # reconstruction only: the encoder gets gradient through the quantizer
    first_conv = model.encoder.stem.weight.grad
    assert first_conv is not None and first_conv.abs().sum() > 0
    assert model.quantizer.codebook.weight.grad is None or model.quantizer.codebook.weight.grad.abs().sum() == 0


def test_vq_loss_pulls_codes_and_commits_encodings():
    quantizer = Quantizer(codebook_size=4, code_dim=2, beta=0.25)
    z = torch.randn(1, 2, 3, 3, requires_grad=True)
    _, _, loss = quantizer(z)
    loss.backward()
    assert loss > 0 and quantizer.codebook.weight.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


def test_codebook_usage_and_perplexity():
    usage, perplexity = codebook_usage(torch.tensor([0, 0, 1, 1]), codebook_size=4)
    assert usage == 0.5 and perplexity == pytest.approx(2.0)
    usage, perplexity = codebook_usage(torch.tensor([3, 3, 3]), codebook_size=4)
    assert usage == 0.25 and perplexity == pytest.approx(1.0)


def test_restart_moves_dead_codes_onto_encodings():
    quantizer = Quantizer(codebook_size=8, code_dim=2, beta=0.25)
    z = torch.randn(1, 2, 4, 4)
    used = torch.tensor([True] * 4 + [False] * 4)
    before = quantizer.codebook.weight.detach().clone()
    quantizer.restart_dead(used, z, torch.Generator().manual_seed(0))
    after = quantizer.codebook.weight.detach()
    assert torch.equal(after[:4], before[:4])
    encodings = z.permute(0, 2, 3, 1).flatten(0, 2)
    assert all((encodings == code).all(1).any() for code in after[4:])


def test_train_save_load_and_token_cache(tiny_config, manifest, in_tmp):
    run_train_vq(tiny_config, manifest, in_tmp / "vq")
    meta = read_json(in_tmp / "vq" / "model.json")
    assert meta["grid"] == [8, 8] and meta["codebook_size"] == 32 and meta["provenance"]["inputs"]["manifest"]
    log = (in_tmp / "vq" / "log.tsv").read_text().splitlines()
    assert log[0].split("\t")[:9] == ["step", "loss", "recon", "commit", "perceptual", "generator",
                                       "discriminator", "usage", "perplexity"]
    assert (in_tmp / "vq" / "recon.png").is_file()

    # The loaded model is the trained one: it reproduces the validation loss recorded at training time.
    model = load_vq(in_tmp / "vq")
    val = ImageDataset(load_manifest(manifest), "val", 32)
    images = to_float(torch.stack([val[i][0] for i in range(len(val))]))
    indices = model.encode_indices(images)
    recon = model.decode_indices(indices)
    assert indices.shape == (len(val), 8, 8) and indices.dtype == torch.long
    assert recon.shape == images.shape and recon.min() >= -1 and recon.max() <= 1
    assert F.l1_loss(recon, images).item() == pytest.approx(meta["val"]["recon_l1"], rel=1e-4)

    tokenize_vq_all(tiny_config, manifest, in_tmp / "vq", in_tmp / "vq_tokens")
    tokens_meta = read_json(in_tmp / "vq_tokens" / "meta.json")
    assert tokens_meta["kind"] == "vq" and tokens_meta["vocab_size"] == 32 and tokens_meta["grid"] == [8, 8]
    assert tokens_meta["views"] == ["identity", "hflip"] and tokens_meta["num_classes"] == 3
    assert tokens_meta["vq_sha256"] == sha256_file(in_tmp / "vq" / "model.safetensors")
    for split, n in (("train", 24), ("val", 12)):
        tokens = np.load(in_tmp / "vq_tokens" / f"{split}.npy")
        labels = np.load(in_tmp / "vq_tokens" / f"{split}_labels.npy")
        assert tokens.dtype == np.uint16 and tokens.shape == (n, 2, 64)
        assert labels.dtype == np.int64 and labels.tolist() == [i // (n // 3) for i in range(n)]
    val_tokens = np.load(in_tmp / "vq_tokens" / "val.npy")
    assert np.array_equal(val_tokens[:, 0], indices.flatten(1).numpy())
    flipped = model.encode_indices(images.flip(-1)).flatten(1).numpy()
    assert np.array_equal(val_tokens[:, 1], flipped)


def test_vq_tokens_do_not_depend_on_the_number_of_shards(tiny_config, manifest, in_tmp):
    """The VQ token cache of 1 and of 3 shard jobs (shard 1 of 3: the end of train, no val): the same
    bytes; shards of another run or a missing shard are refused, as tokenize's."""
    tiny_config["tokenize"]["random_crops"] = 1  # a random-crop view too: keyed by image, not by shard
    run_train_vq(tiny_config, manifest, in_tmp / "vq")
    caches = {}
    for shards in (1, 3):
        tiny_config["tokenize"]["shards"] = shards
        caches[shards] = in_tmp / f"vq_tokens_{shards}"
        tokenize_vq_all(tiny_config, manifest, in_tmp / "vq", caches[shards])
    assert read_json(in_tmp / "vq_tokens_3_shards" / "1" / "meta.json")["ranges"] == {"train": [12, 24], "val": [0, 0]}
    for split in ("train", "val"):
        for name in (f"{split}.npy", f"{split}_labels.npy"):
            assert (caches[1] / name).read_bytes() == (caches[3] / name).read_bytes(), name
    meta = read_json(caches[3] / "meta.json")
    assert meta["kind"] == "vq" and meta["views"] == ["identity", "hflip", "crop0"]
    assert meta["provenance"]["stage"] == "tokenize_vq" and len(meta["provenance"]["inputs"]) == 2 + 3

    shards = in_tmp / "vq_tokens_3_shards"
    other = dict(tiny_config, tokenize=dict(tiny_config["tokenize"], views=["identity"]))
    run_tokenize_vq_shard(other, manifest, in_tmp / "vq", 1, in_tmp / "other" / "1")
    (shards / "1").rename(in_tmp / "kept")
    with pytest.raises(FileNotFoundError, match=r"tokenize_vq shard .*vq_tokens_3_shards/1 is missing"):
        run_tokenize_vq(tiny_config, shards, in_tmp / "refused")
    (in_tmp / "other" / "1").rename(shards / "1")
    with pytest.raises(ValueError, match=r"tokenize_vq shard .*vq_tokens_3_shards/1 was made by another run"):
        run_tokenize_vq(tiny_config, shards, in_tmp / "refused")
    assert not (in_tmp / "refused").exists()


def test_training_is_deterministic(tiny_config, manifest, in_tmp):
    run_train_vq(tiny_config, manifest, in_tmp / "a")
    run_train_vq(tiny_config, manifest, in_tmp / "b")
    assert sha256_file(in_tmp / "a" / "model.safetensors") == sha256_file(in_tmp / "b" / "model.safetensors")


def test_image_size_must_fit_the_downsampling(tiny_config, manifest, in_tmp):
    tiny_config["vq"]["channel_mult"] = [1] * 7  # downsampling 64 > 32 px images
    with pytest.raises(ValueError, match="vq.channel_mult"):
        run_train_vq(tiny_config, manifest, in_tmp / "vq")


def vgg_features_file(path):
    """torchvision VGG16 `features` weights (random), under torchvision's key names."""
    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    save_file({f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}, path)
    return str(path)


def test_perceptual_loss_is_zero_only_for_identical_images(tmp_path):
    loss = PerceptualLoss(vgg_features_file(tmp_path / "vgg16.safetensors"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(x.flip(-1), x).item() > 0


def test_perceptual_weights_with_wrong_keys_are_named(tmp_path):
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3), "head.weight": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"vq.perceptual_weights_file.*missing keys \['features.0.bias'.*'head.weight'"):
        PerceptualLoss(str(tmp_path / "bad.safetensors"))


def test_perceptual_adversarial_and_ema_training(tiny_config, manifest, in_tmp):
    tiny_config["vq"].update(arch="vqgan", perceptual_weight=1.0, perceptual_weights_file=vgg_features_file(in_tmp / "vgg.safetensors"),
                             adversarial_weight=0.5, adversarial_start=2, ema_decay=0.9, steps=4)
    run_train_vq(tiny_config, manifest, in_tmp / "vq")
    final = read_json(in_tmp / "vq" / "model.json")["final"]
    assert final["perceptual"] > 0 and final["discriminator"] > 0 and final["generator"] != 0
    # the kept weights are the average, not the last step's
    tiny_config["vq"]["ema_decay"] = 0.0
    run_train_vq(tiny_config, manifest, in_tmp / "plain")
    ema, plain = (load_file(in_tmp / d / "model.safetensors") for d in ("vq", "plain"))
    assert not torch.equal(ema["decoder.proj.weight"], plain["decoder.proj.weight"])
    assert torch.equal(ema["quantizer.codebook.weight"], plain["quantizer.codebook.weight"])


def test_pixel_range_maps_digit_pixels_into_the_networks_range():
    torch.manual_seed(0)
    model = VQModel("vqgan", codebook_size=16, code_dim=4, channels=8, channel_mult=[1, 1], num_res_blocks=1, beta=0.25,
                    pixel_range=(0, 1)).eval()
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert torch.equal(model.encode_indices(x), model.quantizer.lookup(model.encoder((x + 1) / 2)))
    decoded = model.decoder(model.quantizer.embed(model.encode_indices(x)))
    torch.testing.assert_close(model.decode_indices(model.encode_indices(x)), (decoded * 2 - 1).clamp(-1, 1))


def test_a_model_json_of_another_version_is_named(tmp_path):
    (tmp_path / "model.json").write_text('{"codebook_size": 8, "code_dim": 4, "channels": [8, 8], "beta": 0.25}')
    with pytest.raises(ValueError, match=r"model.json lacks \['arch', 'channel_mult'.*re-run train_vq"):
        load_vq(tmp_path)
