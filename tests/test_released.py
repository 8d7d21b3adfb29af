"""Conversion of DiGIT's released fairseq checkpoints: tiny checkpoints written here in fairseq's layout
(official key names and shapes) give the logits of fairseq's decoder, computed here from its formulas;
bad keys, shapes and configs are refused by name; unsafe pickles are refused and never run."""
import argparse
import json
import math
import os
import re
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from digit.generate.gpt import PRESETS, generate_masked
from digit.generate.released import (convert_stage1, convert_stage2, read_fairseq_checkpoint,
                                     released_centroids, run_import_stage1, run_import_stage2, stage1_record,
                                     stage2_record, write_stage)
from digit.generate.sample import check_chain, generate_tokens
from digit.generate.train import LOG_HEADER, load_stage
from digit.runtime.images import load_manifest
from digit.runtime.io import sha256_file

D, LAYERS, HEADS, FFN = 32, 2, 2, 64
K, V, CLASSES = 16, 16, 10        # K-means codes, VQ codes, classes
GRID, T = [4, 4], 16              # 4x4 tokens per image, for both token kinds
MAX_POSITIONS = 20                # fairseq's max_target_positions: tables of 22 rows
PAD, EOS, UNK, NSPECIAL = 1, 2, 3, 5
SHAPE = dict(n_layer=LAYERS, n_head=HEADS, n_embd=D, n_ffn=FFN)


# --- fairseq's side --------------------------------------------------------------------------------

class AverageMeter:
    """A fairseq meter (fairseq.logging.meters), as extra_state holds it: pickled under fairseq's name.
    Reading must never rebuild it (only an inert stand-in)."""
    rebuilt = 0

    def __init__(self):
        self.val, self.sum, self.count, self.round = np.float64(1.5), 3.0, 2, None

    def __setstate__(self, state):
        AverageMeter.rebuilt += 1
        self.__dict__.update(state)


class MetersDict(OrderedDict):
    def __init__(self):
        super().__init__()
        self.priorities = [(0, 0, "loss")]


@pytest.fixture(autouse=True)
def fairseq_modules(monkeypatch):
    """pickle writes a class by its module's name and checks the module holds it: a fake fairseq."""
    module = types.ModuleType("fairseq.logging.meters")
    for cls in (AverageMeter, MetersDict):
        cls.__module__ = module.__name__
        setattr(module, cls.__name__, cls)
    for name in ("fairseq", "fairseq.logging"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)


def decoder_state(seed: int, embed_rows: int, out_rows: int, prenorm: bool, two_positions: bool = False) -> dict:
    """A TransformerDecoder's state dict (fairseq 0.12 names) inside a DiGIT model, with its frozen parts."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.3, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=g)

    sd = {"decoder.version": torch.tensor([3.0]), "decoder.embed_tokens.weight": r(embed_rows, D),
          "decoder.embed_positions.weight": r(MAX_POSITIONS + 2, D)}
    if two_positions:
        sd["decoder.embed_positions_1.weight"] = r(MAX_POSITIONS + 2, D)
    for i in range(LAYERS):
        p = f"decoder.layers.{i}."
        for proj in ("q", "k", "v", "out"):
            sd[f"{p}self_attn.{proj}_proj.weight"], sd[f"{p}self_attn.{proj}_proj.bias"] = r(D, D), r(D, scale=0.1)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            sd[f"{p}{norm}.weight"], sd[f"{p}{norm}.bias"] = r(D, scale=0.1, mean=1.0), r(D, scale=0.1)
        sd[f"{p}fc1.weight"], sd[f"{p}fc1.bias"] = r(FFN, D), r(FFN, scale=0.1)
        sd[f"{p}fc2.weight"], sd[f"{p}fc2.bias"] = r(D, FFN), r(D, scale=0.1)
    if prenorm:
        sd["decoder.layer_norm.weight"], sd["decoder.layer_norm.bias"] = r(D, scale=0.1, mean=1.0), r(D, scale=0.1)
    sd["decoder.output_projection.weight"] = r(out_rows, D)
    # frozen modules digit keeps elsewhere: DINOv2, the K-means centroids [D_enc, K] (and stage 2's VQGAN)
    sd |= {"pretrained_encoder.blocks.0.attn.qkv.weight": r(24, 8), "centroids": r(8, K), "centroid_norm": r(1, K)}
    if two_positions:
        sd["vqgan.quantize.embedding.weight"] = r(V, 4)
    # fairseq's --fp16 saves half weights: layer 0 is half here
    return {key: value.half() if key.startswith("decoder.layers.0.") else value for key, value in sd.items()}


def model_settings(name: str, prenorm: bool, **extra) -> dict:
    return dict(_name=name, decoder_embed_dim=D, decoder_input_dim="${model.decoder_embed_dim}", decoder_layers=LAYERS,
                decoder_attention_heads=HEADS, decoder_ffn_embed_dim=FFN, decoder_normalize_before=prenorm,
                activation_fn="gelu", decoder_learned_pos=True, no_scale_embedding=False,
                share_decoder_input_output_embed=False, max_target_positions=MAX_POSITIONS, **extra)


def save_checkpoint(path, model: dict, cfg=None, args=None, **kwargs):
    """fairseq 0.12's trainer.state_dict layout (args only in legacy checkpoints)."""
    meters = MetersDict()
    meters["loss"] = AverageMeter()
    torch.save({"args": args, "cfg": cfg, "model": model, "criterion": None,
                "optimizer_history": [{"criterion_name": "CeLossLS", "optimizer_name": "FairseqAdam",
                                       "lr_scheduler_state": {"best": None}, "num_updates": 7}],
                "task_state": {},
                "extra_state": {"metrics": {"train": [(0, "loss", "AverageMeter", {"val": np.float64(1.5)})]},
                                "train_meters": meters, "previous_training_time": 12.5,
                                "train_iterator": {"epoch": 1, "iterations_in_epoch": 3, "shuffle": True}},
                "last_optimizer_state": {"state": {0: {"step": 7, "exp_avg": torch.zeros(3)}},
                                         "param_groups": [{"lr": 1e-4, "params": [0]}]}}, path, **kwargs)
    return path


def stage1_checkpoint(path, conditional: bool, seed: int = 0, edit=None, **save):
    """`stlm`: post-LN; the class-conditional one with 1000 (here CLASSES) rows after the dictionary.
    The unconditional one has a hydra cfg (a plain dict), the conditional one legacy args.
    edit(model, model settings) may change them first. -> (path, model state dict)."""
    rows = K + NSPECIAL + (CLASSES if conditional else 0)
    model = decoder_state(seed, rows, K + NSPECIAL, prenorm=False)
    settings = model_settings("stlm", False, class_conditional=conditional)
    if edit:
        edit(model, settings)
    task = {"_name": "image_generation_stage1", "target_vocab_size": K, "source_vocab_size": -1}
    if conditional:
        return save_checkpoint(path, model, args=argparse.Namespace(**{**task, **settings, "arch": "stlm"})), model
    cfg = {"common": {"fp16": True}, "task": task, "model": settings}
    return save_checkpoint(path, model, cfg=cfg, **save), model


def stage2_checkpoint(path, decoder: str, seed: int = 0):
    """`st2vtlm` / `st2vtlm_nar`: pre-LN, one table of len(tgt_dict) + len(src_dict) rows, two position
    tables. -> (path, model state dict)."""
    model = decoder_state(seed, V + NSPECIAL + K + NSPECIAL, V + NSPECIAL, prenorm=True, two_positions=True)
    name = {"ar": "st2vtlm", "nar": "st2vtlm_nar"}[decoder]
    task = {"_name": "image_generation_stage2", "source_vocab_size": K, "target_vocab_size": V}
    return save_checkpoint(path, model, cfg={"task": task, "model": model_settings(name, True)}), model


def make_positions(tokens: torch.Tensor) -> torch.Tensor:
    """fairseq's utils.make_positions with padding_idx 1."""
    mask = tokens.ne(PAD).long()
    return torch.cumsum(mask, dim=1) * mask + PAD


def fairseq_logits(model: dict, tokens: torch.Tensor, causal: bool = True, sep: bool = False) -> torch.Tensor:
    """fairseq's TransformerDecoder in eval mode from its formulas, on the state dict that was saved: scaled
    token embedding + learned positions (TransformerDecoder2pos: embed_positions_1 before the first </s>,
    embed_positions from it), layers with separate q/k/v, post-LN or pre-LN with a final LayerNorm."""
    W = {k: v.float() for k, v in model.items()}
    prenorm = "decoder.layer_norm.weight" in W
    B, L = tokens.shape
    if sep:
        cut = int(tokens[0].eq(EOS).nonzero()[0])
        pos = torch.cat([W["decoder.embed_positions_1.weight"][make_positions(tokens[:, :cut])],
                         W["decoder.embed_positions.weight"][make_positions(tokens[:, cut:])]], dim=1)
    else:
        pos = W["decoder.embed_positions.weight"][make_positions(tokens)]
    x = math.sqrt(D) * W["decoder.embed_tokens.weight"][tokens] + pos

    def ln(x, name):
        return F.layer_norm(x, (D,), W[f"{name}.weight"], W[f"{name}.bias"], eps=1e-5)

    def lin(x, name):
        return x @ W[f"{name}.weight"].T + W[f"{name}.bias"]

    def heads(t):
        return t.view(B, L, HEADS, D // HEADS).transpose(1, 2)

    for i in range(LAYERS):
        p = f"decoder.layers.{i}."
        residual = x
        if prenorm:
            x = ln(x, p + "self_attn_layer_norm")
        q = lin(x, p + "self_attn.q_proj") * (D // HEADS) ** -0.5
        scores = heads(q) @ heads(lin(x, p + "self_attn.k_proj")).transpose(-1, -2)
        if causal:
            scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        attn = (scores.softmax(-1) @ heads(lin(x, p + "self_attn.v_proj"))).transpose(1, 2).reshape(B, L, D)
        x = residual + lin(attn, p + "self_attn.out_proj")
        if not prenorm:
            x = ln(x, p + "self_attn_layer_norm")
        residual = x
        if prenorm:
            x = ln(x, p + "final_layer_norm")
        x = residual + lin(F.gelu(lin(x, p + "fc1")), p + "fc2")
        if not prenorm:
            x = ln(x, p + "final_layer_norm")
    if prenorm:
        x = ln(x, "decoder.layer_norm")
    return x @ W["decoder.output_projection.weight"].T


# --- digit's side ----------------------------------------------------------------------------------

def convert(path, stage: str, out_dir, **kwargs):
    """read -> convert -> write_stage -> load_stage, as the pipeline does."""
    state, cfg = read_fairseq_checkpoint(path)
    if stage == "stage1":
        conditional = kwargs.get("num_classes") is not None
        gpt_cfg, sd = convert_stage1(state, cfg, kwargs.get("num_classes"), K,
                                     kwargs.get("expected", dict(seq_len=T, **SHAPE)), source=path)
        record = stage1_record(gpt_cfg, conditional, [f"c{i}" for i in range(CLASSES)], GRID,
                               "discriminative", "codebook-sha")
    else:
        expected = kwargs.get("expected", dict(seq_len=T, prefix_len=T + 1, **SHAPE))
        gpt_cfg, sd = convert_stage2(state, cfg, K, kwargs["decoder"], expected, source=path)
        record = stage2_record(gpt_cfg, GRID, GRID, "codebook-sha", "vq-sha")
    write_stage(out_dir, gpt_cfg, sd, record, path)
    return load_stage(out_dir, "cpu")


def codes(n: int, high: int, seed: int) -> torch.Tensor:
    return torch.randint(high, (3, n), generator=torch.Generator().manual_seed(seed))


def close(digit_logits, official_logits):
    torch.testing.assert_close(digit_logits, official_logits, rtol=1e-5, atol=1e-5)


# --- equivalence -----------------------------------------------------------------------------------

def test_unconditional_stage1_gives_fairseqs_logits(tmp_path):
    path, weights = stage1_checkpoint(tmp_path / "checkpoint_last.pt", conditional=False)
    model, meta = convert(path, "stage1", tmp_path / "stage1")
    assert meta["model"]["arch"] == "fairseq_postln" and not meta["class_conditional"] and meta["null_class"] is None
    assert meta["released"] == {"file": "checkpoint_last.pt", "sha256": sha256_file(path)}
    t = codes(T, K, 1)
    official = fairseq_logits(weights, torch.cat([torch.full((3, 1), EOS), t[:, :-1] + NSPECIAL], dim=1))
    with torch.no_grad():
        close(model(torch.zeros(3, 1, dtype=torch.long), t[:, :-1]), official[..., NSPECIAL:])
    sem = model.generate(torch.zeros(2, 1, dtype=torch.long), top_k=5, generator=torch.Generator().manual_seed(0))
    assert sem.shape == (2, T) and 0 <= sem.min() and sem.max() < K


def test_class_conditional_stage1_gives_fairseqs_logits(tmp_path):
    path, weights = stage1_checkpoint(tmp_path / "checkpoint_last.pt", conditional=True, seed=1)
    model, meta = convert(path, "stage1", tmp_path / "stage1", num_classes=CLASSES)
    assert meta["class_conditional"] and meta["num_classes"] == CLASSES and model.cfg.prefix_vocab_size == CLASSES
    t, labels = codes(T, K, 2), torch.tensor([0, 4, CLASSES - 1])
    # the class token class_id + len(dict) replaces </s>
    official = fairseq_logits(weights, torch.cat([labels[:, None] + K + NSPECIAL, t[:, :-1] + NSPECIAL], dim=1))
    with torch.no_grad():
        close(model(labels[:, None], t[:, :-1]), official[..., NSPECIAL:])


def test_stage2_ar_gives_fairseqs_logits(tmp_path):
    path, weights = stage2_checkpoint(tmp_path / "checkpoint_last.pt", "ar", seed=2)
    model, meta = convert(path, "stage2", tmp_path / "stage2", decoder="ar")
    assert meta["decoder"] == "ar" and meta["sep_token"] == K and model.cfg.arch == "fairseq_prenorm"
    sem, vq = codes(T, K, 3), codes(T, V, 4)
    # [sem + len(tgt_dict) + 5, </s>, vq + 5]; the logits of the VQ part
    tokens = torch.cat([sem + V + 2 * NSPECIAL, torch.full((3, 1), EOS), vq[:, :-1] + NSPECIAL], dim=1)
    official = fairseq_logits(weights, tokens, sep=True)[:, T:]
    prefix = torch.cat([sem, torch.full((3, 1), K)], dim=1)
    with torch.no_grad():
        close(model(prefix, vq[:, :-1]), official[..., NSPECIAL:])
    out = model.generate(prefix, top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, T) and out.max() < V


def test_stage2_nar_gives_fairseqs_logits(tmp_path):
    path, weights = stage2_checkpoint(tmp_path / "checkpoint_last.pt", "nar", seed=3)
    model, meta = convert(path, "stage2", tmp_path / "stage2", decoder="nar")
    assert meta["decoder"] == "nar" and not model.cfg.causal
    sem, vq = codes(T, K, 5), codes(T, V, 6)
    masked = torch.rand(3, T, generator=torch.Generator().manual_seed(7)) < 0.5
    # official: masked targets are <unk>, attention is bidirectional; digit: the mask token is id V
    tokens = torch.cat([sem + V + 2 * NSPECIAL, torch.full((3, 1), EOS), (vq + NSPECIAL).masked_fill(masked, UNK)], 1)
    official = fairseq_logits(weights, tokens, causal=False, sep=True)[:, T + 1:]
    prefix = torch.cat([sem, torch.full((3, 1), K)], dim=1)
    with torch.no_grad():
        close(model(prefix, vq.masked_fill(masked, model.mask_token)), official[..., NSPECIAL:])
    out = generate_masked(model, prefix, steps=4, choice_temperature=4.5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, T) and out.max() < V


def test_converted_stages_sample_together(tmp_path):
    """The records are those sampling reads from trained stages: check_chain and generate_tokens run."""
    path1, _ = stage1_checkpoint(tmp_path / "s1.pt", conditional=True)
    stage1, meta1 = convert(path1, "stage1", tmp_path / "stage1", num_classes=CLASSES)
    stage2, meta2 = convert(stage2_checkpoint(tmp_path / "s2.pt", "ar")[0], "stage2", tmp_path / "stage2", decoder="ar")
    check_chain(meta1, meta2, {"grid": GRID, "image_size": 64}, "vq-sha", 64)
    sc = {"temperature": 1.0, "top_k": 4, "top_p": 1.0, "cfg_scale": 1.0, "stage2_top_p": 0.8}
    sem, vq = generate_tokens(stage1, stage2, torch.tensor([1, 2]), sc, meta1["null_class"], meta2["sep_token"],
                              torch.Generator().manual_seed(0), (meta1["training"]["precision"], "fp32"))
    assert sem.shape == vq.shape == (2, T) and sem.max() < K and vq.max() < V


# --- reading ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_reading_gives_settings_and_never_rebuilds_fairseq_classes(tmp_path, zipped):
    path, weights = stage1_checkpoint(tmp_path / "c.pt", conditional=False, _use_new_zipfile_serialization=zipped)
    AverageMeter.rebuilt = 0
    state, cfg = read_fairseq_checkpoint(path)
    assert AverageMeter.rebuilt == 0  # extra_state's meter became an inert stand-in
    assert cfg["arch"] == "stlm" and cfg["decoder_layers"] == LAYERS and cfg["target_vocab_size"] == K
    assert "decoder_input_dim" not in cfg  # an unresolved interpolation says nothing
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    torch.testing.assert_close(released_centroids(state), weights["centroids"].T)


def test_omegaconf_dictconfig_is_read(tmp_path):
    """Checkpoints of fairseq main from 2020-10 to 2021-03 pickle the cfg as an omegaconf DictConfig."""
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"task": {"_name": "image_generation_stage1", "target_vocab_size": K},
                                      "model": model_settings("stlm", False, class_conditional=False)})
    path = save_checkpoint(tmp_path / "c.pt", decoder_state(0, K + NSPECIAL, K + NSPECIAL, prenorm=False), cfg=cfg)
    state, settings = read_fairseq_checkpoint(path)
    assert settings["arch"] == "stlm" and settings["decoder_attention_heads"] == HEADS
    assert settings["decoder_normalize_before"] is False and "decoder_input_dim" not in settings
    gpt_cfg, _ = convert_stage1(state, settings, None, K, dict(seq_len=T), source=path)
    assert (gpt_cfg.n_head, gpt_cfg.arch) == (HEADS, "fairseq_postln")


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvaluatesCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload, name", [(RunsCommand, "posix.system"), (EvaluatesCode, "builtins.eval")])
@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, name, zipped):
    marker = tmp_path / "pwned"
    path = save_checkpoint(tmp_path / "evil.pt", decoder_state(0, K + NSPECIAL, K + NSPECIAL, prenorm=False),
                           cfg={"model": {"_name": "stlm", "note": payload(marker)}},
                           _use_new_zipfile_serialization=zipped)
    with pytest.raises(ValueError, match="not unpickled for safety") as error:
        read_fairseq_checkpoint(path)
    assert str(path) in str(error.value) and name in str(error.value)
    assert not marker.exists()


# --- refusals --------------------------------------------------------------------------------------

def edited_stage1(tmp_path, edit) -> tuple:
    """A stage-1 checkpoint after edit(model state dict, model settings) -> (path, state, settings)."""
    path, _ = stage1_checkpoint(tmp_path / "edited.pt", conditional=False, edit=edit)
    return path, *read_fairseq_checkpoint(path)


@pytest.mark.parametrize("edit, named", [
    (lambda m, s: m.pop("decoder.layers.1.fc2.bias"), "decoder.layers.1.fc2.bias"),
    (lambda m, s: m.update({"decoder.layernorm_embedding.weight": torch.ones(D)}),
     "decoder.layernorm_embedding.weight"),
    (lambda m, s: m.update({"decoder.layers.1.self_attn.k_proj.weight": torch.ones(D, D + 1)}),
     "decoder.layers.1.self_attn.k_proj.weight"),
    (lambda m, s: m.update({"decoder.output_projection.weight": torch.ones(K + 4, D)}),
     "decoder.output_projection.weight"),
    (lambda m, s: m.update({"decoder.embed_positions.weight": torch.ones(T, D)}), "decoder.embed_positions.weight"),
    (lambda m, s: m.update({"centroids": torch.ones(8, K + 1)}), "centroids"),
], ids=["missing", "unused", "misshapen", "output rows", "too few positions", "other K"])
def test_bad_keys_are_refused_by_name(tmp_path, edit, named):
    path, state, cfg = edited_stage1(tmp_path, edit)
    with pytest.raises(ValueError, match=re.escape(named)) as error:
        convert_stage1(state, cfg, None, K, dict(seq_len=T, **SHAPE), source=path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("edit, expected, words", [
    (lambda m, s: s.update(decoder_layers=3), {}, ["decoder_layers = 3", "n_layer = 2"]),
    (lambda m, s: s.update(decoder_attention_heads=4), {}, ["expected n_head = 2", "n_head = 4"]),
    (None, {"n_layer": 16}, ["expected n_layer = 16", "checkpoint's n_layer = 2"]),
    (None, {"arch": "fairseq_prenorm"}, ["'fairseq_prenorm'", "'fairseq_postln'"]),
    (lambda m, s: s.update(class_conditional=True), {}, ["class_conditional = True", "False"]),
    (lambda m, s: s.update(_name="st2vtlm"), {}, ["'st2vtlm'", "'stlm'"]),
    (lambda m, s: s.update(activation_fn="relu"), {}, ["activation_fn = 'relu'", "'gelu'"]),
], ids=["layers", "heads", "expected layers", "expected arch", "conditional", "model name", "activation"])
def test_config_disagreements_name_both_sides(tmp_path, edit, expected, words):
    path, state, cfg = edited_stage1(tmp_path, edit)
    with pytest.raises(ValueError) as error:
        convert_stage1(state, cfg, None, K, {"seq_len": T, **SHAPE, **expected}, source=path)
    assert str(path) in str(error.value) and all(word in str(error.value) for word in words), str(error.value)


def test_a_nar_checkpoint_is_not_converted_as_ar(tmp_path):
    path, _ = stage2_checkpoint(tmp_path / "nar.pt", "nar")
    state, cfg = read_fairseq_checkpoint(path)
    with pytest.raises(ValueError, match="st2vtlm_nar"):
        convert_stage2(state, cfg, K, "ar", dict(seq_len=T, prefix_len=T + 1), source=path)


def test_lengths_the_checkpoint_lacks_must_be_given(tmp_path):
    path, _ = stage2_checkpoint(tmp_path / "ar.pt", "ar")
    state, cfg = read_fairseq_checkpoint(path)
    with pytest.raises(ValueError, match="prefix_len"):
        convert_stage2(state, cfg, K, "ar", dict(seq_len=T), source=path)


# --- the pipeline's import stages ------------------------------------------------------------------

@pytest.fixture
def released_config(tiny_config, monkeypatch, tmp_path):
    """tiny_config with released centroids and checkpoints of this file's tiny shape (a preset of its own),
    a codebook of K centroids on a GRID of 48-d features, and a VQ model directory with V codes on GRID."""
    monkeypatch.setitem(PRESETS, "released-test", SHAPE)
    tiny_config["kmeans"].update(weights="file", weights_file=str(tmp_path / "km.npy"), k=K)
    tiny_config["vq"]["codebook_size"] = V
    tiny_config["stage1"].update(class_conditional=False, class_dropout=0.0)
    for stage, arch in (("stage1", "fairseq_postln"), ("stage2", "fairseq_prenorm")):
        tiny_config[stage].update(weights="file", weights_file=str(tmp_path / f"{stage}.pt"), preset="released-test",
                                  arch=arch)
    (tmp_path / "codebook").mkdir()
    np.save(tmp_path / "codebook" / "codebook.npy", np.ones((K, 48), np.float32))
    (tmp_path / "codebook" / "codebook.json").write_text(json.dumps(
        {"k": K, "encoder": {"grid": GRID}, "codebook_sha256": sha256_file(tmp_path / "codebook" / "codebook.npy")}))
    (tmp_path / "vq").mkdir()
    (tmp_path / "vq" / "model.safetensors").write_bytes(b"the VQ model's weights")
    (tmp_path / "vq" / "model.json").write_text(json.dumps({"grid": GRID}))
    return tiny_config


def test_the_import_stages_write_stages_that_sample_together(released_config, manifest, tmp_path):
    """import-stage1 and import-stage2 as the workflow runs them: bound to the codebook and the VQ model,
    with provenance, a training log without rows, and the official logits."""
    _, weights1 = stage1_checkpoint(tmp_path / "stage1.pt", conditional=False)
    _, weights2 = stage2_checkpoint(tmp_path / "stage2.pt", "ar")
    run_import_stage1(released_config, tmp_path / "stage1.pt", manifest, tmp_path / "codebook", tmp_path / "s1")
    run_import_stage2(released_config, tmp_path / "stage2.pt", tmp_path / "codebook", tmp_path / "vq", tmp_path / "s2")
    (stage1, meta1), (stage2, meta2) = load_stage(tmp_path / "s1", "cpu"), load_stage(tmp_path / "s2", "cpu")
    codebook_sha = sha256_file(tmp_path / "codebook" / "codebook.npy")
    assert meta1["codebook_sha256"] == meta2["codebook_sha256"] == codebook_sha
    assert meta2["vq_sha256"] == sha256_file(tmp_path / "vq" / "model.safetensors")
    assert meta1["classes"] == load_manifest(manifest)["classes"] and not meta1["class_conditional"]
    assert meta1["provenance"]["stage"] == "import_stage1" and meta2["provenance"]["stage"] == "import_stage2"
    assert meta1["provenance"]["inputs"]["checkpoint"] == sha256_file(tmp_path / "stage1.pt")
    for stage in ("s1", "s2"):
        assert (tmp_path / stage / "log.tsv").read_text() == LOG_HEADER  # nothing trained: no curve
    check_chain(meta1, meta2, {"grid": GRID, "image_size": 32}, meta2["vq_sha256"], 32)
    tokens = codes(T - 1, K, 3) + NSPECIAL
    with torch.no_grad():
        close(stage1(torch.zeros(3, 1, dtype=torch.long), tokens[:, :T - 1] - NSPECIAL)[:, :, :],
              fairseq_logits(weights1, torch.cat([torch.full((3, 1), EOS), tokens], 1))[:, :, NSPECIAL:])


def test_an_import_stage_names_a_missing_checkpoint_and_a_shape_the_config_does_not_describe(
        released_config, manifest, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config key 'stage1.weights_file': no such file .*stage1.pt"):
        run_import_stage1(released_config, tmp_path / "stage1.pt", manifest, tmp_path / "codebook", tmp_path / "s1")
    stage1_checkpoint(tmp_path / "stage1.pt", conditional=False)
    released_config["stage1"]["preset"] = "tiny"  # 4 layers of 128: not the checkpoint's
    with pytest.raises(ValueError, match="stage1.pt"):
        run_import_stage1(released_config, tmp_path / "stage1.pt", manifest, tmp_path / "codebook", tmp_path / "s1")
    stage2_checkpoint(tmp_path / "stage2.pt", "nar")
    with pytest.raises(ValueError, match="stage2.pt"):  # stage2.decoder is ar: a MaskGIT checkpoint is refused
        run_import_stage2(released_config, tmp_path / "stage2.pt", tmp_path / "codebook", tmp_path / "vq",
                          tmp_path / "s2")
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()
