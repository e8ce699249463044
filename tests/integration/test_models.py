"""The main job's model, data and in-process pipeline (no DeepSpeed processes here)."""
import math

import pytest
import torch

from gradwire.config import parse_gradwire
from gradwire.models.gpt import GPTConfig, gpt_layers, lm_loss, split_uniform
from gradwire.models.inprocess import InProcessPipeline
from gradwire.models.synthetic import MarkovLanguage, TokenStream


def test_markov_entropy_rate_matches_monte_carlo():
    # Exact entropy rate vs the mean of -ln p(x_t | context) over independent chains started
    # from the stationary distribution. Chain means are iid, so their standard error is
    # std(chain means)/sqrt(chains); we accept 5 standard errors (a false failure has
    # probability < 1e-6 for a normal mean; the sample is seeded anyway).
    lang = MarkovLanguage(vocab=8, order=2, concentration=0.3, seed=7)
    chains, length = 400, 64
    means = []
    for c in range(chains):
        s = lang.sample(length, seed=1000 + c)
        ctx = s[:-2] * lang.vocab + s[1:-1]
        means.append(float(-lang.probs[ctx, s[2:]].log().mean()))
    m = torch.tensor(means, dtype=torch.float64)
    se = float(m.std()) / math.sqrt(chains)
    assert abs(float(m.mean()) - lang.entropy_rate) < 5 * se, (float(m.mean()), lang.entropy_rate, se)
    assert 0 < lang.entropy_rate < math.log(lang.vocab)


def test_markov_stationary_distribution_is_stationary_and_seeded():
    lang = MarkovLanguage(vocab=4, order=2, concentration=0.5, seed=3)
    n = 16
    nxt = torch.zeros(n, dtype=torch.float64)
    for c in range(n):
        for x in range(4):
            nxt[(c % 4) * 4 + x] += lang.pi[c] * lang.probs[c, x]
    torch.testing.assert_close(nxt, lang.pi, rtol=0, atol=1e-12)
    again = MarkovLanguage(vocab=4, order=2, concentration=0.5, seed=3)
    assert torch.equal(again.probs, lang.probs)
    assert torch.equal(lang.sample(100, seed=5), again.sample(100, seed=5))


def test_language_bad_arguments():
    with pytest.raises(ValueError, match="vocab >= 2"):
        MarkovLanguage(vocab=1)
    with pytest.raises(ValueError, match="vocab\\*\\*order <= 4096"):
        MarkovLanguage(vocab=64, order=3)
    with pytest.raises(ValueError, match="need more than"):
        TokenStream(torch.arange(5), seq_len=8, batch=2)


def test_split_uniform():
    assert split_uniform(6, 2) == [(0, 3), (3, 6)]
    assert split_uniform(7, 3) == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(ValueError):
        split_uniform(2, 3)


def test_gpt_config_and_input_checks():
    with pytest.raises(ValueError, match="divisible by heads"):
        GPTConfig(width=10, heads=4)
    emb = gpt_layers(GPTConfig(depth=1))[0]
    with pytest.raises(TypeError, match="int64"):
        emb(torch.zeros(2, 4))


def _grads(module_list):
    return [p.grad.clone() for m in module_list for p in m.parameters()]


def test_inprocess_identity_pipeline_equals_uncut_model_bit_exactly():
    # With the identity codec, cutting the model into 3 stages and sending the boundary
    # gradient through encode/decode must not change a single bit of any parameter gradient.
    cfg = GPTConfig(vocab=16, seq_len=8, width=16, depth=4, heads=2)
    x = torch.randint(0, 16, (3, 8), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 16, (3, 8), generator=torch.Generator().manual_seed(1))
    ref = gpt_layers(cfg, seed=5)
    h = x
    for layer in ref:
        h = layer(h)
    ref_loss = lm_loss(h, y)
    ref_loss.backward()
    pipe = InProcessPipeline(gpt_layers(cfg, seed=5), 3, parse_gradwire({"codec": {"name": "none"}}), lm_loss)
    loss = pipe.forward_backward(x, y, step=0)
    assert loss == float(ref_loss.detach())
    for a, b in zip(_grads(ref), _grads(pipe.stages)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    rows = pipe.wire_log.rows
    assert [r.boundary for r in rows] == [1, 0]  # backward order: last boundary first
    for r in rows:
        assert r.raw_bytes == 3 * 8 * 16 * 4 and r.sent_bytes == r.predicted_bytes > r.raw_bytes


def test_inprocess_compressed_boundary_counts_the_codecs_packet_sizes():
    cfg = GPTConfig(vocab=16, seq_len=8, width=16, depth=2, heads=2)
    gw = parse_gradwire({"codec": {"name": "fp", "bits": 6}, "boundaries": {"1": {"bits": 8}}})
    pipe = InProcessPipeline(gpt_layers(cfg), 3, gw, lm_loss)
    x = torch.randint(0, 16, (2, 8))
    pipe.forward_backward(x, x, step=0)
    by_b = {r.boundary: r for r in pipe.wire_log.rows}
    for b, bits in ((0, 6), (1, 8)):
        codec = pipe.codecs[b]
        assert codec.packed_size((2, 8, 16), torch.float32) == by_b[b].sent_bytes == by_b[b].predicted_bytes
        assert by_b[b].fmt == f"fp{bits}"
    # 6- and 8-bit payloads of 256 elements (192 and 256 bytes) plus the same header size
    assert by_b[1].sent_bytes - by_b[0].sent_bytes == 256 - 192


def test_inprocess_heterogeneous_pruning_keeps_the_budget_and_warmup_sends_identity():
    cfg = GPTConfig(vocab=16, seq_len=8, width=16, depth=2, heads=2)
    gw = parse_gradwire({"codec": {"name": "prune", "sparsity": 0.8, "heterogeneous": True},
                         "refresh_every": 2, "warmup_steps": 1})
    pipe = InProcessPipeline(gpt_layers(cfg), 4, gw, lm_loss)
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        x = torch.randint(0, 16, (2, 8), generator=gen)
        pipe.forward_backward(x, x, step)
    labels = [r.fmt for r in pipe.wire_log.rows]
    assert labels[:3] == ["identity(warm-up)"] * 3  # step 0, three boundaries
    assert all(lbl.startswith("prune") for lbl in labels[3:])
    assert [c for c, _ in pipe.allocations] == [2, 4]
    for _, s in pipe.allocations:
        # equal numels at every boundary: the element-weighted mean is the plain mean
        assert abs(sum(s) / len(s) - 0.8) < 1e-6, s
    assert [p.codec.config()["sparsity"] for p in pipe.policies] == pytest.approx(pipe.allocations[-1][1])
