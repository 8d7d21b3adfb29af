"""Write config/paper/<row>.yaml: one experiment config per result row of the DiGIT paper (ImageNet 256),
and config/released-{base,large}.yaml: DiGIT's released weights, sampled and evaluated without training.

    python workflow/scripts/paper_configs.py           # rewrite every config/paper/*.yaml and config/released-*.yaml
    python workflow/scripts/paper_configs.py --check   # exit 1 if a committed file differs from what it writes

Each row is config/imagenet-base.yaml or config/imagenet-large.yaml (the shared ImageNet settings)
with the few keys of ROWS replaced in place: the base file's layout and comments are kept, and each
replaced line carries the source of its value (the official code, DAMO-NLP-SG/DiGIT at cd6d8ca, or
the paper's tables; /work/shared/reference/digit-official.md, sections in brackets). The config
system has no includes and every key is required, so the rows are whole files, generated, never
edited by hand (tests/test_paper_configs.py checks that they are what this script writes).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "config" / "paper"
COMMENT_COLUMN = 33  # the column of the base files' line comments


@dataclass(frozen=True)
class Row:
    base: str  # config/<base>.yaml
    paper: str  # the paper's row and its number, for the header
    overrides: tuple[tuple[str, object, str], ...]  # (dotted key, value, source)
    cfg: bool = False  # beyond the paper: classifier-free guidance
    released: bool = False  # DiGIT's released weights, sampled and evaluated: config/<row>.yaml, no training


# Every paper row: the official code has no classifier-free guidance, its class-conditional stage 1
# never drops the class (digit-official.md 1.4, 1.6; README footnote: only VAR uses CFG).
NO_DROPOUT = ("stage1.class_dropout", 0, "paper: no CFG, the class is never dropped (official stlm)")
UNCOND = ("stage1.class_conditional", False,
          "config/stage1/dino_base.yaml: unconditional (Table 3)")
COND = ("stage1.class_conditional", True,
        "config/stage1/dino_base_classcond.yaml: class_conditional: true (Table 4)")
EPOCHS_400 = ("stage1.steps", 250000, "400 epochs: 250k x 2048 / 1.28M images")
EPOCHS_200 = ("stage1.steps", 125000, "200 epochs: 125k x 2048 / 1.28M images (max_update 125000, 8 x 256)")
BATCH = ("stage1.batch_size", 2048, "256 per GPU x 8 GPUs (inferred: the paper's epochs at max_update 125k)")
TOPK_BASE = ("sample.top_k", 200, "infer_stage1_ar.sh --sampling-topk 200; README: topk=200 for base")
TOPK_COND = ("sample.top_k", 300, "infer_stage1_ar_classcond.sh --sampling-topk 300")
TOPK_LARGE = ("sample.top_k", 400, "README: topk=400 for the large model")
AR_TOP_P = ("sample.stage2_top_p", 0.8, "infer_stage2_ar.sh --sampling-topp 0.8")
# The NAR pixel decoder's own published settings (config/stage2/dino_base_nar.yaml, train_stage2_nar.sh).
NAR = (
    ("stage2.decoder", "nar", "st2vtlm_nar: MaskGIT-style, bidirectional (digit-official.md 1.5b)"),
    ("stage2.steps", 125000, "dino_base_nar.yaml max_update: 125000"),
    ("stage2.batch_size", 1024, "dino_base_nar.yaml 128 x update_freq 2, x 4 GPUs (train_stage2_nar.sh)"),
    ("stage2.lr", 0.0005, "dino_base_nar.yaml lr: 5e-4"),
    ("sample.stage2_top_p", 1.0, "unused by the MaskGIT decoder: it samples plainly (infer_stage2_nar.sh)"),
    ("sample.stage2_steps", 8, "infer_stage2_nar.sh --iter-decode-max-iter 8"),
    ("sample.stage2_choice_temperature", 4.5, "model_nar.py: Gumbel choice temperature 4.5 (1 - ratio)"),
)

ROWS: dict[str, Row] = {
    "uncond-219m-ar": Row("imagenet-base", "Table 3, class-unconditional, DiGIT (+VQGAN) 219M, 400 epochs: FID 9.13, IS 73.85",
                          (UNCOND, NO_DROPOUT, EPOCHS_400, BATCH, TOPK_BASE, AR_TOP_P)),
    "uncond-219m-maskgit": Row("imagenet-base",
                               "Table 3, class-unconditional, DiGIT (+MaskGIT) 219M, 200 epochs: FID 9.04, IS 75.04",
                               (UNCOND, NO_DROPOUT, EPOCHS_200, BATCH, TOPK_BASE, *NAR)),
    "uncond-732m-ar": Row("imagenet-large", "Table 3, class-unconditional, DiGIT (+VQGAN) 732M, 200 epochs: FID 4.59, IS 141.29",
                          (UNCOND, NO_DROPOUT, EPOCHS_200, BATCH, TOPK_LARGE, AR_TOP_P)),
    "cond-219m-ar": Row("imagenet-base",
                        "Table 4, class-conditional, DiGIT (+VQGAN) 219M, 400 epochs (README a51f765; the arXiv "
                        "table: 200): FID 4.79, IS 142.87",
                        (COND, NO_DROPOUT, ("stage1.steps", 250000, "README since a51f765: 400 epochs (arXiv table: 200)"),
                         BATCH, TOPK_COND, AR_TOP_P)),
    "cond-219m-maskgit": Row("imagenet-base",
                             "Table 4, class-conditional, DiGIT (+MaskGIT) 219M, 200 epochs: FID 4.62, IS 146.19",
                             (COND, NO_DROPOUT, EPOCHS_200, BATCH, TOPK_COND, *NAR)),
    "cond-732m-ar": Row("imagenet-large", "Table 4, class-conditional, DiGIT (+VQGAN) 732M, 200 epochs: FID 3.39, IS 205.96",
                        (COND, NO_DROPOUT, EPOCHS_200, BATCH, TOPK_LARGE, AR_TOP_P)),
    "uncond-219m-vq-tokens": Row(
        "imagenet-base",
        "Table 3 / ablation, class-unconditional, AR on VQGAN tokens (the VQ-token baseline), 200 epochs: FID 24.38, IS 30.93",
        (("stage1.tokens", "vq", "st2vtlm_vq (config/stage2/vq_base.yaml): a GPT on MAGE's VQGAN tokens, no stage 2"),
         UNCOND, NO_DROPOUT,
         ("stage1.arch", "fairseq_prenorm", "vq_base.yaml: decoder_normalize_before (the stage-2 family's pre-LN)"),
         ("stage1.steps", 125000, "vq_base.yaml max_update: 125000 (200 epochs at 2048)"),
         ("stage1.batch_size", 2048, "vq_base.yaml 256 per GPU; x 8 GPUs (inferred from Table 3's 200 epochs)"),
         ("stage1.lr", 0.0005, "vq_base.yaml lr: 5e-4"),
         ("sample.top_k", 0, "infer_stage_vq.sh --sampling-topp 300 keeps every token (probably meant top-k 300)"),
         ("sample.top_p", 1.0, "infer_stage_vq.sh: no top-k; its top-p 300 is no cut"))),
    "cond-219m-ar-cfg": Row(
        "imagenet-base",
        "NOT a paper row: cond-219m-ar with classifier-free guidance (the paper has none)",
        (COND, ("stage1.class_dropout", 0.1, "beyond the paper: trains the null class that CFG needs"),
         ("stage1.steps", 250000, "as cond-219m-ar"), BATCH, TOPK_COND, AR_TOP_P,
         ("sample.cfg_scale", 2.0, "beyond the paper: no published scale; sweep it")),
        cfg=True),
}


# The encoder ablation (Fig. 4a; digit-official.md 2): the same chain with the tokenizer of another self-supervised
# ViT, a 39M stage 1 (preset small), unconditional (as the ablation table), 100 epochs. The ablation's own code is
# not released: every encoder reads as DiGIT reads DINOv2 (get_intermediate_layers(n=3): the third-from-last block
# through the final LayerNorm, ImageNet mean/std), which its MAE, MoCo v3 and iBOT copies implement alike. The
# patch-16 ViTs read the 256 crop at 256 (a 16x16 grid: 256 tokens, as DINOv2's 14x14 patches at 224); K=8192.
ABLATION_STAGE1 = (
    UNCOND, NO_DROPOUT,
    ("stage1.preset", "small", "the paper's 39M GPT (shape unpublished; gpt.py PRESETS: 40.4M by its count)"),
    ("stage1.steps", 125000, "100 epochs: 125k x 1024 / 1.28M images (Fig. 4a: 100 epochs)"),
    ("stage1.batch_size", 1024, "train_stage1_ar.sh: 4 GPUs x 256"),
    TOPK_BASE,
)


def encoder_rows(family: str, arch: str, weights_file: str, source: str) -> tuple:
    return (("encoder.arch", arch, "timm's ViT-B/16 (patch 16)"),
            ("encoder.family", family, f"Fig. 4a: {source}"),
            ("encoder.weights_file", weights_file, "the official checkpoint (README: pretrained weights)"),
            ("encoder.overrides.img_size", 256, "256 px -> 16x16 patch grid (patch 16)"),
            ("encoder.pos_embed_resize", "timm", "DiGIT's own resize of this ViT's positions is not reproduced"))


ROWS.update({
    "ablation-mae": Row("imagenet-base", "Fig. 4a, encoder ablation, MAE ViT-B/16 tokenizer, 39M GPT, 100 epochs: "
                        "FID 45.51, IS 18.39, linear probe 31.40",
                        (*encoder_rows("mae", "vit_base_patch16_224.mae", "weights/mae_pretrain_vit_base.pth",
                                       "MAE (facebookresearch/mae)"), *ABLATION_STAGE1)),
    "ablation-mocov3": Row("imagenet-base", "Fig. 4a, encoder ablation, MoCo v3 ViT-B/16 tokenizer, 39M GPT, "
                           "100 epochs: FID 20.38, IS 45.02, linear probe 59.22",
                           (*encoder_rows("mocov3", "vit_base_patch16_224", "weights/vit-b-300ep.pth.tar",
                                          "MoCo v3 (facebookresearch/moco-v3)"), *ABLATION_STAGE1)),
    "ablation-ibot": Row("imagenet-base", "Fig. 4a, encoder ablation, iBOT ViT-B/16 tokenizer, 39M GPT, 100 epochs: "
                         "FID 16.81, IS 57.88, linear probe 61.10",
                         (*encoder_rows("ibot", "vit_base_patch16_224", "weights/checkpoint_teacher.pth",
                                        "iBOT (bytedance/ibot)"), *ABLATION_STAGE1)),
    "ablation-dinov2": Row("imagenet-base", "Fig. 4a, encoder ablation, DINOv2 ViT-B/14 tokenizer (the paper's), 39M "
                           "GPT, 100 epochs: its numbers are not in the extracted table",
                           ABLATION_STAGE1),
    "ablation-vq": Row("imagenet-base", "Fig. 4a, encoder ablation, VQGAN tokens, here with the 39M GPT, 100 epochs "
                       "(the figure's FID 24.38, IS 30.93 are Table 3's 214M VQGAN row: uncond-219m-vq-tokens)",
                       (("stage1.tokens", "vq", "the VQ-token baseline: MAGE's VQGAN tokens, no stage 2"),
                        *ABLATION_STAGE1)),
})


# DiGIT's released weights (HF DAMO-NLP-SG/DiGIT; README: Released weights), sampled and evaluated without
# training: the centroids and both stages converted from their files, no probe and no GAN-test or CAS
# classifiers (they train), FID and IS against val as the official eval_fid.py.
def released(size: str, centroids: str, top_k: tuple) -> tuple:
    stage_dir = f"weights/DiGIT/{size}_{centroids.split('_')[1].split('.')[0]}"
    return (UNCOND, NO_DROPOUT, top_k, AR_TOP_P,
            ("kmeans.weights", "file", "the released centroids (README: Checkpoints)"),
            ("kmeans.weights_file", f"weights/DiGIT/{centroids}", "HF DAMO-NLP-SG/DiGIT"),
            ("stage1.weights", "file", "the released stage-1 checkpoint, converted (digit/generate/released.py)"),
            ("stage1.weights_file", f"{stage_dir}_stage1/checkpoint_last.pt", "HF DAMO-NLP-SG/DiGIT"),
            ("stage2.weights", "file", "the released stage-2 checkpoint, converted (digit/generate/released.py)"),
            ("stage2.weights_file", f"{stage_dir}_stage2/checkpoint_last.pt", "HF DAMO-NLP-SG/DiGIT"),
            ("tokenize.random_crops", 0, "no training: the upper bound's val tokens need the center crop only"),
            ("tokenize.views", ["identity"], "no training: the center crop only"),
            ("probe.enabled", False, "the probe trains classifiers: not a training-free evaluation"),
            ("classifier.enabled", False, "GAN-test and CAS train classifiers; unconditional samples get neither"))


RELEASED = {
    "released-base": Row("imagenet-base", "DiGIT's released base model (219M, K=8192; HF DAMO-NLP-SG/DiGIT), sampled "
                         "and evaluated without training; Table 3, class-unconditional DiGIT (+VQGAN) 219M: FID 9.13, "
                         "IS 73.85", released("base", "km_8k.npy", TOPK_BASE), released=True),
    "released-large": Row("imagenet-large", "DiGIT's released large model (732M, K=16384; HF DAMO-NLP-SG/DiGIT), "
                          "sampled and evaluated without training; Table 3, class-unconditional DiGIT (+VQGAN) 732M: "
                          "FID 4.59, IS 141.29", released("large", "km_16k.npy", TOPK_LARGE), released=True),
}
ROWS.update(RELEASED)


def experiment(name: str) -> str:
    return name if ROWS[name].released else f"paper-{name}"


def config_path(name: str) -> Path:
    """config/paper/<row>.yaml, or config/<row>.yaml for the released weights."""
    return (OUT.parent if ROWS[name].released else OUT) / f"{name}.yaml"


def yaml_value(value) -> str:
    """A value as it reads on one line of YAML."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text[:-len("...")].strip() if text.endswith("...") else text


def set_line(lines: list[str], key: str, value, comment: str) -> None:
    """Replace the line of dotted `key` (a nested mapping, two spaces per level) in place."""
    parts, start, indent = key.split("."), 0, 0
    for depth, part in enumerate(parts):
        prefix = " " * indent + part + ":"
        for i in range(start, len(lines)):
            line = lines[i]
            stripped = line.lstrip(" ")
            if i > start and line.strip() and not stripped.startswith("#") and len(line) - len(stripped) < indent:
                break  # left the enclosing mapping
            if line.startswith(prefix):
                start = i
                break
        else:
            raise KeyError(key)
        if not lines[start].startswith(prefix):
            raise KeyError(key)
        indent += 2
    setting = f"{' ' * (indent - 2)}{parts[-1]}: {yaml_value(value)}"
    lines[start] = f"{setting.ljust(COMMENT_COLUMN - 1)} # {comment}"  # aligned as the base files' comments


def render(name: str) -> str:
    row = ROWS[name]
    base = (REPO / "config" / f"{row.base}.yaml").read_text().splitlines()
    while base and base[0].startswith("#"):  # the base file's own header
        base.pop(0)
    lines = list(base)
    set_line(lines, "experiment", experiment(name), "results/" + experiment(name) + "/")
    for key, value, source in row.overrides:
        set_line(lines, key, value, source)
    header = [
        f"# {row.paper}.",
        f"# Generated by workflow/scripts/paper_configs.py from config/{row.base}.yaml and its row '{name}';",
        "# do not edit (tests/test_paper_configs.py checks it). Replaced keys name their source.",
    ]
    if row.cfg:
        header.insert(1, "# CLASSIFIER-FREE GUIDANCE: beyond the paper, whose every result is without it.")
    text = "\n".join(header + lines) + "\n"
    config = yaml.safe_load(text)
    for key, value, _ in row.overrides:  # the replacement landed where it was meant to
        node = config
        for part in key.split("."):
            node = node[part]
        assert node == value and type(node) is type(value), (name, key, node, value)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args()
    stale = []
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ROWS:
        path = config_path(name)
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path.relative_to(REPO)))
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    extra = sorted(p.name for p in OUT.glob("*.yaml") if p.stem not in ROWS or ROWS[p.stem].released)
    if args.check and (stale or extra):
        sys.exit(f"out of date: {stale}; not generated: {extra}; run python workflow/scripts/paper_configs.py")


if __name__ == "__main__":
    main()
