"""Benchmark sam2flow against Meta's reference on identical weights, images and prompts.

    python -m benchmarks.run [--quick] [--sizes hiera_tiny,hiera_small] [--device cpu|cuda|cpu,cuda]
                             [--cases embed,decode,step,automatic,memory,click,store] [--json FILE]
                             [--markdown BENCHMARKS.md] [--chart benchmarks/chart.png]

Prints machine facts and a table (ours, reference, unit, ratio = how many times faster we are);
writes BENCHMARKS.md with the table and a PNG chart, and with ``--json`` the figures as
``{"machine": {...}, "cases": {"embed": {...}, "decode": {...}, "step": {...}, "automatic": {...},
"memory": {...}}}``. ``--quick`` takes minutes on a small CPU (few repeats, 16 points per side for the
automatic case); the full mode takes much longer. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import sam2flow.engine  # noqa: F401  (before torch: it sets libgomp's wait policy, engine/threads.py)

# isort: split
import torch

from sam2flow.engine import precision

from . import cases, data, report
from . import machine as mach
from .timing import synchronizer

ROOT = Path(__file__).resolve().parent.parent
ALL_CASES = ("embed", "decode", "step", "automatic", "memory", "click", "store")
DEFAULT_SIZES = "hiera_tiny,hiera_small"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="few repeats, 1 warm-up, 16 points per side (minutes)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated versions (default {DEFAULT_SIZES})")
    p.add_argument("--family", default="sam2.1", choices=("sam2.1", "sam2"))
    p.add_argument("--device", default="auto", help="cpu, cuda, or a comma list; auto: cpu, plus cuda when available")
    p.add_argument("--cases", default=",".join(ALL_CASES), help=f"comma-separated subset of {','.join(ALL_CASES)}")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument(
        "--markdown",
        metavar="FILE",
        default=str(ROOT / "BENCHMARKS.md"),
        help="write the report here (default BENCHMARKS.md at the repository root; 'none' to skip)",
    )
    p.add_argument(
        "--chart",
        metavar="PNG",
        default=None,
        help="chart path (default benchmarks/chart.png; next to --markdown when that is elsewhere)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads for both sides (default: torch's choice)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 encoder rows")
    p.add_argument(
        "--no-exported",
        action="store_true",
        help="skip the ONNX Runtime and OpenVINO rows of Meta's exported encoder (CPU embed case)",
    )
    p.add_argument(
        "--no-int8",
        action="store_true",
        help="skip the 'ours (int8 weights)' and 'ours (int8)' rows (CPU, OpenVINO; quantised once, then cached)",
    )
    p.add_argument(
        "--no-graphs",
        action="store_true",
        help="skip the 'ours (graphs)' rows (CPU: GraphEngine on exported OpenVINO graphs, exported once, then cached)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="add 'ours (compiled)' embed rows: torch.compile'd encoder at dtype=auto (compile time noted)",
    )
    p.add_argument("--warmup", type=int, help="override every case's warm-up count")
    p.add_argument("--repeats", type=int, help="override every case's repeat count")
    p.add_argument("--step-images", type=int, help="images per step run (quick 2, full 8)")
    p.add_argument("--points-per-side", type=int, help="automatic case grid (quick 16, full 32)")
    p.add_argument("--checkpoint-dir", help="keep the generated checkpoints here (default: a temporary folder)")
    a = p.parse_args(argv)
    a.sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    a.cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in a.cases if c not in ALL_CASES]
    if bad:
        p.error(f"unknown case(s) {', '.join(bad)}: choose from {', '.join(ALL_CASES)}")
    from sam2flow.models.registry import VERSIONS

    bad = [s for s in a.sizes if s not in VERSIONS]
    if bad:
        p.error(f"unknown size(s) {', '.join(bad)}: choose from {', '.join(VERSIONS)}")
    if a.device == "auto":
        a.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        a.devices = [d.strip() for d in a.device.split(",") if d.strip()]
        for d in a.devices:
            if d not in ("cpu", "cuda"):
                p.error(f"unknown device {d!r}: cpu or cuda")
            if d == "cuda" and not torch.cuda.is_available():
                p.error("--device cuda: no CUDA GPU is available here")
    return a


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def matmul_rates(device: torch.device) -> dict:
    out = {"n": mach.MATMUL_N, "fp32": mach.matmul_gflops(device, torch.float32)}
    if precision.native_bf16(device):
        out["bf16"] = mach.matmul_gflops(device, torch.bfloat16)
    else:
        out["bf16"] = None
        out["bf16_note"] = "not measured: no bf16 arithmetic in hardware here (emulated bf16 is ~100x slower)"
    return out


def int8_engines(ckpt, device: str, log) -> dict:
    """Our OpenVINO int8 engines for the CPU rows (``cases.OURS_INT8W``, ``cases.OURS_INT8``): int8 weights in
    float32, and int8 calibrated on ``data.calibration_images`` at ``dtype="auto"``. Each is quantised once per
    checkpoint (then read from the cache); one that cannot be made is left out with a logged line."""
    wanted = {
        cases.OURS_INT8W: dict(dtype="float32", quantize="int8-weights"),
        cases.OURS_INT8: dict(dtype="auto", quantize="int8", calibration=data.calibration_images()),
    }
    out = {}
    for name, kw in wanted.items():
        log(f"loading {name}")
        try:
            out[name] = data.load_ours(ckpt, device, backend="openvino", **kw)
        except ValueError as e:
            log(f"{name}: not measured: {e}")
    return out


def bf16_engine(args, ckpt, device: torch.device, ours, key: str, machine: dict):
    """Our engine with a bf16 image encoder, or None with the reason recorded in ``machine['bf16']``."""
    if args.no_bf16:
        machine["bf16"][key] = "skipped (--no-bf16)"
        return None, "skipped (--no-bf16)"
    if not precision.native_bf16(device):
        note = (
            "skipped: this CPU has no avx512_bf16/amx_bf16, and emulated bf16 is ~100x slower"
            if device.type == "cpu"
            else "skipped: this GPU does not support bf16"
        )
        machine["bf16"][key] = note
        return None, note
    engine = data.load_ours(ckpt, str(device), dtype="bfloat16")
    mean, low = cases.bf16_mask_iou(ours, engine)
    if mean < cases.IOU_GUARD:
        note = f"rejected: mean mask IoU vs float32 {mean:.3f} < {cases.IOU_GUARD} (min {low:.3f})"
        machine["bf16"][key] = note
        return None, note
    note = f"mask IoU vs float32 mean {mean:.3f}, min {low:.3f} (guard: mean >= {cases.IOU_GUARD})"
    machine["bf16"][key] = note
    return engine, note


def bf16_verdicts(results: dict, machine: dict) -> None:
    """Keep the bf16 path only where it wins: compare it with our float32 rows of the same run."""
    for case in ("embed", "step"):
        for key, e in results.get(case, {}).items():
            if e["variant"] != cases.OURS_BF16:
                continue
            fp32 = results[case].get(key[: -len(" bf16")])
            if fp32 is None:
                continue
            speedup = fp32["ours"] / e["ours"] if not e["higher_is_better"] else e["ours"] / fp32["ours"]
            e["speedup_vs_fp32"] = speedup
            e["kept"] = speedup > 1.0
    verdicts = {}
    for case in ("embed", "step"):
        for e in results.get(case, {}).values():
            if "kept" in e:
                verdicts[f"{e['device']} {e['size']} {case} {e['config']}"] = (
                    f"{'wins' if e['kept'] else 'loses'}: {e['speedup_vs_fp32']:.2f}x vs our float32"
                )
    if verdicts:
        machine["bf16_verdicts"] = verdicts


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings = cases.Settings.make(args.quick, args.warmup, args.repeats, args.step_images, args.points_per_side)
    if args.quick and args.warmup is None and any(c in args.cases for c in ("embed", "decode", "step")):
        settings.auto_warmup = 0  # the cases before it have warmed both sides' encoder and decoder up
    if args.warmup is None and "cuda" in args.devices:
        # On a GPU the first call at a new shape pays one-off costs (our encoder's CUDA graph capture for
        # that batch size, cuDNN plans on both sides): every case warms up at least once there.
        settings.embed_b4_warmup = max(settings.embed_b4_warmup, 1)
        settings.auto_warmup = max(settings.auto_warmup, 1)
    command = "python -m benchmarks.run " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))

    machine = mach.facts(args.devices)
    machine["generated_at"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    machine["quick"] = args.quick
    machine["command"] = command
    machine["settings"] = vars(settings)
    machine["weights"], machine["bf16"], machine["matmul_gflops"] = {}, {}, {}
    load = machine["load_average_at_start"]
    cores = machine["physical_cores"] or machine["logical_cpus"] or 1
    if load and load[0] > 0.25 * cores:
        machine["busy_warning"] = (
            f"load average {load[0]} on {cores} cores when the run started: other work "
            "competes for the CPU, timings are noisy (ratios less so, as both sides are "
            "interleaved)"
        )
        log("WARNING: " + machine["busy_warning"])
    if machine["physical_cores"] and machine["torch_threads"] > machine["physical_cores"]:
        log(f"note: torch uses {machine['torch_threads']} threads on {machine['physical_cores']} physical cores")

    for d in args.devices:
        log(f"measuring {mach.MATMUL_N}² matmul rate on {d}")
        machine["matmul_gflops"][d] = matmul_rates(torch.device(d))

    results: dict[str, dict] = {c: {} for c in ALL_CASES if c in args.cases}
    tmp = None
    ckpt_dir = (
        Path(args.checkpoint_dir) if args.checkpoint_dir else Path(tmp := tempfile.mkdtemp(prefix="sam2flow-bench-"))
    )
    try:
        for size in args.sizes:
            log(f"{size}: preparing the checkpoint")
            ckpt = data.make_checkpoint(size, args.family, ckpt_dir)
            machine["weights"][size] = ckpt.weights
            log(f"{size}: weights: {ckpt.weights}")
            for d in args.devices:
                device = torch.device(d)
                timed = [c for c in ALL_CASES if c in args.cases and c != "memory"]
                if timed:
                    log(f"{size} on {d}: loading ours and the reference")
                    ours = data.load_ours(ckpt, d)
                    machine.setdefault("backend", {})[f"{d} {size}"] = ours.backend
                    other = "openvino" if ours.backend == "torch" else "torch"
                    ours_alt = None
                    if device.type == "cpu" and any(c in ("embed", "step") for c in timed):
                        ours_alt = data.load_ours(ckpt, d, backend=other)
                        if ours_alt.backend != other:  # OpenVINO fell back to torch: nothing new to measure
                            ours_alt = None
                    ref_model, predictor = data.load_reference(ckpt, d)
                    exported = None
                    if device.type == "cpu" and "embed" in timed and not args.no_exported:
                        from .exported import MetaExported

                        exported = MetaExported(ref_model, predictor, log)
                    bf16, bf16_note = (None, "")
                    if any(c in ("embed", "step", "click") for c in timed):
                        bf16, bf16_note = bf16_engine(args, ckpt, device, ours, f"{d} {size}", machine)
                        log(f"{size} on {d}: bf16 encoder {bf16_note}")
                    alt_bf16 = None
                    if bf16 is not None and ours_alt is not None:  # bf16 native here and past its guard
                        alt_bf16 = data.load_ours(ckpt, d, dtype="bfloat16", backend=other)
                    int8 = {}
                    if device.type == "cpu" and any(c in ("embed", "step") for c in timed) and not args.no_int8:
                        int8 = int8_engines(ckpt, d, log)
                    graph_engines = {}
                    if device.type == "cpu" and any(c in ("decode", "step") for c in timed) and not args.no_graphs:
                        graphs = data.graphs_for(ckpt, log)
                        graph_engines = {cases.OURS_GRAPHS: data.load_graphs(graphs, "float32")}
                        auto = data.load_graphs(graphs, "auto")
                        if (auto.dtype, auto.quantize) != ("float32", "none"):
                            graph_engines[cases.OURS_GRAPHS_AUTO] = auto
                    compiled = None
                    if args.compile and "embed" in timed:
                        log(f"{size} on {d}: compiling our encoder (torch.compile, dtype auto)")
                        compiled = data.load_ours(ckpt, d, dtype="auto", compile=True)
                        machine.setdefault("compile", {})[f"{d} {size}"] = (
                            f"{compiled.compile_seconds:.0f} s to compile and warm up at batch 1 "
                            f"({str(compiled.dtype).replace('torch.', '')}); batch 4 compiles once more on first use"
                        )
                        log(f"{size} on {d}: {machine['compile'][f'{d} {size}']}")
                    ctx = cases.Context(
                        size,
                        device,
                        ckpt,
                        ours,
                        bf16,
                        bf16_note,
                        ref_model,
                        predictor,
                        settings,
                        synchronizer(device),
                        log,
                        torch.get_num_threads(),
                        ours_compiled=compiled,
                        ours_alt=ours_alt,
                        ours_alt_bf16=alt_bf16,
                        exported=exported,
                        ours_int8=int8,
                        ours_graphs=graph_engines,
                    )
                    for case in timed:
                        for e in getattr(cases, f"case_{case}")(ctx):
                            suffix = {cases.OURS: "", cases.OURS_BF16: " bf16", cases.OURS_COMPILED: " compiled"}.get(
                                e["variant"], f" {e['variant']}"
                            )
                            key = f"{d} {size} {e['config']}{suffix}"
                            results[case][key] = e
                            log(
                                f"  {case} {key}: ours {report.fmt(e['ours'])} {e['unit']}, reference "
                                f"{report.fmt(e['reference'])}, ratio {e['ratio']:.2f}x"
                            )
                    del (
                        ctx,
                        ours,
                        ours_alt,
                        alt_bf16,
                        exported,
                        ref_model,
                        predictor,
                        bf16,
                        compiled,
                        int8,
                        graph_engines,
                    )
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if "memory" in args.cases:
                    graphs = data.graphs_for(ckpt, log) if device.type == "cpu" and not args.no_graphs else None
                    for e in cases.case_memory(size, ckpt, device, settings, args.threads, log, graphs):
                        suffix = "" if e["variant"] == cases.OURS else f" {e['variant']}"
                        key = f"{d} {size} {e['config']}{suffix}"
                        results["memory"][key] = e
                        log(
                            f"  memory {key}: {e['variant']} {report.fmt(e['ours'])} MiB, "
                            f"reference {report.fmt(e['reference'])} MiB"
                        )
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    machine["load_average_at_end"] = mach.load_average()
    bf16_verdicts(results, machine)

    print()
    print("Machine:")
    for line in report.machine_lines(machine):
        print("  " + line[2:])
    for line in report.fast_path_lines(machine) + report.physical_limit_lines(results, machine):
        print("  " + line[2:])
    if machine.get("busy_warning"):
        print("  WARNING: " + machine["busy_warning"])
    print()
    print(report.text_table(results))
    print()

    if args.json:
        report.write_json(Path(args.json), machine, results)
        log(f"wrote {args.json}")
    if args.markdown and args.markdown.lower() != "none":
        md = Path(args.markdown)
        if args.chart:
            chart_path = Path(args.chart)
        elif md.resolve().parent == ROOT:
            chart_path = ROOT / "benchmarks" / "chart.png"
        else:
            chart_path = md.parent / "chart.png"
        title = f"sam2flow vs reference ({machine['cpu_model']}, {', '.join(args.devices)})"
        report.chart(results, chart_path, title)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(report.markdown(results, machine, chart_path, md, command))
        log(f"wrote {md} and {chart_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
