"""The transformer: sizes of the paper's models, masking, KV-cache sampling, top-k/top-p."""
import pytest
import torch

from digit.generate.gpt import GPT, PRESETS, GPTConfig, generate_masked, mask_ratio, masked_count, sample_logits

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


@pytest.mark.parametrize("cfg", [STAGE1, STAGE2], ids=["stage1", "stage2"])
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.8)])
def test_kv_cache_generation_equals_full_recompute(cfg, top_k, top_p):
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


def test_activation_checkpointing_gives_the_same_gradients():
    prefix, tokens = batch(STAGE2)
    grads = []
    for checkpointing in (False, True):
        gpt = model(STAGE2).train()
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


def test_maskgit_decoding_keeps_its_choices_and_follows_the_schedule():
    gpt = model(NAR)
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
