"""The transformer: its three network forms against their formulas, sizes of the paper's models, masking,
KV-cache sampling, top-k/top-p."""
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from digit.generate.gpt import (ARCHS, FAIRSEQ_DROPOUT, GPT, PRESETS, GPTConfig, generate_masked, mask_ratio,
                                masked_count, sample_logits)

REPO = Path(__file__).resolve().parents[1]

SMALL = dict(n_layer=2, n_head=2, n_embd=32, n_ffn=64)
STAGE1 = GPTConfig(vocab_size=16, seq_len=10, prefix_vocab_size=3, prefix_len=1, **SMALL)
STAGE2 = GPTConfig(vocab_size=24, seq_len=10, prefix_vocab_size=17, prefix_len=11, **SMALL)


def model(cfg: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(cfg).eval()


def batch(cfg: GPTConfig, b: int = 3):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(cfg.prefix_vocab_size, (b, cfg.prefix_len), generator=g),
            torch.randint(cfg.vocab_size, (b, cfg.seq_len), generator=g))


@pytest.mark.parametrize("preset, vocab, millions", [("base", 8192, 219), ("large", 16384, 732)])
def test_paper_model_sizes(preset, vocab, millions):
    with torch.device("meta"):
        gpt = GPT(GPTConfig(vocab_size=vocab, seq_len=256, prefix_vocab_size=1000, prefix_len=1, **PRESETS[preset]))
    assert round(sum(p.numel() for p in gpt.parameters()) / 1e6) == millions
    assert PRESETS[preset]["n_embd"] == {"base": 1024, "large": 1536}[preset]


@pytest.mark.parametrize("cfg", [STAGE1, STAGE2], ids=["stage1", "stage2"])
def test_a_target_never_sees_later_targets(cfg):
    gpt = model(cfg)
    prefix, tokens = batch(cfg)
    logits = gpt(prefix, tokens[:, :-1])
    assert logits.shape == (3, cfg.seq_len, cfg.vocab_size)  # one prediction per target, none for the prefix
    for j in range(cfg.seq_len - 1):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1) % cfg.vocab_size
        new = gpt(prefix, changed[:, :-1])
        # logits[:, i] predicts target i from targets < i: target j reaches logits j+1 onwards only
        torch.testing.assert_close(new[:, : j + 1], logits[:, : j + 1], rtol=0, atol=0)
        assert not torch.allclose(new[:, j + 1], logits[:, j + 1])


def test_every_target_sees_the_whole_prefix():
    gpt = model(STAGE2)
    prefix, tokens = batch(STAGE2)
    logits = gpt(prefix, tokens[:, :-1])
    changed = prefix.clone()
    changed[:, 0] = (changed[:, 0] + 1) % STAGE2.prefix_vocab_size
    new = gpt(changed, tokens[:, :-1])
    assert not torch.isclose(new, logits).all(-1).any()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cfg", [STAGE1, STAGE2], ids=["stage1", "stage2"])
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.8)])
def test_kv_cache_generation_equals_full_recompute(cfg, top_k, top_p, arch):
    cfg = replace(cfg, arch=arch)
    gpt = model(cfg)
    prefix, _ = batch(cfg, b=4)
    cached = gpt.generate(prefix, temperature=1.3, top_k=top_k, top_p=top_p,
                          generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    tokens = prefix.new_empty(4, 0)
    with torch.no_grad():
        for _ in range(cfg.seq_len):
            logits = gpt(prefix, tokens)[:, -1]
            tokens = torch.cat([tokens, sample_logits(logits, 1.3, top_k, top_p, g)[:, None]], 1)
    assert torch.equal(cached, tokens)
    assert cached.shape == (4, cfg.seq_len) and int(cached.max()) < cfg.vocab_size


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_logits(logits, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample_logits(logits, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_logits(logits, top_p=0.4, generator=g).tolist()) == {0}
    counts = torch.bincount(sample_logits(logits, generator=g), minlength=4) / 2000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)


def test_generation_under_bf16_autocast():
    gpt = model(STAGE2)
    prefix, _ = batch(STAGE2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = gpt.generate(prefix, top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, STAGE2.seq_len) and int(tokens.max()) < STAGE2.vocab_size


def test_guided_generation_equals_guided_full_recompute():
    gpt = model(STAGE1)
    prefix, null = torch.tensor([[0], [1], [2]]), torch.tensor([[2]])
    guided = gpt.generate(prefix, top_k=5, cfg_scale=3.0, null_prefix=null, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    tokens = prefix.new_empty(3, 0)
    with torch.no_grad():
        for _ in range(STAGE1.seq_len):
            cond, uncond = gpt(prefix, tokens)[:, -1], gpt(null.expand_as(prefix), tokens)[:, -1]
            logits = uncond + 3.0 * (cond - uncond)
            tokens = torch.cat([tokens, sample_logits(logits, 1.0, 5, 1.0, g)[:, None]], 1)
    assert torch.equal(guided, tokens)
    plain = gpt.generate(prefix, top_k=5, generator=torch.Generator().manual_seed(3))
    unit = gpt.generate(prefix, top_k=5, cfg_scale=1.0, null_prefix=null, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain, unit) and not torch.equal(plain, guided)
    with pytest.raises(ValueError, match="null_prefix"):
        gpt.generate(prefix, cfg_scale=2.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_gives_the_same_gradients(arch):
    """With dropout too: the recomputation draws the same masks."""
    prefix, tokens = batch(STAGE2)
    grads = []
    for checkpointing in (False, True):
        gpt = model(replace(STAGE2, arch=arch)).train()
        gpt.activation_checkpointing = checkpointing
        gpt(prefix, tokens[:, :-1]).square().mean().backward()
        grads.append([p.grad for p in gpt.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed, rtol=0, atol=0)


def test_layer_means_are_the_mean_over_token_positions_of_each_block():
    gpt = model(STAGE2)
    prefix, tokens = batch(STAGE2)
    features = gpt.layer_means(prefix, tokens[:, :-1])
    assert features.shape == (3, STAGE2.n_layer, STAGE2.n_embd)
    x = torch.cat([gpt.embed_prefix(prefix), gpt.embed_tokens(tokens[:, :-1])], 1)
    with torch.no_grad():
        for i, block in enumerate(gpt.blocks):
            x = block(x)
            torch.testing.assert_close(features[:, i], x[:, STAGE2.prefix_len:].mean(1))


@pytest.mark.parametrize("preset, vocab", [("base", 8192), ("large", 16384)])
def test_paper_presets_train_a_few_steps_on_cpu(preset, vocab):
    """The real models, at the paper's width and depth, on a short sequence: the loss goes down."""
    from digit.generate.train import make_optimizer
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab, seq_len=8, prefix_vocab_size=1001, prefix_len=1, **PRESETS[preset])
    gpt = GPT(cfg).train()
    optimizer = make_optimizer(gpt, {"lr": 1e-5, "weight_decay": 0.01})
    prefix = torch.tensor([[3], [1000]])
    tokens = torch.randint(vocab, (2, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(gpt(prefix, tokens[:, :-1]).flatten(0, 1), tokens.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0], losses


NAR = GPTConfig(vocab_size=24, seq_len=10, prefix_vocab_size=17, prefix_len=11, causal=False, **SMALL)


def test_nar_model_sees_the_whole_sequence_and_predicts_every_target():
    gpt = model(NAR)
    prefix, tokens = batch(NAR)
    logits = gpt(prefix, tokens)
    assert logits.shape == (3, NAR.seq_len, NAR.vocab_size)
    changed = tokens.clone()
    changed[:, -1] = gpt.mask_token
    # bidirectional: masking the last target changes the prediction of the first
    assert not torch.allclose(gpt(prefix, changed)[:, 0], logits[:, 0])


def test_masking_schedules_are_cosine():
    assert [masked_count(s, 8, 256) for s in (0, 8)] == [256, 0]
    counts = [masked_count(s, 8, 256) for s in range(9)]
    assert all(a > b for a, b in zip(counts, counts[1:]))
    assert masked_count(4, 8, 256) == 181  # floor(256 cos(pi/4))
    torch.testing.assert_close(mask_ratio(torch.tensor([0.0, 0.5])), torch.tensor([1.0, 0.5 ** 0.5]))


class Recorder(torch.nn.Module):
    """A model that remembers the targets it was given at each decoding step."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt, self.cfg, self.mask_token, self.seen = gpt, gpt.cfg, gpt.mask_token, []

    def forward(self, prefix, tokens):
        self.seen.append(tokens.clone())
        return self.gpt(prefix, tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_maskgit_decoding_keeps_its_choices_and_follows_the_schedule(arch):
    gpt = model(replace(NAR, arch=arch))
    prefix, _ = batch(NAR, b=4)
    recorder = Recorder(gpt)
    tokens = generate_masked(recorder, prefix, steps=4, choice_temperature=4.5,
                             generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (4, NAR.seq_len) and int(tokens.max()) < NAR.vocab_size
    assert len(recorder.seen) == 4
    for step, (before, after) in enumerate(zip(recorder.seen, recorder.seen[1:] + [tokens])):
        masked = before == gpt.mask_token
        assert (masked.sum(1) == masked_count(step, 4, NAR.seq_len)).all()
        assert torch.equal(after[~masked], before[~masked])  # a decided token is never changed
    again = generate_masked(gpt, prefix, steps=4, choice_temperature=4.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)


# The network forms, each against its formulas written out with torch ops on the model's weights.


def reference_forward(gpt: GPT, prefix: torch.Tensor, tokens: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """prenorm:        x = x + attn(LN(x)); x = x + ffn(LN(x)); final LN.
    fairseq_postln:    x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x))); no final LN.
    fairseq_prenorm:   x = x + drop(attn(LN(x))); x = x + drop(ffn(LN(x))); final LN.
    The fairseq forms scale the token embeddings by sqrt(d), drop out the embeddings and have biases in every
    linear layer but the head. ffn(x) = W2 gelu(W1 x + b1) + b2 with the exact (erf) GELU; attention is softmax of
    q k^T / sqrt(head dim), causal or not, with no dropout on the probabilities. dropout > 0 draws the masks
    with F.dropout in the order the formulas apply them."""
    cfg, W = gpt.cfg, {name: w.double() for name, w in gpt.state_dict().items()}
    d, H, fairseq = cfg.n_embd, cfg.n_head, cfg.arch != "prenorm"

    def drop(x):
        return F.dropout(x, dropout) if dropout else x

    def linear(x, name):
        return x @ W[f"{name}.weight"].T + (W[f"{name}.bias"] if fairseq else 0)

    def norm(x, name):
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * W[f"{name}.weight"] + W[f"{name}.bias"]

    def attn(x, i):
        B, T, _ = x.shape
        q, k, v = (t.reshape(B, T, H, d // H).transpose(1, 2) for t in linear(x, f"blocks.{i}.attn.qkv").split(d, -1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // H)
        if cfg.causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return linear((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d), f"blocks.{i}.attn.proj")

    def ffn(x, i):
        h = linear(x, f"blocks.{i}.mlp.fc")
        return linear(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), f"blocks.{i}.mlp.proj")

    scale = math.sqrt(d) if fairseq else 1.0
    P, L = prefix.shape[1], tokens.shape[1]
    x = drop(torch.cat([scale * W["prefix_emb.weight"][prefix] + W["prefix_pos.weight"][:P],
                        scale * W["tok_emb.weight"][tokens] + W["tok_pos.weight"][:L]], dim=1))
    for i in range(cfg.n_layer):
        if cfg.arch == "fairseq_postln":
            x = norm(x + drop(attn(x, i)), f"blocks.{i}.ln_1")
            x = norm(x + drop(ffn(x, i)), f"blocks.{i}.ln_2")
        else:
            x = x + drop(attn(norm(x, f"blocks.{i}.ln_1"), i))
            x = x + drop(ffn(norm(x, f"blocks.{i}.ln_2"), i))
    if cfg.arch != "fairseq_postln":
        x = norm(x, "ln_f")
    return x[:, P - 1 if cfg.causal else P:] @ W["head.weight"].T


def perturbed(cfg: GPTConfig) -> GPT:
    """A float64 model whose every weight, norm and bias is moved off its init (biases start at 0, norms at 1)."""
    gpt = model(cfg).double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return gpt


def inputs(cfg: GPTConfig):
    prefix, tokens = batch(cfg)
    if cfg.causal:
        return prefix, tokens[:, :-1]
    return prefix, tokens.masked_fill(torch.rand(tokens.shape, generator=torch.Generator().manual_seed(3)) < 0.5,
                                      cfg.vocab_size)  # some targets masked


# float64 on both sides: the sums differ between kernels (AVX2, AVX-512, AMX) only near 1e-15
TOLERANCE = dict(atol=1e-10, rtol=0)
FORMS = [pytest.param(replace(cfg, arch=arch), id=f"{arch}-{name}") for arch in ARCHS
         for name, cfg in (("stage1", STAGE1), ("stage2", STAGE2), ("nar", NAR))]


@pytest.mark.parametrize("cfg", FORMS)
def test_each_arch_computes_its_formulas(cfg):
    gpt = perturbed(cfg)
    parameters = dict(gpt.named_parameters())
    assert ("ln_f.weight" in parameters) == (cfg.arch != "fairseq_postln")  # post-LN: no final norm
    assert ("blocks.0.mlp.fc.bias" in parameters) == (cfg.arch != "prenorm") and "head.bias" not in parameters
    prefix, tokens = inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(gpt(prefix, tokens), reference_forward(gpt, prefix, tokens), **TOLERANCE)


@pytest.mark.parametrize("cfg", FORMS)
def test_dropout_is_on_in_training_only(cfg):
    gpt = perturbed(cfg)
    prefix, tokens = inputs(cfg)
    with torch.no_grad():
        evaluated = gpt(prefix, tokens)
        torch.testing.assert_close(gpt(prefix, tokens), evaluated, rtol=0, atol=0)
        gpt.train()
        torch.manual_seed(5)
        trained = gpt(prefix, tokens)
        if cfg.arch == "prenorm":
            torch.testing.assert_close(trained, evaluated, rtol=0, atol=0)  # no dropout anywhere
            return
        assert not torch.isclose(trained, evaluated).all()
        # the same masks, drawn by the formulas at the embeddings and the attention and FFN outputs
        torch.manual_seed(5)
        torch.testing.assert_close(trained, reference_forward(gpt, prefix, tokens, FAIRSEQ_DROPOUT), **TOLERANCE)


def test_fairseq_forms_start_from_fairseq_init():
    d = 256
    gpt = GPT(GPTConfig(vocab_size=512, seq_len=64, prefix_vocab_size=10, prefix_len=1, n_layer=1, n_head=4,
                        n_embd=d, n_ffn=4 * d, arch="fairseq_postln"))
    for table in (gpt.prefix_emb, gpt.tok_emb, gpt.tok_pos, gpt.head):  # Embedding(): N(0, d^-1/2)
        assert abs(table.weight.mean()) < 0.1 * d ** -0.5 and abs(table.weight.std() / d ** -0.5 - 1) < 0.05
    attn = gpt.blocks[0].attn
    xavier = math.sqrt(6 / (d + d))  # the bound of Xavier-uniform on a d x d matrix
    for w in attn.qkv.weight.split(d):  # MultiheadAttention.reset_parameters: gain 2^-1/2 on q, k, v
        assert 0.99 * xavier / math.sqrt(2) < w.abs().max() <= xavier / math.sqrt(2)
    assert 0.99 * xavier < attn.proj.weight.abs().max() <= xavier and not attn.proj.bias.any()


def fairseq_decoder_parameters(d: int, n_layer: int, n_ffn: int, input_rows: int, output_rows: int,
                               positions: int) -> int:
    """fairseq's TransformerDecoder without cross-attention in its post-LN form, counted by hand: per layer
    the q, k, v and output projections (d x d, bias d each), fc1 (d x n_ffn + n_ffn), fc2 (n_ffn x d + d) and two
    LayerNorms (weight and bias); the input token table, the learned position table and the output
    projection (no bias, untied); no final LayerNorm."""
    layer = 4 * (d * d + d) + (d * n_ffn + n_ffn) + (n_ffn * d + d) + 2 * 2 * d
    return n_layer * layer + (input_rows + positions + output_rows) * d


@pytest.mark.parametrize("preset, k, millions", [("base", 8192, 219), ("large", 16384, 732)])
def test_official_stage1_sizes(preset, k, millions):
    """The paper's 219M (base) and 732M (large) are the official unconditional stage-1 network counted whole:
    fairseq's dictionary of K + 5 symbols (<s>, <pad>, </s>, <unk>, <n>) as the input table and as the output
    projection, and 1026 learned positions (max_target_positions 1024 + padding_idx 1 + 1): 219.38M and 731.88M,
    which round to the paper's figures (tolerance: rounding to the million). The fairseq_postln model has the
    same blocks exactly, and tables that hold only the rows DiGIT uses: K + 1 inputs (the start token is the
    prefix table's one row), K outputs and 256 positions (1 + 255; the 257th input, t256, is never fed).
    It is 779 rows (4 + 5 + 770) smaller: 218.58M (base) and 730.68M (large); class-conditional, the
    1000 class rows add 1.02M (base) or 1.54M (large) here as in the official model, whose 1000 classes
    the paper's figure leaves out (it gives 219M for both tables)."""
    shape = PRESETS[preset]
    d, n_layer, n_ffn = shape["n_embd"], shape["n_layer"], shape["n_ffn"]
    with torch.device("meta"):
        gpt = GPT(GPTConfig(vocab_size=k, seq_len=256, prefix_vocab_size=1, prefix_len=1, arch="fairseq_postln",
                            **shape))
    ours = sum(p.numel() for p in gpt.parameters())
    assert ours == fairseq_decoder_parameters(d, n_layer, n_ffn, input_rows=k + 1, output_rows=k, positions=256)
    official = fairseq_decoder_parameters(d, n_layer, n_ffn, input_rows=k + 5, output_rows=k + 5, positions=1026)
    assert round(official / 1e6) == millions
    assert official - ours == (4 + 5 + 770) * d
    with torch.device("meta"):  # the pre-LN form adds its final LayerNorm only
        prenorm = GPT(replace(gpt.cfg, arch="fairseq_prenorm"))
    assert sum(p.numel() for p in prenorm.parameters()) == ours + 2 * d


def test_the_small_preset_is_the_ablation_39m():
    """The encoder ablation's 39M GPT (Fig. 4a; shape unpublished): at width 512 (8 heads, FFN 2048) the
    depth whose official count (K=8192, as the 219M/732M above) is nearest 39M is 10: 40.44M (9 layers: 37.29M);
    this model, unconditional, 40.04M."""
    shape = PRESETS["small"]
    counts = {n: fairseq_decoder_parameters(512, n, 2048, input_rows=8197, output_rows=8197, positions=1026)
              for n in (9, 10, 11)}
    assert (shape["n_embd"], shape["n_head"], shape["n_ffn"]) == (512, 8, 2048)
    assert min(counts, key=lambda n: abs(counts[n] - 39e6)) == shape["n_layer"] == 10
    assert round(counts[10] / 1e5) == 404 and round(counts[9] / 1e5) == 373
    with torch.device("meta"):
        gpt = GPT(GPTConfig(vocab_size=8192, seq_len=256, prefix_vocab_size=1, prefix_len=1, arch="fairseq_postln",
                            **shape))
    assert round(sum(p.numel() for p in gpt.parameters()) / 1e5) == 400


def test_the_configs_name_the_model_forms():
    schema = yaml.safe_load((REPO / "digit/runtime/config.schema.yaml").read_text())
    assert schema["$defs"]["transformer_training"]["properties"]["arch"]["enum"] == list(ARCHS)
    forms = {name: {stage: yaml.safe_load((REPO / f"config/{name}.yaml").read_text())[stage]["arch"]
                    for stage in ("stage1", "stage2")} for name in ("config", "imagenet-base", "imagenet-large")}
    assert forms == {"config": {"stage1": "prenorm", "stage2": "prenorm"},
                     "imagenet-base": {"stage1": "fairseq_postln", "stage2": "fairseq_prenorm"},
                     "imagenet-large": {"stage1": "fairseq_postln", "stage2": "fairseq_prenorm"}}


def test_arch_is_checked_and_old_records_load_as_prenorm():
    with pytest.raises(ValueError, match="arch 'postln': expected one of prenorm, fairseq_postln, fairseq_prenorm"):
        replace(STAGE1, arch="postln")
    record = asdict(STAGE1)
    del record["arch"]  # a model.json written before the field existed
    assert GPTConfig(**record).arch == "prenorm"
    assert GPTConfig(**asdict(replace(STAGE1, arch="fairseq_postln"))).arch == "fairseq_postln"
