"""Embedded training data that needs no download: a random order-k Markov language.

The language is generated from a fixed seed: for every context of ``order`` previous tokens, a
next-token distribution drawn from a symmetric Dirichlet(``concentration``) (small concentration
-> peaked, learnable distributions). Its entropy rate -- the loss floor of any model that sees
at least ``order`` tokens of context -- is known exactly:

    H = sum_s pi(s) * H(P(. | s))      [nats/token]

with pi the stationary distribution over contexts s (power iteration on the chain). Learning it
needs attention over the previous ``order`` positions, so it is hard enough that corrupted
gradients show up in the loss.

``TextData`` reads a text file instead (character level; no known floor).
"""
from __future__ import annotations

import bisect
import math

import torch


class MarkovLanguage:
    def __init__(self, vocab: int = 32, order: int = 2, concentration: float = 0.1, seed: int = 0):
        if vocab < 2 or order < 1 or concentration <= 0:
            raise ValueError(f"need vocab >= 2, order >= 1, concentration > 0; got {vocab}, {order}, {concentration}")
        if vocab ** order > 4096:
            raise ValueError(f"{vocab ** order} contexts: the exact entropy needs vocab**order <= 4096")
        self.vocab, self.order = vocab, order
        # Dirichlet rows = normalised Gamma(concentration) draws, under a forked, seeded RNG.
        conc = torch.full((vocab ** order, vocab), concentration, dtype=torch.float64)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            w = torch._standard_gamma(conc)
        w = w + 1e-12  # no exactly-zero transition: every context stays reachable
        self.probs = (w / w.sum(1, keepdim=True))  # [contexts, vocab], float64
        self.pi = self._stationary()
        h_ctx = -(self.probs * self.probs.log()).sum(1)
        self.entropy_rate = float((self.pi * h_ctx).sum())  # nats / token

    def _next_context(self) -> torch.Tensor:
        # Context index c = sum_j tok_j * V^(order-1-j) (oldest first); appending x drops the oldest.
        c = torch.arange(self.vocab ** self.order)
        return (c % (self.vocab ** (self.order - 1))) * self.vocab  # + x added per column

    def _stationary(self, iters: int = 5000, tol: float = 1e-14) -> torch.Tensor:
        # Dense transition matrix over contexts (vocab**order <= 4096 keeps it a few MB), then
        # power iteration pi <- pi P; the chain is aperiodic (every transition has p > 0).
        n = self.vocab ** self.order
        trans = torch.zeros(n, n, dtype=torch.float64)
        rows = torch.arange(n)[:, None].expand(n, self.vocab)
        trans[rows, self._next_context()[:, None] + torch.arange(self.vocab)] = self.probs
        pi = torch.full((n,), 1.0 / n, dtype=torch.float64)
        for _ in range(iters):
            new = pi @ trans
            if float((new - pi).abs().sum()) < tol:
                return new
            pi = new
        raise RuntimeError("stationary distribution did not converge")

    def sample(self, length: int, seed: int) -> torch.Tensor:
        """A token sequence of ``length`` (int64), started from the stationary distribution."""
        g = torch.Generator().manual_seed(seed)
        ctx = int(torch.multinomial(self.pi.float(), 1, generator=g))
        out = torch.empty(length, dtype=torch.long)
        # Draw all uniforms at once and invert the per-context CDF: O(length) Python steps of
        # cheap work (a searchsorted on a V-row), fast enough for ~1e6 tokens.
        cdf = self.probs.cumsum(1)
        cdf[:, -1] = 1.0
        u = torch.rand(length, generator=g, dtype=torch.float64)
        cdf_l = cdf.tolist()
        mod = self.vocab ** (self.order - 1)
        for i, ui in enumerate(u.tolist()):
            x = bisect.bisect_right(cdf_l[ctx], ui)
            x = min(x, self.vocab - 1)
            out[i] = x
            ctx = (ctx % mod) * self.vocab + x
        return out


class TokenStream:
    """Random windows of ``seq_len + 1`` tokens from a 1-D token tensor, as (inputs, targets)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch: int, seed: int = 0):
        if tokens.numel() < seq_len + 2:
            raise ValueError(f"need more than {seq_len + 1} tokens, got {tokens.numel()}")
        self.tokens, self.seq_len, self.batch = tokens, seq_len, batch
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.batch,), generator=self.gen)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        w = self.tokens[idx]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def read_text(path: str) -> tuple[torch.Tensor, list[str]]:
    """Character-level tokens of a UTF-8 text file and its vocabulary (sorted characters)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if len(text) < 1000:
        raise ValueError(f"{path}: need at least 1000 characters of text, got {len(text)}")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), chars


def uniform_entropy(vocab: int) -> float:
    """The loss of a model that knows nothing: ln(vocab) nats."""
    return math.log(vocab)
