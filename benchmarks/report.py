"""Markdown tables of a benchmarks/run.py summary, and their place in docs/benchmarks.md.

    python benchmarks/report.py benchmarks/results/<machine>.json [--docs docs/benchmarks.md]

rewrites that machine's section of the docs from a summary (one copied back from a GPU machine,
say) without measuring anything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TV_PLAIN, TV_ME = "torchvision plain", "torchvision memory_efficient"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _num(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _header(summary: dict) -> list[str]:
    env = summary["environment"]
    where = env.get("gpu") or f"{env['cpu']}, {env['cpu_count']} cores, " \
                              f"{env['torch_threads']} torch threads"
    cuda = f", CUDA {env['cuda']}" if env.get("cuda") else ""
    return [f"Machine: {where}. torch {env['torch']}, torchvision {env['torchvision']}{cuda}, "
            f"Python {env['python']}. Measured {summary['date']}.", ""]


def training_table(summary: dict) -> list[str]:
    gpu = summary["machine"] != "cpu" and not summary["machine"].startswith("cpu-")
    mem = "peak GiB (max allocated)" if gpu else "peak RSS MiB"
    lines = ["| model | input | batch | precision | implementation | img/s median | vs tv plain "
             "| img/s best | vs tv plain | "
             f"{mem} | vs tv memory_efficient | vs tv plain |" + ("" if gpu else
                                                                  " training MiB |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("" if gpu else "---|")]
    for entry in summary["train"]:
        cfg, res = entry["config"], entry["results"]
        prec = "bf16" + (" CL" if cfg["channels_last"] else "") if cfg["amp"] else \
            "fp32" + (" CL" if cfg["channels_last"] else "")
        tv, tvme = res.get(TV_PLAIN, {}), res.get(TV_ME, {})
        for label, r in res.items():
            size = r.get("input_size", "-")
            if r.get("error") == "not measured":  # a run stopped before it: listed below
                continue
            if "error" in r:
                lines.append(f"| {cfg['model']} | {size} | {cfg['batch_size']} | {prec} | "
                             f"{label} | failed: {r['error'][-80:]} |" + " - |" * 6
                             + ("" if gpu else " - |"))
                continue
            peak = r["peak_mib"] / (1024 if gpu else 1)
            peak_s = f"{peak:.2f}" if gpu else f"{peak:,.0f}"
            name = label + (f" ({r['backend']})" if r.get("backend") else "")
            row = (f"| {cfg['model']} | {size} | {cfg['batch_size']} | {prec} | {name} | "
                   f"{r['images_per_s']:.1f} | {_ratio(r['images_per_s'], tv.get('images_per_s'))}"
                   f" | {r['best_images_per_s']:.1f} | "
                   f"{_ratio(r['best_images_per_s'], tv.get('best_images_per_s'))} | {peak_s} | "
                   f"{_ratio(r['peak_mib'], tvme.get('peak_mib'))} | "
                   f"{_ratio(r['peak_mib'], tv.get('peak_mib'))} |")
            if not gpu:
                row += f" {r['peak_mib'] - r['memory_before_mib']:,.0f} |"
            lines.append(row)
    return lines


def depth_table(summary: dict) -> list[str]:
    depth = summary["depth"]
    gpu = summary["machine"] != "cpu" and not summary["machine"].startswith("cpu-")
    unit = "MiB (max allocated)" if gpu else "MiB (peak RSS minus RSS before training)"
    cols = " | ".join(f"L={d}" for d in depth["depths"])
    lines = [f"DenseNet-BC k=12 at 32x32, batch {depth['batch']}, fp32; memory in {unit}. "
             "Slope and intercept from a least-squares line; quadratic share = |a| (L range)^2 "
             "/ (memory range) of the fitted parabola a L^2 + b L + c.", "",
             f"| implementation | {cols} | MiB per layer | R^2 line | R^2 parabola | "
             "quadratic share | shape |",
             "|---|" + "---|" * (len(depth["depths"]) + 5)]
    for label, r in depth["results"].items():
        mem = r["memory_mib"]
        vals = " | ".join(_num(mem.get(d, mem.get(str(d))), ",.0f") for d in depth["depths"])
        fit = r.get("fit") or {}
        if not fit:
            lines.append(f"| {label} | {vals} | - | - | - | - | - |")
            continue
        ys = list(mem.values())
        span_x = max(depth["depths"]) - min(depth["depths"])
        share = abs(fit["parabola"]["coef"][0]) * span_x ** 2 / max(max(ys) - min(ys), 1e-9)
        shape = "linear" if fit["line"]["r2"] >= 0.995 and share < 0.1 else "super-linear"
        lines.append(f"| {label} | {vals} | {fit['slope']:.2f} | {fit['line']['r2']:.4f} | "
                     f"{fit['parabola']['r2']:.4f} | {share:.2f} | {shape} |")
    return lines


def render(summary: dict) -> str:
    out = _header(summary)
    if summary.get("train"):
        out += ["Training step (forward, loss, backward, SGD step); speed and memory ratios are "
                "to torchvision in the same run.", ""]
        out += training_table(summary) + [""]
    missing = [f"{e['config']['model']} batch {e['config']['batch_size']} "
               f"{'bf16' if e['config']['amp'] else 'fp32'}"
               for e in summary.get("train", [])
               if all(r.get("error") == "not measured" for r in e["results"].values())]
    depth = summary.get("depth")
    if depth and not any(r["memory_mib"] for r in depth["results"].values()):
        missing.append("memory against depth")
    elif depth:
        out += depth_table(summary) + [""]
    if missing:
        out += ["Not measured (the run stopped first): " + "; ".join(missing) + ".", ""]
    return "\n".join(out)


def write_section(path: Path, tag: str, markdown: str) -> None:
    """Replace the text between this machine's markers (appending them if absent)."""
    begin, end = f"<!-- BEGIN results {tag} -->", f"<!-- END results {tag} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## Results: {tag}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a benchmarks/run.py summary into the docs.")
    p.add_argument("summary", type=Path, help="benchmarks/results/<machine>.json")
    p.add_argument("--docs", type=Path,
                   default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    summary = json.loads(args.summary.read_text())
    write_section(args.docs, summary["machine"], render(summary))
    print(f"section {summary['machine']} of {args.docs} rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
