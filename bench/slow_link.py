"""Does compression buy training time on a slow link? Step times on a shaped link, end to end.

    python bench/slow_link.py                                # everything (tens of minutes)
    python bench/slow_link.py --jobs pipeline --rates 100,10 --variants none,fp6
    python bench/slow_link.py --report-only                  # tables and plot from saved runs

Needs root (network namespaces, tc). Every job runs inside a network namespace of its own
(``gradwire.testing.shaped_link``) whose loopback is shaped with tc tbf to the rate: all ranks
talk over 127.0.0.1 inside it, so all traffic, both directions, shares one queue of that rate
(a shared-medium link, not full duplex). The namespace is removed after each run, also on failure.

Jobs (2 ranks each, gloo):
  pipeline  the main job, two DeepSpeed pipeline stages (``deepspeed --num_gpus 2 launch/train.py``),
            width 256, sequence 128: the codec compresses the boundary's backward gradient
  tp        the main job with one stage split over 2 tensor-parallel ranks (``--tp 2``): the codec
            compresses the backward all-reduces
  ddp       ``bench/ddp_job.py``: the same model family under DDP with torch's allreduce,
            fp16_compress_hook and PowerSGD hooks beside gradwire's hook

For every run: step time (median and 10-90% spread over the steps after warm-up), bytes the link
carried per step (the namespace loopback's own counter, read by rank 0 at every step end: control
messages and TCP/IP headers included), the link rate measured by a socket transfer just before,
qdisc drops, and the final loss. The **ideal** step time of a run is its compute-only time (the
same job and variant on the unshaped link) plus its bytes per step at the measured rate; the
report gives measured/ideal per run and, per rate, each variant's speedup over the uncompressed
run beside the speedup its bytes allow. Per-message latency is not modelled (tbf adds no delay of
its own; queueing is what the bytes cost).

The harness checks itself: the uncompressed pipeline job runs once without any namespace beside
the unshaped namespace (same step time expected), and every run records tbf drops (a shallow
queue that drops the bursts of large messages would fake a speedup for compression).

Results: one JSON per run under bench/results/slow_link/runs/ (reused on re-runs: delete a file
to re-measure it), and bench/results/slow_link.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gradwire.testing.shaped_link import NET_COUNTER_ENV, ShapedNamespace, available  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")
RUNS = os.path.join(RESULTS, "slow_link", "runs")
RATES = {"unlimited": None, "1000": 1000.0, "100": 100.0, "10": 10.0}  # Mbit/s
CODECS = {  # pipeline boundary / tensor-parallel codecs
    "none": {"name": "none"}, "bf16": {"name": "bf16"}, "fp8": {"name": "fp", "bits": 8},
    "fp6": {"name": "fp", "bits": 6}, "fp4": {"name": "fp", "bits": 4},
    "nm24-fp8": {"name": "nm", "n": 2, "m": 4, "method": "mvue", "value_bits": 8},
    "prune80": {"name": "prune", "sparsity": 0.8},
}
DDP_VARIANTS = {  # name -> ddp_job.py arguments
    "none": ["--hook", "allreduce"], "torch-fp16": ["--hook", "fp16"], "powersgd": ["--hook", "powersgd"],
    "bf16": ["--hook", "gradwire", "--codec", '{"name": "bf16"}'],
    "fp8": ["--hook", "gradwire", "--codec", '{"name": "fp", "bits": 8}'],
    "fp6": ["--hook", "gradwire", "--codec", '{"name": "fp", "bits": 6}'],
}
JOB_SHAPES = {  # model sizes where the crossing bytes matter, sized to keep a 10 Mbit/s step < 10 s
    "pipeline": ["--width", "256", "--seq-len", "128"],
    "tp": ["--width", "128", "--seq-len", "64", "--stages", "1", "--tp", "2"],
    "ddp": ["--width", "128", "--seq-len", "64"],
}
WARMUP = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_config(job: str, variant: str, tmp: str) -> str:
    """A DeepSpeed JSON (the shipped baseline's training settings) with the variant's codec."""
    with open(os.path.join(ROOT, "configs", "baseline.json")) as f:
        cfg = json.load(f)
    gw = {"seed": 0, "codec": {"name": "none"}}
    if job == "pipeline":
        gw["codec"] = CODECS[variant]
    else:
        gw["tensor_parallel"] = {"size": 2, "codec": CODECS[variant]}
    cfg["gradwire"] = gw
    path = os.path.join(tmp, f"{job}-{variant}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def job_argv(job: str, variant: str, steps: int, tmp: str, out: str) -> list[str]:
    if job == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), os.path.join(ROOT, "bench", "ddp_job.py"), *DDP_VARIANTS[variant],
                "--steps", str(steps), "--out", os.path.join(out, "report.json"), *JOB_SHAPES[job]]
    return ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), os.path.join(ROOT, "launch", "train.py"),
            "--config", job_config(job, variant, tmp), "--steps", str(steps), "--no-progress",
            "--report-dir", out, *JOB_SHAPES[job]]


def steps_for(rate: str) -> int:
    return {"unlimited": 14, "1000": 14, "100": 12, "10": 8}[rate]


def summarize_run(rep: dict, probe_bps: float | None, drops: int, wall: float) -> dict:
    st = rep["step_seconds"][WARMUP:]
    net = rep.get("net_tx_bytes") or []
    per_step = [b - a for a, b in zip(net, net[1:])][WARMUP:]
    q = statistics.quantiles(st, n=10) if len(st) >= 2 else [st[0]] * 9
    losses = rep.get("loss") or rep.get("losses")
    return {"step_median_s": statistics.median(st), "step_p10_s": q[0], "step_p90_s": q[-1],
            "steps_timed": len(st), "bytes_per_step": statistics.median(per_step) if per_step else None,
            "link_bps": probe_bps, "tbf_drops": drops, "final_loss": float(losses[-1]), "wall_s": wall}


def run_one(job: str, variant: str, rate: str, *, namespace: bool = True, timeout: float = 900) -> dict:
    """Run one (job, variant, rate) and return its summary (cached under RUNS)."""
    tag = f"{job}__{variant}__{rate}" + ("" if namespace else "__no-namespace")
    path = os.path.join(RUNS, tag + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    steps = steps_for(rate)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        os.makedirs(out)
        argv = job_argv(job, variant, steps, tmp, out)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t0 = time.perf_counter()
        if namespace:
            env[NET_COUNTER_ENV] = "lo"
            with ShapedNamespace(rate_mbit=RATES[rate]) as ns:
                probe = ns.measure_rate()
                res = ns.run(argv, timeout=timeout, env=env, cwd=ROOT)
                drops = ns.qdisc_stats()["drops"]
        else:
            probe, drops = None, 0
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
            res = subprocess.CompletedProcess(argv, res.returncode, res.stdout + res.stderr, "")
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"{tag}: exit {res.returncode}\n{res.stdout[-4000:]}")
        with open(os.path.join(out, "report.json")) as f:
            rep = json.load(f)
    row = {"job": job, "variant": variant, "rate": rate, "namespace": namespace, "steps": steps,
           "load_average_after": [round(x, 2) for x in os.getloadavg()],
           **summarize_run(rep, probe, drops, wall)}
    os.makedirs(RUNS, exist_ok=True)
    with open(path, "w") as f:
        json.dump(row, f, indent=1)
    return row


def analyse(rows: list[dict]) -> list[dict]:
    """Add compute-only time, ideal step time and the fractions to each namespaced run."""
    base = {(r["job"], r["variant"]): r for r in rows if r["rate"] == "unlimited" and r["namespace"]}
    out = []
    for r in rows:
        if not r["namespace"]:
            continue
        b = base.get((r["job"], r["variant"]))
        r = dict(r)
        if b and r["rate"] != "unlimited" and r["bytes_per_step"] is not None and r["link_bps"]:
            r["compute_s"] = b["step_median_s"]
            r["ideal_s"] = b["step_median_s"] + 8 * r["bytes_per_step"] / r["link_bps"]
            r["of_ideal"] = r["ideal_s"] / r["step_median_s"]
        out.append(r)
    for r in out:  # speedups against the uncompressed run of the same job and rate
        ref = next((u for u in out if u["job"] == r["job"] and u["rate"] == r["rate"] and u["variant"] == "none"), None)
        if ref is not None and r is not ref:
            r["speedup"] = ref["step_median_s"] / r["step_median_s"]
            if "ideal_s" in r and "ideal_s" in ref:
                r["ideal_speedup"] = ref["ideal_s"] / r["ideal_s"]
                r["of_ideal_speedup"] = r["speedup"] / r["ideal_speedup"]
    return out


def write_report(rows: list[dict], harness: dict) -> None:
    done = analyse(rows)
    with open(os.path.join(RESULTS, "slow_link.json"), "w") as f:
        json.dump({"harness": harness, "runs": done}, f, indent=1)
    lines = ["# Slow-link benchmark (`python bench/slow_link.py`)", "",
             "Two ranks in a network namespace whose loopback is shaped with tc tbf (shared queue, both",
             "directions). step = median over the steps after 2 warm-up steps (10-90% spread);",
             "bytes/step = the link's own counter; ideal = compute-only step (same run, unshaped link)",
             "+ bytes/step at the measured rate; speedup vs the uncompressed run at the same rate.", "",
             "## Harness check", ""]
    for k, v in harness.items():
        lines.append(f"- {k}: {v}")
    for job in ("pipeline", "tp", "ddp"):
        rs = [r for r in done if r["job"] == job]
        if not rs:
            continue
        lines += ["", f"## {job}", "",
                  "| rate | variant | step s (p10-p90) | MB/step | link Mbit/s | drops | ideal s | of ideal | speedup | ideal speedup | of ideal speedup | final loss |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: (list(RATES).index(r["rate"]), r["variant"])):
            def f(k, fmt="{:.2f}"):
                return fmt.format(r[k]) if r.get(k) is not None else ""
            mb = "" if r.get("bytes_per_step") is None else f"{r['bytes_per_step'] / 1e6:.3f}"
            mbit = "" if not r.get("link_bps") else f"{r['link_bps'] / 1e6:.1f}"
            lines.append(f"| {r['rate']} | {r['variant']} | {r['step_median_s']:.3f} ({r['step_p10_s']:.3f}-{r['step_p90_s']:.3f}) "
                         f"| {mb} | {mbit} | {r['tbf_drops']} "
                         f"| {f('ideal_s', '{:.3f}')} | {f('of_ideal')} | {f('speedup')} | {f('ideal_speedup')} "
                         f"| {f('of_ideal_speedup')} | {r['final_loss']:.4f} |")
    with open(os.path.join(RESULTS, "slow_link.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(done)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = [j for j in ("pipeline", "tp", "ddp") if any(r["job"] == j for r in rows)]
    if not jobs:
        return
    fig, axes = plt.subplots(1, len(jobs), figsize=(6 * len(jobs), 4.5), squeeze=False)
    for ax, job in zip(axes[0], jobs):
        rs = [r for r in rows if r["job"] == job and r["rate"] != "unlimited"]
        for i, v in enumerate(sorted({r["variant"] for r in rs})):
            pts = sorted(((RATES[r["rate"]], r) for r in rs if r["variant"] == v), key=lambda t: t[0])
            c = f"C{i}"
            ax.plot([p for p, _ in pts], [r["step_median_s"] for _, r in pts], "o-", color=c, label=v)
            ideal = [(p, r["ideal_s"]) for p, r in pts if "ideal_s" in r]
            if ideal:
                ax.plot(*zip(*ideal), ":", color=c)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("link rate (Mbit/s)")
        ax.set_ylabel("step time (s); dotted: ideal")
        ax.set_title(job)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "slow_link.png"), dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="pipeline,tp,ddp")
    ap.add_argument("--rates", default=",".join(RATES), help="Mbit/s values among " + ",".join(RATES))
    ap.add_argument("--variants", default=None, help="comma list (default: all for each job)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--note", default=None, help="a sentence for the report (e.g. the machine's state)")
    args = ap.parse_args(argv)
    # SIGTERM -> SystemExit, so the namespace context managers remove their namespaces.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = []
    if os.path.isdir(RUNS):
        for name in sorted(os.listdir(RUNS)):
            with open(os.path.join(RUNS, name)) as f:
                rows.append(json.load(f))
    harness = {}
    if not args.report_only:
        ok, why = available()
        if not ok:
            print(f"slow_link: cannot shape a link here: {why}", file=sys.stderr)
            return 2
        rates = [r.strip() for r in args.rates.split(",")]
        if bad := [r for r in rates if r not in RATES]:
            ap.error(f"unknown rate(s) {bad}; choose from {list(RATES)}")
        for job in args.jobs.split(","):
            variants = list(DDP_VARIANTS if job == "ddp" else CODECS)
            if args.variants:
                variants = [v for v in args.variants.split(",") if v in variants]
            # The compute-only run first, then the shaped ones right after it, variant by variant:
            # on a shared machine the load drifts, and an ideal computed from a compute time
            # measured minutes apart would carry that drift.
            order = ["unlimited"] + [r for r in rates if r != "unlimited"]
            for v in variants:
                for rate in order:
                    print(f"{job:8s} {rate:>9s} {v:10s} ...", end=" ", flush=True)
                    r = run_one(job, v, rate)
                    rows = [x for x in rows if (x["job"], x["variant"], x["rate"], x["namespace"]) !=
                            (job, v, rate, True)] + [r]
                    print(f"step {r['step_median_s']:.3f} s, {(r['bytes_per_step'] or 0) / 1e6:.3f} MB/step, "
                          f"link {(r['link_bps'] or 0) / 1e6:.1f} Mbit/s, drops {r['tbf_drops']}", flush=True)
                    if (job, v, rate) == ("pipeline", "none", "unlimited"):
                        # the harness check: the same run without any namespace, right after
                        plain = run_one("pipeline", "none", "unlimited", namespace=False)
                        rows = [x for x in rows if x["namespace"] or x["job"] != "pipeline"] + [plain]
    plain = next((r for r in rows if not r["namespace"]), None)
    ns = next((r for r in rows if r["namespace"] and (r["job"], r["variant"], r["rate"]) == ("pipeline", "none", "unlimited")), None)
    if plain and ns:
        harness["unshaped namespace / no namespace, uncompressed pipeline step"] = (
            f"{ns['step_median_s']:.3f} s / {plain['step_median_s']:.3f} s = {ns['step_median_s'] / plain['step_median_s']:.3f}")
    harness["runs with tbf drops"] = sum(1 for r in rows if r["tbf_drops"])
    harness["load average at report time"] = [round(x, 2) for x in os.getloadavg()]
    if args.note:
        harness["note"] = args.note
    write_report(rows, harness)
    print("wrote", os.path.join(RESULTS, "slow_link.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
