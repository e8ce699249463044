"""A small Hugging Face GPT-2 built from a config (random init: nothing is downloaded) and
synthetic token batches, shared by the examples."""
from __future__ import annotations

import torch

VOCAB, SEQ, WIDTH, LAYERS, HEADS = 64, 16, 32, 4, 2


def gpt2_config(n_layer: int = LAYERS):
    from transformers import GPT2Config

    # dropout off: the examples compare runs bit for bit
    return GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=WIDTH, n_layer=n_layer, n_head=HEADS,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def gpt2_lm(seed: int = 0):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(gpt2_config())


def tokens(batch: int, step: int, rank: int = 0) -> torch.Tensor:
    """Token ids of one batch: a different stream per (rank, step)."""
    g = torch.Generator().manual_seed(10_000 * rank + step)
    return torch.randint(0, VOCAB, (batch, SEQ), generator=g)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def flat_params(modules) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for m in modules for p in m.parameters()])
