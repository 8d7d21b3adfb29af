"""DiGIT's released fairseq checkpoints (checkpoint_last.pt) as digit stage directories.

Reading. A fairseq checkpoint is a pickle: {"model": state dict, "cfg": config, "args": argparse
Namespace or None, "optimizer_history", "extra_state", "last_optimizer_state", ...}. It is read with
torch.load(weights_only=True) and nothing is ever unpickled with weights_only=False. The few classes a
fairseq checkpoint pickles besides tensors (configs: omegaconf containers and fairseq/DiGIT dataclasses,
enums; meters in extra_state; numpy scalars) are allowed only as inert stand-ins that keep their state
and run nothing; argparse.Namespace is allowed as itself. Any other global (os.system, builtins.eval, ...)
is refused before unpickling starts. The config becomes a flat dict of settings: the "task" and "model"
sections of a hydra cfg (fairseq from 2020-10, 3b27ed79; pickled as an omegaconf DictConfig until
f6d60e2f, 2021-03, made it a plain dict with OmegaConf.to_container), or the legacy args.

Facts, and where they come from (DiGIT = DAMO-NLP-SG/DiGIT at cd6d8ca; fairseq = v0.12.2):
- Dictionary: fairseq's Dictionary(extra_special_symbols=["<n>"]) then K symbols
  (image_generation_stage1/task.py, image_generation_stage2/task.py): <s>=0, <pad>=1, </s>=2, <unk>=3,
  <n>=4; token id = code + 5 (prepare_semantic / add_eos_shift: `+ nspecial`).
- Decoder keys (fairseq models/transformer/transformer_decoder.py, modules/transformer_layer.py,
  modules/multihead_attention.py): decoder.embed_tokens.weight, decoder.embed_positions.weight,
  decoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}, .self_attn_layer_norm, .fc1, .fc2,
  .final_layer_norm, decoder.layer_norm only with decoder_normalize_before, decoder.output_projection.weight
  (len(dictionary) rows, no bias), and the buffer decoder.version. q is scaled by head_dim^-0.5 after its
  bias, which is what scaled_dot_product_attention does.
- Positions (fairseq modules/positional_embedding.py, learned_positional_embedding.py, utils.make_positions):
  LearnedPositionalEmbedding with padding_idx 1 has max_positions + 2 rows and the i-th token (from 0)
  reads row 2 + i (no DiGIT input is ever <pad>).
- Stage 1, `stlm` (image_generation_stage1/model.py): input [</s>, t1..tT]; one table of len(dict) rows,
  len(dict) + 1000 with class_conditional, where the class token class_id + len(dict) replaces </s>.
  The VQ-token baseline `st2vtlm_vq` (image_generation_stage2/model_vq.py) has the same layout.
- Stage 2, `st2vtlm` (image_generation_stage2/model.py) and `st2vtlm_nar` (model_nar.py): one table of
  len(tgt_dict) + len(src_dict) rows, VQ rows first; a sem token is code + 5 + len(tgt_dict); the input is
  [sem x T_sem, </s>, vq...]. TransformerDecoder2pos reads the sem part's positions from
  decoder.embed_positions_1 and restarts at </s> with decoder.embed_positions, both from row 2. The NAR
  model masks targets with the target dictionary's <unk> (3) and attends bidirectionally
  (full_context_alignment=True).
- The models also hold frozen modules digit keeps elsewhere: pretrained_encoder.* (DINOv2), vqgan.*
  (stage 2, MAGE's VQGAN) and centroids [D, K] / centroid_norm [1, K] (the K-means codebook); these are
  not converted (the centroids' shape is checked against K; released_centroids returns them).

digit's layout (gpt.py) keeps only the rows it uses: the prefix table (the start token or the classes;
the K sem tokens then sep = </s>), the target table (the K or VQ codes; for MaskGIT the mask token <unk>
as row vocab_size), positions 2.. of each table, and the output rows 5.. of the codes. The dropped
output rows are the specials, which the official samplers never emit within the T tokens digit
generates: PrefixSequenceGenerator (image_generation_stage{1,2}/generator.py) sets <pad>, <unk>, <s> and
<n> to -inf and </s> too before --min-len 256; the NAR decoder sets all 5 to -inf (model_nar.py).
"""
from __future__ import annotations

import argparse
import pickle
import re
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import torch

from digit.generate.gpt import GPT, PRESETS, GPTConfig
from digit.generate.train import LOG_HEADER
from digit.runtime.images import load_manifest
from digit.runtime.io import atomic_dir, read_json, save_safetensors, sha256_file, write_json
from digit.stages import provenance

NSPECIAL = 5       # <s>, <pad>, </s>, <unk>, <n>
EOS, UNK = 2, 3    # </s>: stage 1's start token and stage 2's separator; <unk>: the NAR mask token
FIRST_POSITION = 2  # LearnedPositionalEmbedding's row of the first token (padding_idx 1 + 1)
STAGE1_MODELS = ("stlm", "st2vtlm_vq")
STAGE2_MODELS = {"ar": "st2vtlm", "nar": "st2vtlm_nar"}
# model keys that are not converted: the frozen encoder and VQGAN, fairseq's version buffer and the
# sinusoidal positions' dummy buffer
IGNORED = re.compile(r"(pretrained_encoder|vqgan)\..*|decoder\.version|.*\._float_tensor")

# --- reading ---------------------------------------------------------------------------------------

# Globals a fairseq checkpoint may pickle; each gets an inert stand-in (never the real class)
STAND_IN_MODULES = ("fairseq.", "fairseq_user.", "omegaconf.")  # configs, dataclasses, enums, meters
STAND_IN_NAMES = {"typing.Any", "builtins.dict", "builtins.list", "builtins.tuple", "builtins.int",
                  "builtins.float", "builtins.str", "builtins.bool", "builtins.object",  # omegaconf type tags
                  "numpy.dtype", "numpy.ndarray", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
                  "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}  # meter values
# dict subclasses: their items come by SETITEMS, which weights_only gives to plain dicts only
DICT_NAMES = {"collections.defaultdict", "fairseq.logging.meters.MetersDict"}
# what a pre-zip checkpoint (torch < 1.6, fairseq <= 0.9), whose globals cannot be listed first, may hold
LEGACY_NAMES = {"argparse.Namespace", *DICT_NAMES, *STAND_IN_NAMES,
                *(f"{module}.{meter}" for module in ("fairseq.meters", "fairseq.logging.meters")
                  for meter in ("AverageMeter", "SumMeter", "TimeMeter", "StopwatchMeter"))}


class StandIn:
    """A class pickled in a fairseq checkpoint, kept inert: it stores what the pickle hands it."""
    args: tuple = ()
    state = None

    def __init__(self, *args, **kwargs):  # called for REDUCE, e.g. an enum member Enum(value)
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _as_dict(*args) -> OrderedDict:
    return OrderedDict()


def _allowed(name: str):
    if name == "argparse.Namespace":
        return argparse.Namespace
    if name in DICT_NAMES:
        return _as_dict
    if name in STAND_IN_NAMES or name.startswith(STAND_IN_MODULES):
        return type(name.rsplit(".", 1)[-1], (StandIn,), {"pickled_name": name})
    return None


def _refuse(path: Path, names) -> ValueError:
    return ValueError(f"{path} holds {', '.join(names)}: not a fairseq checkpoint's config or meter class; "
                      "not unpickled for safety")


def read_fairseq_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """-> (the model's state dict, the flat settings of its cfg/args: decoder_embed_dim, class_conditional,
    target_vocab_size, arch = the registered model name, ...)."""
    path = Path(path)
    try:  # the globals of a zip checkpoint (torch >= 1.6), listed without unpickling it
        names, zipped = torch.serialization.get_unsafe_globals_in_checkpoint(path), True
    except (ValueError, pickle.UnpicklingError):  # an older format: torch.load refuses what is not listed
        names, zipped = sorted(LEGACY_NAMES), False
    refused = sorted(name for name in names if _allowed(name) is None)
    if refused:
        raise _refuse(path, refused)
    with torch.serialization.safe_globals([(_allowed(name), name) for name in names]):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
        except pickle.UnpicklingError as error:
            found = re.search(r"GLOBAL (\S+)", str(error))
            if found is None:
                raise ValueError(f"{path} cannot be read safely: {str(error).splitlines()[0]}") from error
            name = found[1] if "." in found[1] else f"builtins.{found[1]}"  # torch drops `builtins.`
            raise _refuse(path, [name]) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise ValueError(f"{path} is not a fairseq checkpoint: it has no 'model' state dict")
    cfg = _plain(checkpoint.get("cfg"))
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):  # hydra: task and model sections
        settings = {**(cfg.get("task") or {}), **cfg["model"], "arch": cfg["model"].get("_name")}
    else:  # legacy: one flat namespace, whose `arch` is the model name
        settings = _plain(checkpoint.get("args")) or {}
    # an unresolved omegaconf interpolation (${...}) says nothing
    return checkpoint["model"], {k: v for k, v in settings.items() if not (isinstance(v, str) and "${" in v)}


def _plain(x):
    """Stand-ins (omegaconf containers and nodes, enums), Namespaces and containers -> plain values."""
    if isinstance(x, StandIn):
        state = x.state if isinstance(x.state, dict) else {}
        if "_content" in state:  # omegaconf DictConfig / ListConfig
            return _plain(state["_content"])
        if "_val" in state:  # an omegaconf value node
            return _plain(state["_val"])
        return _plain(x.args[0]) if x.args else {k: _plain(v) for k, v in state.items()}  # an enum: its value
    if isinstance(x, argparse.Namespace):
        x = vars(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def released_centroids(state: dict) -> torch.Tensor | None:
    """The K-means codebook the model tokenised with, [K, D] (to compare with kmeans.weights_file)."""
    return state["centroids"].float().t().contiguous() if "centroids" in state else None


# --- conversion ------------------------------------------------------------------------------------

class _Keys:
    """The checkpoint's tensors; each is to be taken exactly once, with its shape checked."""

    def __init__(self, state: dict, source):
        self.state, self.source = state, source
        self.left = {key for key in state if not IGNORED.fullmatch(key)}

    def shape(self, key: str) -> tuple:
        if key not in self.state:
            raise ValueError(f"{self.source}: missing model key {key}")
        return tuple(self.state[key].shape)

    def take(self, key: str, shape: tuple) -> torch.Tensor:
        """The tensor `key`, as float32; `shape` may hold None for any size."""
        found = self.shape(key)
        if len(found) != len(shape) or any(want is not None and n != want for n, want in zip(found, shape)):
            want = tuple("*" if n is None else n for n in shape)
            raise ValueError(f"{self.source}: {key} has shape {found}, expected {want}")
        self.left.remove(key)
        return self.state[key].float()

    def rows(self, key: str, d: int, first: int, count: int) -> torch.Tensor:
        """Rows first..first+count-1 of the position table `key`."""
        table = self.take(key, (None, d))
        if len(table) < first + count:
            raise ValueError(f"{self.source}: {key} has {len(table)} positions; the sequence needs {first + count}")
        return table[first: first + count]

    def finish(self) -> None:
        if self.left:
            raise ValueError(f"{self.source}: unused model keys {', '.join(sorted(self.left))}: not part of the "
                             "network digit converts (another fairseq option or model?)")


def _backbone(keys: _Keys, cfg: dict, expected: dict, source) -> tuple[dict, dict]:
    """The decoder's shape (GPTConfig fields) from its tensors and config, and its blocks in digit's names."""
    d = keys.shape("decoder.embed_tokens.weight")[1]
    n_layer = 1 + max((int(m[1]) for key in keys.state if (m := re.match(r"decoder\.layers\.(\d+)\.", key))),
                      default=-1)
    n_ffn = keys.shape("decoder.layers.0.fc1.weight")[0] if n_layer else 0
    prenorm = cfg.get("decoder_normalize_before", "decoder.layer_norm.weight" in keys.state)
    found = {"n_embd": d, "n_layer": n_layer, "n_ffn": n_ffn,
             "arch": "fairseq_prenorm" if prenorm else "fairseq_postln"}
    for field, setting in [("n_embd", "decoder_embed_dim"), ("n_layer", "decoder_layers"),
                           ("n_ffn", "decoder_ffn_embed_dim")]:
        _agree(source, f"its config's {setting}", cfg.get(setting), f"its tensors' {field}", found[field])
    for setting, value in [("activation_fn", "gelu"), ("no_scale_embedding", False), ("decoder_learned_pos", True)]:
        _agree(source, f"its config's {setting}", cfg.get(setting), "digit's fairseq network", value)
    found["n_head"] = cfg.get("decoder_attention_heads", expected.get("n_head"))
    if found["n_head"] is None:
        raise ValueError(f"{source}: its config does not give decoder_attention_heads; pass n_head")

    blocks = {}
    for i in range(n_layer):
        def take(name, *shape):
            return keys.take(f"decoder.layers.{i}.{name}", shape)

        q, k, v = (take(f"self_attn.{p}_proj.weight", d, d) for p in "qkv")
        qb, kb, vb = (take(f"self_attn.{p}_proj.bias", d) for p in "qkv")
        block = {  # digit's fused qkv is fairseq's q, k and v stacked
            "ln_1.weight": take("self_attn_layer_norm.weight", d), "ln_1.bias": take("self_attn_layer_norm.bias", d),
            "attn.qkv.weight": torch.cat([q, k, v]), "attn.qkv.bias": torch.cat([qb, kb, vb]),
            "attn.proj.weight": take("self_attn.out_proj.weight", d, d),
            "attn.proj.bias": take("self_attn.out_proj.bias", d),
            "ln_2.weight": take("final_layer_norm.weight", d), "ln_2.bias": take("final_layer_norm.bias", d),
            "mlp.fc.weight": take("fc1.weight", n_ffn, d), "mlp.fc.bias": take("fc1.bias", n_ffn),
            "mlp.proj.weight": take("fc2.weight", d, n_ffn), "mlp.proj.bias": take("fc2.bias", d),
        }
        blocks |= {f"blocks.{i}.{name}": tensor for name, tensor in block.items()}
    if prenorm:
        blocks |= {"ln_f.weight": keys.take("decoder.layer_norm.weight", (d,)),
                   "ln_f.bias": keys.take("decoder.layer_norm.bias", (d,))}
    return found, blocks


def _agree(source, what, value, other, wanted) -> None:
    """An error naming both sides where `what` (None: not known) disagrees with `other`."""
    if value is not None and value != wanted:
        raise ValueError(f"{source}: {what} = {value!r}, but {other} = {wanted!r}")


def _finish(keys: _Keys, found: dict, expected: dict, tensors: dict) -> tuple[GPTConfig, dict]:
    """Check the model against digit's expected fields and its own keys and shapes -> (GPTConfig, state)."""
    for field, value in expected.items():
        _agree(keys.source, f"digit's expected {field}", value, f"the checkpoint's {field}", found.get(field))
    gpt_cfg = GPTConfig(**found)
    with torch.device("meta"):  # digit's keys and shapes, without allocating the model
        want = {key: tuple(t.shape) for key, t in GPT(gpt_cfg).state_dict().items()}
    made = {key: tuple(t.shape) for key, t in tensors.items()}
    for key in sorted(want.keys() | made.keys()):
        if want.get(key) != made.get(key):  # a slip of this converter, not of the checkpoint
            raise ValueError(f"{keys.source}: converted {key} is {made.get(key, 'missing')}, "
                             f"digit's GPT has {want.get(key, 'no such key')}")
    keys.finish()
    # own, contiguous float32 copies: no view of the checkpoint's (possibly fp16, memory-mapped) tables
    return gpt_cfg, {key: t.to(torch.float32, copy=True).contiguous() for key, t in tensors.items()}


def _required(expected: dict, fields: tuple, source) -> None:
    missing = [field for field in fields if field not in expected]
    if missing:
        raise ValueError(f"{source}: the checkpoint does not give {', '.join(missing)}; pass it in `expected`")


def _model_name(cfg: dict, names, source) -> None:
    if cfg.get("arch") is not None and cfg["arch"] not in names:
        raise ValueError(f"{source} holds a {cfg['arch']!r} model, expected {' or '.join(map(repr, names))}")


def _centroids(keys: _Keys, k: int) -> None:
    if "centroids" in keys.state:
        keys.take("centroids", (None, k))
    if "centroid_norm" in keys.state:
        keys.take("centroid_norm", (1, k))


def convert_stage1(state: dict, cfg: dict, num_classes: int | None, k: int, expected: dict,
                   source="the checkpoint") -> tuple[GPTConfig, dict]:
    """DiGIT's stage-1 `stlm` (or the VQ-token baseline `st2vtlm_vq`) -> digit's stage-1 GPT.

    num_classes: None for the unconditional model, else the class rows appended to its table (1000).
    k: the codes (K-means clusters, or VQ codes for the baseline). expected: digit's GPTConfig fields
    (preset, arch); it must give seq_len, the tokens per image, which the checkpoint does not hold."""
    _required(expected, ("seq_len",), source)
    _model_name(cfg, STAGE1_MODELS, source)
    _agree(source, "its config's class_conditional", cfg.get("class_conditional"),
           "the conversion's", num_classes is not None)
    _agree(source, "its config's target_vocab_size", cfg.get("target_vocab_size"), "K", k)
    keys, T = _Keys(state, source), expected["seq_len"]
    found, tensors = _backbone(keys, cfg, expected, source)
    d, n = found["n_embd"], k + NSPECIAL  # n: len(dictionary)
    table = keys.take("decoder.embed_tokens.weight", (n + (num_classes or 0), d))
    positions = keys.rows("decoder.embed_positions.weight", d, FIRST_POSITION, T)  # [start/class, t1..t_{T-1}]
    tensors |= {
        "prefix_emb.weight": table[EOS: EOS + 1] if num_classes is None else table[n:],
        "prefix_pos.weight": positions[:1],
        "tok_emb.weight": table[NSPECIAL:n],
        "tok_pos.weight": positions[1:],
        "head.weight": keys.take("decoder.output_projection.weight", (n, d))[NSPECIAL:],
    }
    _centroids(keys, k)
    found |= dict(vocab_size=k, seq_len=T, prefix_vocab_size=num_classes or 1, prefix_len=1, causal=True)
    return _finish(keys, found, expected, tensors)


def convert_stage2(state: dict, cfg: dict, k: int, decoder: str, expected: dict,
                   source="the checkpoint") -> tuple[GPTConfig, dict]:
    """DiGIT's stage-2 `st2vtlm` (decoder "ar") or `st2vtlm_nar` ("nar", MaskGIT) -> digit's stage-2 GPT:
    prefix [sem x T_sem, sep] over K sem tokens + sep (id K), targets the VQ codes (their number is read
    from the output layer). expected must give seq_len (VQ tokens) and prefix_len (T_sem + 1)."""
    if decoder not in STAGE2_MODELS:
        raise ValueError(f"decoder {decoder!r}: expected ar or nar")
    _required(expected, ("seq_len", "prefix_len"), source)
    _model_name(cfg, (STAGE2_MODELS[decoder],), source)
    _agree(source, "its config's source_vocab_size", cfg.get("source_vocab_size"), "K", k)
    keys, T, T_sem = _Keys(state, source), expected["seq_len"], expected["prefix_len"] - 1
    found, tensors = _backbone(keys, cfg, expected, source)
    d = found["n_embd"]
    n_tgt = keys.shape("decoder.output_projection.weight")[0]  # len(tgt_dict) = VQ codes + 5
    vocab = n_tgt - NSPECIAL
    _agree(source, "its config's target_vocab_size", cfg.get("target_vocab_size"), "its output layer's", vocab)
    table = keys.take("decoder.embed_tokens.weight", (n_tgt + k + NSPECIAL, d))  # tgt dict rows, then src dict rows
    sem = table[n_tgt + NSPECIAL:]
    masked = decoder == "nar"
    sem_positions = keys.rows("decoder.embed_positions_1.weight", d, FIRST_POSITION, T_sem)
    # the second table starts at </s>: [sep, vq_1..] (AR: up to vq_{T-1}; NAR: all T)
    positions = keys.rows("decoder.embed_positions.weight", d, FIRST_POSITION, T + masked)
    tensors |= {
        "prefix_emb.weight": torch.cat([sem, table[EOS: EOS + 1]]),
        "prefix_pos.weight": torch.cat([sem_positions, positions[:1]]),
        "tok_emb.weight": torch.cat([table[NSPECIAL:n_tgt]] + [table[UNK: UNK + 1]] * masked),  # + mask token
        "tok_pos.weight": positions[1:],
        "head.weight": keys.take("decoder.output_projection.weight", (n_tgt, d))[NSPECIAL:],
    }
    _centroids(keys, k)
    found |= dict(vocab_size=vocab, seq_len=T, prefix_vocab_size=k + 1, prefix_len=T_sem + 1, causal=not masked)
    return _finish(keys, found, expected, tensors)


# --- writing ---------------------------------------------------------------------------------------

def stage1_record(gpt_cfg: GPTConfig, class_conditional: bool, classes: list, grid: list, tokens: str,
                  code_sha256: str, precision: str = "fp32") -> dict:
    """The model.json fields a trained stage 1 has (run_train_ar) that sampling and the probe read;
    code_sha256 is the codebook's (tokens: discriminative) or the VQ model's (tokens: vq); precision is
    the autocast sampling uses (fp32: the converted weights as they are). The caller may add its
    provenance."""
    if class_conditional and gpt_cfg.prefix_vocab_size != len(classes):
        raise ValueError(f"the model has {gpt_cfg.prefix_vocab_size} class rows, the data {len(classes)} classes")
    if grid[0] * grid[1] != gpt_cfg.seq_len:
        raise ValueError(f"grid {grid} does not hold the model's {gpt_cfg.seq_len} tokens")
    return {"stage": "stage1", "class_conditional": class_conditional, "null_class": None,  # no CFG in DiGIT
            "num_classes": len(classes), "classes": classes, "vocab_size": gpt_cfg.vocab_size,
            "seq_len": gpt_cfg.seq_len, "grid": grid, "tokens": tokens,
            "codebook_sha256" if tokens == "discriminative" else "vq_sha256": code_sha256,
            "training": {"precision": precision}}


def stage2_record(gpt_cfg: GPTConfig, sem_grid: list, vq_grid: list, codebook_sha256: str, vq_sha256: str,
                  precision: str = "fp32") -> dict:
    """The model.json fields a trained stage 2 has (run_train_decoder) that sampling reads."""
    for name, grid, n in [("sem_grid", sem_grid, gpt_cfg.prefix_len - 1), ("vq_grid", vq_grid, gpt_cfg.seq_len)]:
        if grid[0] * grid[1] != n:
            raise ValueError(f"{name} {grid} does not hold the model's {n} tokens")
    sep = gpt_cfg.prefix_vocab_size - 1
    return {"stage": "stage2", "decoder": "ar" if gpt_cfg.causal else "nar", "sep_token": sep,
            "sem_vocab_size": sep, "sem_seq_len": gpt_cfg.prefix_len - 1, "sem_grid": sem_grid,
            "vq_vocab_size": gpt_cfg.vocab_size, "vq_seq_len": gpt_cfg.seq_len, "vq_grid": vq_grid,
            "codebook_sha256": codebook_sha256, "vq_sha256": vq_sha256, "training": {"precision": precision}}


def write_stage(out_dir: str | Path, gpt_cfg: GPTConfig, state_dict: dict, record: dict,
                source: str | Path) -> None:
    """A stage directory as training writes it and load_stage reads it: model.safetensors, model.json
    ({**record, "model": the GPTConfig fields, "released": the checkpoint's file name and sha256}) and
    a training log without rows (nothing was trained here, as for a pretrained VQ model)."""
    source = Path(source)
    with atomic_dir(out_dir) as tmp:
        save_safetensors(state_dict, tmp / "model.safetensors")
        (tmp / "log.tsv").write_text(LOG_HEADER)
        write_json(tmp / "model.json", {**record, "model": asdict(gpt_cfg),
                                        "released": {"file": source.name, "sha256": sha256_file(source)}})


# --- the pipeline's stages (import-stage1, import-stage2) ---------------------------------------------

def _codebook(codebook_dir: str | Path) -> dict:
    """codebook.json of the codebook (K-means' or the released centroids'), its array checked against it."""
    info = read_json(Path(codebook_dir) / "codebook.json")
    if sha256_file(Path(codebook_dir) / "codebook.npy") != info["codebook_sha256"]:
        raise ValueError(f"{codebook_dir}/codebook.npy is not the codebook its codebook.json records; re-run its stage")
    return info


def _expected(tc: dict, **lengths) -> dict:
    """The GPTConfig fields the config says the checkpoint has: its preset, arch and sequence lengths."""
    return {**PRESETS[tc["preset"]], "arch": tc["arch"], **lengths}


def run_import_stage1(config: dict, checkpoint: str | Path, manifest_path: str | Path, codebook_dir: str | Path,
                      out_dir: str | Path) -> None:
    """DiGIT's released stage 1 (stage1.weights_file) as this pipeline's stage 1: its K against kmeans.k
    and the codebook, its classes against the data's, its shape against stage1.preset and stage1.arch."""
    tc, checkpoint = config["stage1"], Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"config key 'stage1.weights_file': no such file {checkpoint} (DiGIT's released "
                                "stage-1 checkpoint_last.pt: README, 'Released weights')")
    info = _codebook(codebook_dir)
    classes = load_manifest(manifest_path)["classes"]
    state, settings = read_fairseq_checkpoint(checkpoint)
    grid = info["encoder"]["grid"]
    gpt_cfg, tensors = convert_stage1(state, settings, len(classes) if tc["class_conditional"] else None,
                                      info["k"], _expected(tc, seq_len=grid[0] * grid[1]), source=checkpoint)
    record = stage1_record(gpt_cfg, tc["class_conditional"], classes, grid, "discriminative",
                           info["codebook_sha256"], tc["precision"])
    record["provenance"] = provenance(config, "import_stage1", {"checkpoint": checkpoint,
                                                               "codebook": Path(codebook_dir) / "codebook.npy"})
    write_stage(out_dir, gpt_cfg, tensors, record, checkpoint)
    print(f"import-stage1: {checkpoint} -> {out_dir} ({sum(t.numel() for t in tensors.values()) / 1e6:.1f}M "
          f"parameters, {'class-conditional' if tc['class_conditional'] else 'unconditional'})")


def run_import_stage2(config: dict, checkpoint: str | Path, codebook_dir: str | Path, vq_dir: str | Path,
                      out_dir: str | Path) -> None:
    """DiGIT's released stage 2 (stage2.weights_file; stage2.decoder ar: st2vtlm, nar: st2vtlm_nar) as this
    pipeline's stage 2, bound to the codebook and the VQ model whose tokens it reads and writes."""
    tc, checkpoint = config["stage2"], Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"config key 'stage2.weights_file': no such file {checkpoint} (DiGIT's released "
                                "stage-2 checkpoint_last.pt: README, 'Released weights')")
    info = _codebook(codebook_dir)
    vq_grid = read_json(Path(vq_dir) / "model.json")["grid"]
    sem_grid = info["encoder"]["grid"]
    state, settings = read_fairseq_checkpoint(checkpoint)
    expected = _expected(tc, seq_len=vq_grid[0] * vq_grid[1], prefix_len=sem_grid[0] * sem_grid[1] + 1)
    gpt_cfg, tensors = convert_stage2(state, settings, info["k"], tc["decoder"], expected, source=checkpoint)
    if gpt_cfg.vocab_size != config["vq"]["codebook_size"]:
        raise ValueError(f"{checkpoint} (stage2.weights_file) writes {gpt_cfg.vocab_size} VQ codes, vq.codebook_size "
                         f"is {config['vq']['codebook_size']}")
    vq_weights = Path(vq_dir) / "model.safetensors"
    record = stage2_record(gpt_cfg, sem_grid, vq_grid, info["codebook_sha256"], sha256_file(vq_weights),
                           tc["precision"])
    record["provenance"] = provenance(config, "import_stage2", {"checkpoint": checkpoint, "vq": vq_weights,
                                                               "codebook": Path(codebook_dir) / "codebook.npy"})
    write_stage(out_dir, gpt_cfg, tensors, record, checkpoint)
    print(f"import-stage2: {checkpoint} -> {out_dir} ({tc['decoder']} decoder, "
          f"{sum(t.numel() for t in tensors.values()) / 1e6:.1f}M parameters)")
