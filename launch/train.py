"""The main job: train a small GPT-style decoder split into pipeline stages, compressing the
backward gradient at every stage boundary with the codec of the config's "gradwire" section.

    deepspeed launch/train.py --config configs/fp6.json                 # 1 process: in-process stages
    deepspeed --num_gpus 2 launch/train.py --config configs/fp6.json    # 2 pipeline ranks
    torchrun --nproc_per_node 2 launch/train.py --config configs/fp6.json
    mpirun -n 2 python launch/train.py --config configs/fp6.json
    torchrun --nproc_per_node 4 launch/train.py --config configs/fp6.json --stages 2 --tp 2

With one process the stages run in-process and every boundary is still encoded and decoded
(the report gives the bytes that would cross the wire). With several, DeepSpeed's pipeline
engine runs one stage per rank (gloo on CPU, NCCL on GPU) with gradwire's gradient send/receive.
With ``--tp N`` (or ``gradwire.tensor_parallel.size``) every stage's attention and MLP
projections are split Megatron-style over N consecutive ranks, whose backward all-reduces are
compressed with ``gradwire.tensor_parallel.codec``; ranks = stages x tp x data-parallel replicas.
Everything (config, topology, data) is checked before training starts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from gradwire.config import ConfigError, check_topology, load_config  # noqa: E402


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors are one line on stderr and exit 2 (argparse prints the usage first)."""

    def error(self, message):
        self.exit(2, f"train.py: argument error: {message} (see --help)\n")


def parse_args(argv=None):
    p = _OneLineParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="DeepSpeed JSON with a \"gradwire\" section")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--depth", type=int, default=4, help="decoder blocks (default 4)")
    p.add_argument("--width", type=int, default=64, help="hidden width (default 64)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--stages", type=int, default=None,
                   help="pipeline stages (default: the number of ranks, or 2 with one process)")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel ranks per stage (default: gradwire.tensor_parallel.size, else 1)")
    p.add_argument("--data", default=None, help="a UTF-8 text file (character level) instead of "
                   "the embedded Markov language, or 'stdlib': a character corpus built from this "
                   "Python's standard-library source (no download; validation loss on a fixed split)")
    p.add_argument("--vocab", type=int, default=16, help="embedded language: vocabulary (default 16)")
    p.add_argument("--order", type=int, default=2, help="embedded language: Markov order (default 2)")
    p.add_argument("--seed", type=int, default=0, help="model init and data seed")
    p.add_argument("--report-dir", default=None, help="default: gradwire.report_dir, else "
                   "reports/<config name>")
    p.add_argument("--baseline", default=None, help="report.json of a baseline run to plot beside")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="single-process mode: where the in-process stages run (default auto: cuda "
                        "when a GPU is visible, else cpu); multi-rank runs use DeepSpeed's device")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process "
                   "(default 1: the default model is tiny, and more threads only contend)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be >= 1")
    if a.stages is not None and a.stages < 1:
        p.error(f"--stages must be >= 1, got {a.stages}")
    return a


def world_from_env() -> int:
    """Ranks in this job, from the launcher's environment (torchrun/deepspeed: WORLD_SIZE;
    mpirun: MPICH's PMI_SIZE or Open MPI's OMPI_COMM_WORLD_SIZE)."""
    for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(k):
            return int(os.environ[k])
    return 1


def build_data(args):
    from gradwire.models.synthetic import MarkovLanguage, read_text

    if args.data == "stdlib":  # built (and checked) in main; train on its training split
        return args.corpus.train, len(args.corpus.vocab), None, args.corpus.name
    if args.data:
        tokens, chars = read_text(args.data)
        return tokens, len(chars), None, f"text:{os.path.basename(args.data)}"
    lang = MarkovLanguage(vocab=args.vocab, order=args.order, concentration=0.1, seed=1234)
    name = f"markov(V={args.vocab},k={args.order},c=0.1)"
    return lang.sample(300_000, seed=args.seed), lang.vocab, lang.entropy_rate, name


def batch_sizes(ds_config):
    from gradwire.ds_config import batch_sizes as checked

    return checked(ds_config)  # validated in main() before anything runs


def progress(args, rank, total):
    if rank != 0 or args.no_progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=0.5)


def run_inprocess(args, ds_config, gw, gpt_cfg, tokens):
    from gradwire.models.gpt import gpt_layers, lm_loss
    from gradwire.models.inprocess import InProcessPipeline
    from gradwire.models.synthetic import TokenStream

    from gradwire.ds_config import inprocess_optimizer

    stages = args.stages or 2
    device = torch.device(inprocess_device(args.device))
    # Built on the CPU (same initial weights on every device), then moved.
    pipe = InProcessPipeline(gpt_layers(gpt_cfg, seed=args.seed), stages, gw, lm_loss).to(device)
    opt = inprocess_optimizer(ds_config)(pipe.parameters())  # checked in main() already
    micro, gas = batch_sizes(ds_config)
    data = TokenStream(tokens, gpt_cfg.seq_len, micro, seed=args.seed + 1)
    losses, bar = [], progress(args, 0, args.steps)
    t0 = time.perf_counter()
    ends = []  # wall clock at the end of every step: step times for bench/slow_link.py
    for step in range(args.steps):
        opt.zero_grad(set_to_none=True)
        loss = sum(pipe.forward_backward(*(t.to(device) for t in next(data)), step, scale=1.0 / gas)
                   for _ in range(gas)) / gas
        clip = ds_config.get("gradient_clipping")
        if clip:
            torch.nn.utils.clip_grad_norm_(pipe.parameters(), clip)
        opt.step()
        losses.append(loss)
        ends.append(time.perf_counter())
        _tick(bar, loss, pipe.wire_log.step_totals(step), (step + 1) * gas * micro * gpt_cfg.seq_len, t0)
    if bar:
        bar.close()
    extra = {}
    if getattr(args, "corpus", None) is not None:  # --data stdlib: loss on the held-out split
        from gradwire.data.corpus import eval_windows

        vx, vy = (t.to(device) for t in eval_windows(args.corpus.val, gpt_cfg.seq_len))
        extra["val_loss"] = sum(pipe.evaluate(vx[i:i + 64], vy[i:i + 64]) * len(vx[i:i + 64])
                                for i in range(0, len(vx), 64)) / len(vx)
    return losses, pipe.wire_log.rows, {**extra, "stages": stages, "mode": "in-process", "ranks": 1,
                                        "device": str(device), "step_seconds": _step_seconds(t0, ends),
                                        "sparsity_allocations": pipe.allocations,
                                        "layer_ranges": pipe.ranges,
                                        "codec_impl": sorted({_impl(c) for c in pipe.codecs})}


def _net_counter():
    """(reader, samples) when a link benchmark asks for the link's byte counter at every step
    end ($GRADWIRE_NET_COUNTER, see gradwire.testing.shaped_link), else None."""
    from gradwire.testing.shaped_link import tx_bytes_reader

    read = tx_bytes_reader()
    return None if read is None else (read, [read()])


def _step_seconds(t0: float, ends: list[float]) -> list[float]:
    """Wall-clock seconds of each step, from the start of the loop and each step's end."""
    return [b - a for a, b in zip([t0] + ends[:-1], ends)]


def inprocess_device(choice: str) -> str:
    """The device of the single-process run: ``auto`` takes the GPU when torch sees one."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch.cuda.is_available() is False here (no GPU, or a CPU-only torch)")
    return choice


def _impl(codec) -> str:
    """The codec class that encoded, for the report."""
    return f"{type(codec).__module__}.{type(codec).__name__}"


def _tick(bar, loss, totals, tokens_done, t0):
    if bar is None:
        return
    raw, sent = totals
    bar.set_postfix_str(f"loss {loss:.3f} | {tokens_done / (time.perf_counter() - t0):,.0f} tok/s | "
                        f"wire {sent / 1e6:.3f} MB/step | {raw / max(sent, 1):.2f}x")
    bar.update(1)


def _own_gradient_norm(net, tp_group) -> None:
    """Make DeepSpeed's gradient clipping see every stage's gradients exactly once.

    ``deepspeed.runtime.utils.clip_grad_norm_`` counts a parameter that is not marked
    model-parallel only on rank 0 of the whole pipeline x tensor group, so without this the
    parameters of stage 1 and later would be left out of the clipping norm. Each stage owns its
    parameters (no tied layers here): mark them all, except that parameters replicated across a
    tensor-parallel group are marked on its rank 0 only (so they are counted once).
    """
    import torch.distributed as dist

    tp_rank = 0 if tp_group is None else dist.get_rank(group=tp_group)
    for p in net.parameters():
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            p.model_parallel = True


def run_deepspeed(args, ds_config, gw, gpt_cfg, tokens, world):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.pipe import PipelineModule

    from gradwire.integrations.deepspeed import initialize
    from gradwire.models.gpt import gpt_layers, lm_loss
    from gradwire.models.synthetic import TokenStream

    stages, tp = args.stages or world, args.tp
    cfg = dict(ds_config, gradwire=_section(gw))
    tp_group = None
    if tp == 1:
        net = PipelineModule(layers=gpt_layers(gpt_cfg, seed=args.seed), num_stages=stages,
                             loss_fn=lm_loss, partition_method="uniform")
    else:
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        from gradwire.integrations.deepspeed import codec_from_spec
        from gradwire.models.tp_gpt import new_tp_groups, tp_gpt_layers

        tp_group = new_tp_groups(world, tp)
        spec = _tp_codec(gw)
        layers = tp_gpt_layers(gpt_cfg, tp_group, lambda: codec_from_spec(spec), seed=args.seed,
                               base_seed=gw.seed)
        # axes pipe x data x model: the 'model' (tensor) axis is innermost, so DeepSpeed's
        # slice group is the same consecutive ranks as tp_group
        topo = PipeModelDataParallelTopology(num_pp=stages, num_mp=tp, num_dp=world // (stages * tp))
        net = PipelineModule(layers=layers, topology=topo, loss_fn=lm_loss, partition_method="uniform")
        # Boundary tensors travel whole from each TP rank to its peer in the next stage:
        # DeepSpeed's partitioned activation/gradient path is not exercised by gradwire's tests.
        cfg["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False, **cfg.get("pipeline", {})}
    _own_gradient_norm(net, tp_group)
    cfg.setdefault("steps_per_print", 10 ** 9)
    engine, _, _, _ = initialize(model=net, config=cfg,
                                 model_parameters=[p for p in net.parameters() if p.requires_grad])
    rank = dist.get_rank()
    micro, gas = batch_sizes(ds_config)
    # Stages of one pipeline read the same stream (stage 0 the inputs, the last the labels);
    # data-parallel replicas read different ones.
    dp_id = engine.grid.data_parallel_id
    data = TokenStream(tokens, gpt_cfg.seq_len, micro, seed=args.seed + 1 + 1000 * dp_id)
    losses, bar = [], progress(args, rank, args.steps)
    t0 = time.perf_counter()
    # Rank 0 is stage 0: it sees boundary 0 from the receiving side (bytes received per step).
    raw_per_step = gas * micro * gpt_cfg.seq_len * gpt_cfg.width * 4  # fp32 hidden-state gradients
    prev = 0
    ends, net = [], _net_counter()
    for step in range(args.steps):
        loss = float(engine.train_batch(data_iter=data))
        losses.append(loss)
        ends.append(time.perf_counter())
        if net:
            net[1].append(net[0]())
        if bar is not None:
            _tick(bar, loss, (raw_per_step, engine.gradwire_bytes_received - prev),
                  (step + 1) * gas * micro * gpt_cfg.seq_len, t0)
            prev = engine.gradwire_bytes_received
    if bar:
        bar.close()
    # Gather every rank's telemetry and channel counters to rank 0.
    mine = {"rows": engine.gradwire_rows(), "stage": engine.stage_id,
            "impl": [_impl(p.codec) for p in engine.gradwire_policies()],
            "sent": engine.gradwire_bytes_sent, "received": engine.gradwire_bytes_received,
            "dp": engine.gradwire_dp_bytes,
            # replicas of a stage must hold identical weights after compressed DP all-reduces
            "checksum": float(sum(p.detach().double().sum() for p in engine.module.parameters()))}
    if tp_group is not None:
        mine["tp"] = _tp_telemetry(engine, tp_group)
    from gradwire.comm.collectives import all_gather_json

    every = all_gather_json(mine)  # JSON, not all_gather_object's pickle from peers
    rows = [r for e in every for r in e["rows"]]
    info = {"stages": stages, "mode": "deepspeed-pipeline", "ranks": dist.get_world_size(),
            "step_seconds": _step_seconds(t0, ends),  # rank 0's view; every rank takes part in every step
            "net_tx_bytes": net[1] if net else None,
            "bytes_sent_by_rank": [e["sent"] for e in every],
            "bytes_received_by_rank": [e["received"] for e in every],
            "codec_impl": sorted({i for e in every for i in e["impl"]}),
            "param_checksum_by_rank": [(e["stage"], e["checksum"]) for e in every],
            "data_parallel": {"size": engine.grid.data_parallel_size,
                              "codec": gw.data_parallel.label if gw.data_parallel else "none",
                              "bytes_sent": sum(e["dp"]["sent"] for e in every),
                              "raw_bytes": sum(e["dp"]["raw"] for e in every)}}
    info["tensor_parallel"] = {"size": tp, "codec": _tp_codec(gw).label if tp > 1 else "none",
                               "bytes_sent": sum(e["tp"]["sent"] for e in every) if tp > 1 else 0,
                               "raw_bytes": sum(e["tp"]["raw"] for e in every) if tp > 1 else 0,
                               "by_rank": [e.get("tp") for e in every] if tp > 1 else []}
    dist.barrier()
    return losses, rows, info, rank


def _tp_codec(gw):
    """The codec of the TP backward all-reduces (``none`` when gradwire is disabled)."""
    from gradwire.config import CodecSpec

    return gw.tensor_parallel.codec if gw.enabled else CodecSpec()


def _tp_telemetry(engine, tp_group) -> dict:
    """This rank's TP collectives: bytes it sent, what a plain ring all-reduce would have sent,
    how many all-reduces ran, and a SHA-256 of the replicated parameters (every TP rank of a
    stage must hold them bit-identical)."""
    import hashlib

    import torch.distributed as dist

    from gradwire.models.tp_gpt import replicated_parameters, tp_comms

    comms = tp_comms(engine.module)
    h = hashlib.sha256()
    for name, p in replicated_parameters(engine.module):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"rank": dist.get_rank(), "stage": engine.stage_id, "tp_rank": dist.get_rank(tp_group),
            "dp_id": engine.grid.data_parallel_id, "sent": sum(c.bytes_sent for c in comms),
            "raw": sum(c.raw_bytes for c in comms), "collectives": sum(c.step for c in comms),
            "replicated_sha256": h.hexdigest()}


def _section(gw):
    """The validated section back as JSON (so initialize validates the same thing)."""
    d = {"enabled": gw.enabled, "seed": gw.seed, "refresh_every": gw.refresh_every,
         "stats_every": gw.stats_every, "warmup_steps": gw.warmup_steps,
         "data_parallel": gw.data_parallel.to_dict() if gw.data_parallel else None,
         "codec": gw.codec.to_dict(), "boundaries": {str(b): s.to_dict() for b, s in gw.boundaries},
         "tensor_parallel": gw.tensor_parallel.to_dict()}
    if gw.timeout is not None:
        d["timeout"] = gw.timeout
    return d


def _check_deepspeed_part(path, ds_config, world) -> None:
    """The DeepSpeed keys (gradwire.ds_config): typos, batch settings, and with one process what
    the in-process stages cannot honour. Unknown keys that are no typo are reported, not fatal."""
    from gradwire.ds_config import check_deepspeed, inprocess_optimizer, unknown_keys

    ignored = unknown_keys(ds_config)
    if ignored:
        print(f"train.py: warning: {path}: DeepSpeed ignores unknown top-level keys {ignored}", file=sys.stderr)
    check_deepspeed(ds_config, world)
    if world == 1:
        inprocess_optimizer(ds_config)


def main(argv=None) -> int:
    args = parse_args(argv)
    world = world_from_env()
    # Everything that can be wrong is checked before any process group or model exists.
    try:
        ds_config, gw = load_config(args.config)
        _check_deepspeed_part(args.config, ds_config, world)
        depth_layers = args.depth + 2
        tp = args.tp if args.tp is not None else gw.tensor_parallel.size
        if tp < 1:
            raise ConfigError(f"--tp must be >= 1, got {tp}")
        if tp > 1 and world == 1:
            raise ConfigError(f"tensor parallelism {tp} needs stages x {tp} ranks (one process runs "
                              f"the stages in-process, without TP): launch with e.g. "
                              f"torchrun --nproc_per_node {tp * (args.stages or 1)}, or set --tp 1")
        stages = args.stages or (max(1, world // tp) if world > 1 else 2)
        check_topology(world, stages, depth_layers, tp)
        gw.check_boundaries(stages)
        if world > 1 and stages > 2 and any(gw.codec_for(b).heterogeneous for b in range(stages - 1)):
            raise ConfigError("gradwire.codec.heterogeneous: allocating sparsity across boundaries "
                              "that live on different ranks is not implemented; run it with one "
                              "process (in-process stages) or set \"heterogeneous\": false")
        args.corpus = None
        if args.data == "stdlib":
            from gradwire.data.corpus import CorpusUnavailable, build_corpus

            try:
                args.corpus = build_corpus()
            except CorpusUnavailable as e:
                raise ConfigError(f"--data stdlib: {e}") from None
        elif args.data and not os.path.isfile(args.data):
            raise ConfigError(f"--data {args.data!r} is not a file (pass a UTF-8 text file)")
        if args.baseline and not os.path.exists(args.baseline):
            raise ConfigError(f"--baseline {args.baseline!r} does not exist (pass a report.json)")
        if world == 1:
            inprocess_device(args.device)  # --device cuda without a GPU: a config error, not a traceback
        from gradwire.models.gpt import GPTConfig

        try:
            gpt_cfg = GPTConfig(width=args.width, depth=args.depth, heads=args.heads, seq_len=args.seq_len)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if tp > 1:
            from gradwire.models.tp_gpt import check_tp_shape

            try:
                check_tp_shape(gpt_cfg, tp)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        for spec in [gw.codec_for(b) for b in range(stages - 1)]:
            if spec.name == "nm" and gpt_cfg.width % spec.m:
                raise ConfigError(f"codec {spec.label}: blocks of {spec.m} along the hidden dimension "
                                  f"need --width divisible by {spec.m} (got {gpt_cfg.width})")
        from gradwire.integrations.deepspeed import codec_from_spec

        for b in range(stages - 1):
            codec_from_spec(gw.codec_for(b))  # an impossible codec fails here, not mid-step
        if gw.data_parallel is not None:
            codec_from_spec(gw.data_parallel)
        if tp > 1:
            codec_from_spec(_tp_codec(gw))
        try:  # the embedded language or the text file: bad --vocab/--order/--data fail here
            data = build_data(args)
        except (ValueError, OSError) as e:
            what = f"--data {args.data!r}" if args.data else "--vocab/--order"
            raise ConfigError(f"{what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if tp > 1 and world // (stages * tp) > 1 and gw.data_parallel is not None and gw.data_parallel.name == "fp":
            # Measured: with an fp codec the TP ranks' replicated weights drift apart (see docs).
            raise ConfigError("gradwire.data_parallel: an 'fp' codec chooses its scale per packet, and "
                              "DeepSpeed's gradient buckets mix each TP rank's own shards with the "
                              "replicated parameters, so TP ranks would round their replicated "
                              "gradients differently and drift apart; with --tp > 1 use 'bf16' or "
                              "'none' for data_parallel, or run without data-parallel replicas")
    except ConfigError as e:
        print(f"train.py: configuration error: {e}", file=sys.stderr)
        return 2
    args.stages, args.tp = stages, tp
    torch.set_num_threads(max(1, args.threads))
    tokens, vocab, floor, data_name = data
    gpt_cfg = GPTConfig(vocab=vocab, width=args.width, depth=args.depth, heads=args.heads, seq_len=args.seq_len)
    t0 = time.perf_counter()
    rank = 0
    if world > 1:
        import deepspeed

        # Under mpirun DeepSpeed's MPI discovery sets MASTER_PORT from distributed_port; honour
        # a MASTER_PORT the user exported (default 29500, DeepSpeed's own).
        import datetime

        # gradwire.timeout also bounds DeepSpeed's own waits (else its 10 min / $DEEPSPEED_TIMEOUT)
        kw = {} if gw.timeout is None else {"timeout": datetime.timedelta(seconds=gw.timeout)}
        deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo",
                                   distributed_port=int(os.environ.get("MASTER_PORT", 29500)), **kw)
        losses, rows, info, rank = run_deepspeed(args, ds_config, gw, gpt_cfg, tokens, world)
    else:
        losses, rows, info = run_inprocess(args, ds_config, gw, gpt_cfg, tokens)
    elapsed = time.perf_counter() - t0
    if rank == 0:
        _finish(args, gw, gpt_cfg, losses, rows, info, floor, data_name, elapsed, ds_config)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


def _finish(args, gw, gpt_cfg, losses, rows, info, floor, data_name, elapsed, ds_config):
    from gradwire.report import WireLog, summarize, summary_table, write_report

    log = WireLog()
    log.extend(rows)
    name = os.path.splitext(os.path.basename(args.config))[0]
    micro, gas = batch_sizes(ds_config)
    rep = summarize(log, losses, {
        "run": name, "config": os.path.abspath(args.config),
        "codec": ", ".join(sorted({gw.codec_for(b).label for b in range(info["stages"] - 1)})),
        "data": data_name, "entropy_floor": floor, "model": gpt_cfg.__dict__,
        "micro_batch": micro, "micro_batches_per_step": gas, "seconds": elapsed,
        "tokens_per_second": args.steps * micro * gas * gpt_cfg.seq_len / elapsed,
        "argv": sys.argv, **info})
    baseline = None
    if args.baseline:
        with open(args.baseline, encoding="utf-8") as f:
            baseline = json.load(f)
    out = args.report_dir or gw.report_dir or os.path.join("reports", name)
    paths = write_report(out, rep, baseline)
    print(summary_table(rep, baseline))
    if "val_loss" in info:
        print(f"validation loss (held-out split): {info['val_loss']:.4f}")
    tpi = info.get("tensor_parallel") or {}
    if tpi.get("size", 1) > 1:
        # beside the pipeline-boundary bytes of the table: the TP backward all-reduces
        print(f"tensor parallel: {tpi['size']} ranks/stage, codec {tpi['codec']}: "
              f"{tpi['bytes_sent']:,} B sent by the backward all-reduces "
              f"(uncompressed ring all-reduce: {tpi['raw_bytes']:,} B, "
              f"{tpi['raw_bytes'] / max(tpi['bytes_sent'], 1):.2f}x)")
    print(f"report: {', '.join(paths)}")


if __name__ == "__main__":
    sys.exit(main())
