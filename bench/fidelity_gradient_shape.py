"""Shape of the main job's boundary gradient (issue 17): is log|g| normal (lognormal |g|, the
regime of paper 001) or the skewed log-magnitude of a Gaussian?

    python bench/fidelity_gradient_shape.py [--steps 500]

Trains the uncompressed main job (in-process, 2 stages, seed 0) and, at a few micro-batches,
prints sigma, skewness and kurtosis of log2|g| at boundary 0, with the references: a lognormal
|g| has skewness 0 and kurtosis 3 at any sigma; a Gaussian g has sigma(log2|g|) = pi/sqrt(8)/ln 2
= 1.60, skewness -1.54 and kurtosis 7.0 (polygamma moments of log|Z|). Beside them, 80% stochastic
pruning's cosine on that tensor: the exact expectation (``numerics.pruning_regime``) and the
lognormal model (``sparsity_allocation.pruning_cosine``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500)
    a = p.parse_args(argv)
    from gradwire.config import load_config
    from gradwire.models.gpt import GPTConfig, gpt_layers, lm_loss
    from gradwire.models.inprocess import InProcessPipeline
    from gradwire.models.synthetic import MarkovLanguage, TokenStream
    from gradwire.numerics.lognormal import fit_lognormal, pruning_threshold_for
    from gradwire.numerics.pruning_regime import expected_cosine
    from gradwire.numerics.sparsity_allocation import pruning_cosine

    torch.set_num_threads(1)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _, gw = load_config(os.path.join(root, "configs", "baseline.json"))
    lang = MarkovLanguage(vocab=16, order=2, concentration=0.1, seed=1234)
    pipe = InProcessPipeline(gpt_layers(GPTConfig(vocab=16), 0), 2, gw, lm_loss)
    opt = torch.optim.Adam(pipe.parameters(), lr=3e-3, betas=(0.9, 0.98))
    data = TokenStream(lang.sample(300_000, 0), 32, 8, 1)
    grab = {4, 100, 400, 1000, 2 * a.steps - 1}
    encode = pipe.policies[0].encode
    print(f"{'micro-batch':>11} {'sigma':>6} {'skew':>6} {'kurt':>6} {'cos80 exact':>11} {'cos80 lognormal':>15}")

    def spy(x, step):
        if step in grab:
            lg = x.detach().abs().log2().flatten().double()
            z = (lg - lg.mean()) / lg.std()
            f = fit_lognormal(x)
            al = pruning_threshold_for(f, 0.8)
            print(f"{step:>11} {f.sigma_log2:6.2f} {float((z ** 3).mean()):6.2f} {float((z ** 4).mean()):6.2f} "
                  f"{expected_cosine(x, al):11.3f} "
                  f"{pruning_cosine(al, f.mu_ln, f.sigma_ln, upper_quantile=1 - 1 / x.numel()):15.3f}", flush=True)
        return encode(x, step)

    pipe.policies[0].encode = spy
    for step in range(a.steps):
        opt.zero_grad()
        sum(pipe.forward_backward(*next(data), step, 0.5) for _ in range(2))
        torch.nn.utils.clip_grad_norm_(pipe.parameters(), 1.0)
        opt.step()
    print(f"references: lognormal |g|: skew 0, kurt 3; Gaussian g: sigma {math.pi / math.sqrt(8) / math.log(2):.2f}, "
          f"skew -1.54, kurt 7.0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
