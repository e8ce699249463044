"""A data-parallel job for bench/slow_link.py: the main job's GPT-style model under
``DistributedDataParallel``, with one gradient communication hook, on the embedded language.

    torchrun --nproc_per_node 2 bench/ddp_job.py --hook allreduce --out R.json
    torchrun --nproc_per_node 2 bench/ddp_job.py --hook gradwire --codec '{"name": "fp", "bits": 8}' ...

Hooks: ``allreduce`` (DDP's own, no hook registered), ``fp16`` (torch's ``fp16_compress_hook``),
``powersgd`` (torch's ``powerSGD_hook``, rank ``--powersgd-rank``, error feedback and warm start,
plain all-reduce for the first 10 steps), ``gradwire`` (``gradwire_allreduce_hook`` with
``--codec``). Every run of one seed sees the same initial weights and batches. Rank 0 writes
``--out``: step times, losses, the hook's own byte counters where it has them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hook", required=True, choices=["allreduce", "fp16", "powersgd", "gradwire"])
    p.add_argument("--codec", default='{"name": "fp", "bits": 8}', help="gradwire hook: codec JSON")
    p.add_argument("--powersgd-rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def register(model, args) -> dict:
    """Register the chosen hook; returns the state whose counters we report (or {})."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if args.hook == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif args.hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=args.powersgd_rank,
                                            start_powerSGD_iter=10, random_seed=args.seed)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif args.hook == "gradwire":
        from gradwire.integrations.ddp import GradwireDDPState, gradwire_allreduce_hook

        state = GradwireDDPState(json.loads(args.codec), base_seed=args.seed)
        model.register_comm_hook(state, gradwire_allreduce_hook)
        return state
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from gradwire.models.gpt import GPTConfig, gpt_layers, lm_loss
    from gradwire.models.synthetic import MarkovLanguage, TokenStream

    lang = MarkovLanguage(vocab=16, order=2, concentration=0.1, seed=1234)
    cfg = GPTConfig(vocab=lang.vocab, width=args.width, depth=args.depth, heads=4, seq_len=args.seq_len)
    model = torch.nn.Sequential(*gpt_layers(cfg, seed=args.seed))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = register(ddp, args)
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    data = TokenStream(lang.sample(200_000, seed=args.seed), args.seq_len, args.micro, seed=args.seed + 1 + rank)
    from gradwire.testing.shaped_link import tx_bytes_reader

    read_net = tx_bytes_reader()
    losses, ends, net = [], [], []
    dist.barrier()
    if read_net:
        net.append(read_net())
    t0 = time.perf_counter()
    for _ in range(args.steps):
        x, y = next(data)
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        ends.append(time.perf_counter())
        if read_net:
            net.append(read_net())
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if rank == 0:
        rep = {"hook": args.hook, "codec": json.loads(args.codec) if args.hook == "gradwire" else None,
               "ranks": dist.get_world_size(), "steps": args.steps, "losses": losses,
               "step_seconds": [b - a for a, b in zip([t0] + ends[:-1], ends)],
               "net_tx_bytes": net or None,
               "gradient_bytes_per_replica": grad_bytes,
               "hook_counters": dict(getattr(state, "counters", {}) or {}),
               "model": {"width": args.width, "depth": args.depth, "seq_len": args.seq_len, "micro": args.micro}}
        with open(args.out, "w") as f:
            json.dump(rep, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
