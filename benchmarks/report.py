"""Results → a text table on stdout, JSON, BENCHMARKS.md and a PNG chart."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

CASE_TITLES = {
    "embed": "1. Image embedding",
    "decode": "2. Box decoding (multimask, best of three, full-resolution masks)",
    "step": "3. Workflow step end to end (numpy image → sv.Detections)",
    "automatic": "4. Unprompted (automatic mask generation)",
    "memory": "5. Peak resident memory of case 3 (each side in its own process)",
    "click": "6. One click on a cached embedding (1-5 points + previous mask), over HTTP on loopback",
    "store": "7. First click on an image whose embedding is in the store (vs encoding it)",
}


def fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, int):
        return str(x)
    if x == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
    return f"{x:,.{digits}f}"


def notes(e: dict) -> str:
    parts = []
    if "achieved_gflops" in e:
        parts.append(
            f"{fmt(e['achieved_gflops'])} GFLOP/s (ref {fmt(e['reference_gflops'])}), "
            f"{fmt(e['encoder_gflop_per_image'])} GFLOP/image"
        )
    if "mask_iou_vs_reference" in e:
        parts.append(f"mask IoU vs ref {e['mask_iou_vs_reference']:.3f}")
    if "mask_iou_vs_fp32" in e:
        parts.append(f"mask IoU vs fp32 {e['mask_iou_vs_fp32']:.3f}")
    if "detections_ours" in e:
        parts.append(f"detections {e['detections_ours']}/{e['detections_reference']}")
    if "masks_ours" in e:
        parts.append(f"masks found {e['masks_ours']}/{e['masks_reference']}")
    if "after_load_mib" in e:
        a, b = e["after_load_mib"], e["baseline_mib"]
        parts.append(
            f"after imports {fmt(b['ours'])}/{fmt(b['reference'])}, "
            f"after load {fmt(a['ours'])}/{fmt(a['reference'])} MiB"
        )
    if "ours_percentiles_ms" in e:
        p = e["reference_percentiles_ms"]
        parts.append(f"p50/p90/p99 {_percentiles(e['ours_percentiles_ms'])} ms (ref {_percentiles(p)})")
        parts.append("stages " + ", ".join(f"{k} {fmt(v)}" for k, v in e["ours_stages_ms"].items()) + " ms")
    if "paced_percentiles_ms" in e:
        on, off = _percentiles(e["paced_percentiles_ms"]), _percentiles(e["paced_no_spin_percentiles_ms"])
        parts.append(f"one click every 250 ms, ours alone: p50/p90/p99 {on} ms (click_spin_ms 0: {off})")
    if "segment_image_percentiles_ms" in e:
        parts.append(
            f"/sam2/segment_image, ours alone: p50/p90/p99 {_percentiles(e['segment_image_percentiles_ms'])} ms"
        )
    if "ours_new_image_ms" in e:
        parts.append(
            f"ours on a new image {fmt(e['ours_new_image_ms'])} ms (mask IoU stored vs new "
            f"{e['mask_iou_stored_vs_new']:.3f})"
        )
    if e.get("reference_mode") not in (None, "reference"):
        parts.append(f"vs {e['reference_mode']}")
    parts.append(f"n={e['repeats']}")
    return "; ".join(parts)


def ratio_text(e: dict) -> str:
    return f"{e['ratio']:.2f}×"


def table_rows(results: dict) -> list[list[str]]:
    out = []
    for case, entries in results.items():
        for e in entries.values():
            out.append(
                [
                    case,
                    e["device"],
                    e["size"],
                    e["config"],
                    e["variant"],
                    fmt(e["ours"]),
                    fmt(e["reference"]),
                    e["unit"],
                    ratio_text(e),
                    notes(e),
                ]
            )
    return out


HEADER = ["case", "device", "size", "configuration", "variant", "ours", "reference", "unit", "ratio", "notes"]


def text_table(results: dict) -> str:
    rows = [HEADER] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER) - 1)]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if k == 0:
            lines.append("  ".join("-" * w for w in widths) + "  -----")
    return "\n".join(lines)


def machine_lines(machine: dict) -> list[str]:
    v = machine["versions"]
    lines = [
        f"- CPU: {machine['cpu_model']}; {machine['physical_cores']} physical cores, "
        f"{machine['logical_cpus']} logical CPUs ({machine['usable_cpus']} usable); "
        f"torch threads {machine['torch_threads']} (inter-op {machine['torch_interop_threads']})",
        f"- bf16 in hardware: {'yes' if machine['native_bf16'] else 'no'} "
        f"(flags: {', '.join(machine['cpu_bf16_flags']) or 'none'}); int8 dot products: "
        f"{', '.join(machine.get('cpu_int8_flags', [])) or 'none'}; memory {machine['memory_gib']} GiB",
        f"- Instruction sets used: torch kernels {machine.get('torch_cpu_capability')}; caps set: "
        + (", ".join(f"{k}={val}" for k, val in machine.get("isa_caps", {}).items()) or "none"),
        "- C allocator: "
        + (", ".join(f"{k}={val}" for k, val in machine.get("allocator_env", {}).items()) or "glibc as it comes"),
        f"- Load average at start / end: {machine.get('load_average_at_start')} / {machine.get('load_average_at_end')}",
        f"- Versions: python {machine['python']}, " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- OS: {machine['os']}; MKL {machine['mkl']}, oneDNN {machine['mkldnn']}; "
        f"sam2flow revision {machine['git_revision']}",
        f"- Devices: {', '.join(machine['devices'])}",
    ]
    if "cuda" in machine:
        c = machine["cuda"]
        lines.append(
            f"- GPU: {', '.join(c['gpus'])} (capability {c['capability']}, CUDA {c['cuda_version']}, "
            f"bf16 {'yes' if c['bf16_supported'] else 'no'})"
        )
    for dev, rates in machine.get("matmul_gflops", {}).items():
        lines.append(
            f"- Measured {rates['n']}² matmul on {dev}: fp32 {fmt(rates['fp32'])} GFLOP/s, "
            + (f"bf16 {fmt(rates['bf16'])} GFLOP/s" if rates.get("bf16") else f"bf16 {rates.get('bf16_note')}")
        )
    for size, w in machine.get("weights", {}).items():
        lines.append(f"- Weights {size}: {w}")
    return lines


def fast_path_lines(machine: dict) -> list[str]:
    lines = []
    for key, note in machine.get("compile", {}).items():
        lines.append(f"- torch.compile of the image encoder, {key}: {note}")
    for key, note in machine.get("bf16", {}).items():
        lines.append(f"- bf16 image encoder, {key}: {note}")
    for key, verdict in machine.get("bf16_verdicts", {}).items():
        lines.append(f"- bf16 image encoder, {key}: {verdict}")
    cores, threads = machine.get("physical_cores"), machine.get("torch_threads")
    lines.append(
        f"- Threads: torch.get_num_threads() = {threads} on {cores} physical cores"
        + (" (more threads than cores: try --threads equal to the core count)" if cores and threads > cores else "")
    )
    return lines


def physical_limit_lines(results: dict, machine: dict) -> list[str]:
    out = []
    for e in results.get("embed", {}).values():
        if e["config"] != "batch 1":
            continue
        rates = machine.get("matmul_gflops", {}).get(e["device"], {})
        peak = rates.get("bf16") if "bf16" in e["variant"] else rates.get("fp32")
        frac = f", {100 * e['achieved_gflops'] / peak:.0f} % of the measured matmul rate" if peak else ""
        if e["variant"].endswith("(int8)"):  # int8 matmuls: no float rate bounds them, and none is measured
            frac = " (int8 arithmetic: no matmul rate measured for it)"
        out.append(
            f"- {e['device']} {e['size']} {e['variant']}: "
            f"{fmt(e['encoder_gflop_per_image'])} GFLOP per 1024×1024 image "
            f"in {fmt(e['ours'])} s = {fmt(e['achieved_gflops'])} GFLOP/s{frac}; "
            f"the reference reaches {fmt(e['reference_gflops'])} GFLOP/s"
        )
    return out


def chart(results: dict, path: Path, title: str) -> None:
    """Horizontal bars of the ratio (× faster, or × less memory) per configuration, one panel per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    cases = [c for c in results if results[c]]
    all_ratios = [e["ratio"] for c in cases for e in results[c].values()]
    lo, hi = min(0.5, min(all_ratios) / 1.5), max(2.0, max(all_ratios) * 2)
    ticks = [t for t in (0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128) if lo <= t <= hi]
    heights = [max(1, len(results[c])) for c in cases]
    fig, axes = plt.subplots(
        len(cases),
        1,
        figsize=(9, 1.2 + 0.45 * sum(heights) + 0.6 * len(cases)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, case in zip(axes[:, 0], cases):
        entries = list(results[case].values())
        labels = [
            f"{e['size']} · {e['config']}"
            + (f" · {e['device']}" if e["device"] != "cpu" else "")
            + (f" · {e['variant']}" if e["variant"] != "ours" else "")
            for e in entries
        ]
        ratios = [e["ratio"] for e in entries]
        colours = ["#d95f02" if e["variant"] != "ours" else "#1b9e77" for e in entries]
        y = list(range(len(entries)))
        # Bars grow from 1× (parity): right is better, left is worse.
        ax.barh(y, [r - 1.0 for r in ratios], left=1.0, color=colours)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}×"))
        ax.xaxis.set_minor_locator(NullLocator())
        for i, r in enumerate(ratios):
            ax.text(
                r,
                i,
                f" {r:.2f}× " if r >= 1 else f" {r:.2f}× ",
                va="center",
                ha="left" if r >= 1 else "right",
                fontsize=8,
            )
        what = "× less peak memory" if case == "memory" else "× faster than the reference"
        ax.set_title(f"{case} ({entries[0]['unit']}): {what}", fontsize=9, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict, machine: dict, chart_path: Path | None, md_path: Path, command: str) -> str:
    lines = [
        "# Benchmarks",
        "",
        "sam2flow (`Sam2Engine`, the workflow step) against Meta's reference `sam2` package "
        "(`SAM2ImagePredictor`, `SAM2AutomaticMaskGenerator`) on the same checkpoint, images and prompts, "
        "measured in one run on one machine. Values are medians over repeated runs after warm-up, with the "
        "two sides interleaved; **ratio** is how many times faster (memory: smaller) we are, taken within the run.",
        "",
        f"Generated {machine.get('generated_at', '')} by `{command}`"
        + (" (quick mode: few repeats, indicative only)." if machine.get("quick") else "."),
        "",
        "## Machine",
        "",
        *machine_lines(machine),
        "",
    ]
    busy = machine.get("busy_warning")
    if busy:
        lines += [f"> **Warning:** {busy}", ""]
    lines += ["## Results", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in table_rows(results):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    lines.append("")
    if chart_path is not None:
        rel = os.path.relpath(chart_path, md_path.parent)
        lines += [f"![ratio per case]({Path(rel).as_posix()})", ""]
    lines += ["## Fast paths", "", *fast_path_lines(machine), ""]
    limit = physical_limit_lines(results, machine)
    if limit:
        lines += ["## Against the physical limit", "", *limit, ""]
    lines += [
        "## What each case measures",
        "",
        "1. **embed**: seconds per image of the image encoder and feature projection, 1024×1024 synthetic scenes; "
        "batch 1 (`engine.embed([img])` vs `set_image`) and batch 4 (`engine.embed(4 images)` vs the reference's "
        "fastest mode: on a CPU `set_image` image by image, on a GPU `set_image_batch`). "
        "Our embedding cache is off, so every repeat does the work.",
        "2. **decode**: milliseconds per box for 10 and 100 detector-like boxes on a 640×480 and a 1920×1080 image, "
        "multimask on, full-resolution masks out, image already embedded: `engine.predict(embedding, boxes=...)` vs "
        "`predictor.predict(box=all boxes, multimask_output=True)` then the best of three per box.",
        "3. **step**: images per second through the workflow step (`segment_images`: numpy images → `sv.Detections` "
        "with masks, class ids/names and metadata) vs the reference doing the same work in its fastest mode "
        "(on a CPU `set_image` + `predict` image by image, on a GPU `set_image_batch` + `predict_batch`; all boxes "
        "of an image at once, best of three, `sv.Detections` with xyxy from the masks and the boxes' classes). "
        "640×480 images, 1 or 4 of them, 4 or 10 boxes each.",
        "4. **automatic**: seconds for one 1024×768 image, embedding included: `embed` + `generate_masks` vs "
        "`SAM2AutomaticMaskGenerator.generate` with the same settings (the reference's defaults, one crop); "
        "masks found by each in the notes.",
        "5. **memory**: peak resident set size (VmHWM) of a fresh process that imports what its side needs "
        "(ours: sam2flow with torch and transformers; the reference: torch and Meta's `sam2`; `ours (graphs)`: "
        "sam2flow's `GraphEngine`, OpenVINO and numpy, no torch), loads the model and runs case 3 once; each "
        "side in its own process. `ours` runs in float32; `ours (graphs)` in float32 and `ours (graphs, auto)` "
        'as `dtype="auto"` picks (bf16 where native, else int8 weights where the CPU has VNNI, else float32).',
        "6. **click**: milliseconds per click on an embedded 800×600 scene, 1 to 5 points per object (each click "
        "one more point, the previous prompt's low-res logits as mask input): ours through `sam2flow serve` in a "
        "process of its own, over HTTP on loopback (`POST /page/decode`: RLE, box and score back), vs "
        "`predictor.predict(point_coords, point_labels, mask_input=...)` in the benchmark's process; "
        "p50/p90/p99 and our decoder / upsampling / RLE / JSON times in the notes. The servers run as they come; "
        "each side clicks 25 times in a row, the sides taking turns after a pause in which the servers' polling "
        "and the reference's OpenMP spinning stop (click by click, each met the other's on one of the cores). "
        "The notes add an annotator's pace, ours alone: one click every 250 ms to a server as it comes and to "
        "one with `--click-spin-ms 0`. Where bf16 is native, the bf16 row is a server in bfloat16 (what "
        "`dtype=auto` runs there, encoder and decoder) against the reference under `torch.autocast`.",
        "7. **store**: milliseconds for the first click on an 800×600 scene with nothing of it in memory: ours with "
        "its embedding in an `EmbeddingStore` (`sam2flow embed`; the file read, checked and widened from float16, "
        "then one decode) vs the reference's `set_image` + `predict` (it encodes every new image); our own first "
        "click on a new image (encoder + decode) in the notes. The file is in the OS page cache after the warm-up.",
        "",
        '`ours` rows run our engine as it comes, in float32: `backend="auto"` (OpenVINO as one graph on a CPU, '
        "torch on a GPU). `ours (bf16)` rows are the same engine in bfloat16, encoder and decoder (what "
        '`dtype="auto"` picks there), only where the hardware has bf16 arithmetic (CPU flags '
        "`avx512_bf16`/`amx_bf16`, or a GPU that supports it) and only when its masks keep a mean IoU of at least "
        "0.97 against float32; they are compared with the reference under `torch.autocast(bf16)`. "
        "`ours (torch)` / `ours (openvino)` and their bf16 rows run the other encoder backend, against the "
        "reference in float32. `ours (int8 weights)` is OpenVINO with int8 weights and float32 activations (what "
        '`dtype="auto"` runs on a CPU without bf16 but with VNNI: the stand-in for such CPUs); `ours (int8)` '
        'quantises the activations too (`quantize="int8"`, calibrated on generated scenes that are never timed: '
        '`data.calibration_images`), at `dtype="auto"`. '
        "Both are against the reference in float32; the step notes their masks' IoU with our float32 ones. "
        "`ours (graphs)` is `GraphEngine` (a CPU process without torch: the encoder and the prompt decoder as "
        "exported OpenVINO graphs, numpy around them) in float32, `ours (graphs, auto)` the same at "
        '`dtype="auto"`; both against the reference in float32. '
        "The click case's servers run what a server runs: torch (an interactive engine).",
        "",
        "## How to reproduce",
        "",
        "```bash",
        "bash tools/setup-dev.sh && python -m pip install matplotlib",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


def _finite(obj):
    """NaN and infinities → None, so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, machine: dict, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_finite({"machine": machine, "cases": results}), f, indent=2, default=str, allow_nan=False)
        f.write("\n")


def _percentiles(p: dict) -> str:
    """``{"p50_ms": .., "p90_ms": .., "p99_ms": ..}`` → "a/b/c"."""
    return "/".join(fmt(p[k]) for k in ("p50_ms", "p90_ms", "p99_ms"))
