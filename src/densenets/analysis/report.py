"""One self-contained HTML page for a training run: configuration, curves, final metrics beside
the paper's figure for the recipe, the model summary, the architecture and the feature-reuse
heatmap. Images are embedded as base64 and the styles inline, so the page opens in a browser
with no network and can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..models.densenet import DenseNet
from . import paper
from .summary import human, summary

# Section ids in page order; tests and links rely on them.
SECTIONS = ("configuration", "curves", "metrics", "summary", "architecture", "reuse", "epochs")

# Recipe name -> the column of the paper's Table 2 it reproduces.
RECIPE_DATASETS = {"cifar10": "C10", "cifar10+": "C10+", "cifar100": "C100",
                   "cifar100+": "C100+", "svhn": "SVHN"}

def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _img(data: bytes, alt: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.csv as dicts with numbers parsed (empty cells become None)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(v: str | None) -> Any:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def draw_curves(rows: list[dict[str, Any]]) -> bytes | None:
    """Loss and error against epoch, for a run directory that has no curves.png."""
    if not rows or "epoch" not in rows[0]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, suffix in ((a, "loss"), (b, "err")):
        for col in rows[0]:
            if col.endswith(suffix) and "top5" not in col:
                ys = [r[col] if isinstance(r[col], int | float) else math.nan for r in rows]
                ax.plot(epochs, ys, label=col, marker="." if len(rows) < 30 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel(suffix)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def paper_figure(model_name: str | None, recipe: str | None) -> tuple[float | None, str]:
    """The paper's top-1 test error (%) for this model and recipe, and where it comes from."""
    if not model_name or not recipe:
        return None, "no model name or recipe recorded"
    recipe = recipe.lower()
    if recipe in RECIPE_DATASETS:
        col = RECIPE_DATASETS[recipe]
        err = paper.paper_error(model_name, col)
        where = f"Table 2, {model_name}, {col}"
        return err, where if err is not None else f"the paper has no {col} figure for " \
                                                  f"{model_name}"
    if recipe == "imagenet":
        for row in paper.IMAGENET_ROWS:
            if row[0] == model_name and row[2] is not None:
                return row[2], f"Table 3, {model_name}, single-crop top-1"
        return None, f"the paper has no ImageNet figure for {model_name}"
    return None, f"the paper reports no figure for the {recipe!r} recipe"


def _our_error(summary_json: Mapping, rows: list[dict[str, Any]], recipe: str | None
               ) -> tuple[float | None, str]:
    """The run's top-1 test error (%) as the paper would quote it, and where it came from:
    SVHN at the epoch of lowest validation error, every other recipe at the end of training."""
    picks = [("final", "the last epoch")]
    if (recipe or "").lower() == "svhn":
        picks.insert(0, ("at_best", "the best-validation epoch"))
    for key, what in picks:
        row = summary_json.get(key)
        if isinstance(row, Mapping) and isinstance(row.get("test_top1_err"), int | float):
            return float(row["test_top1_err"]), f"summary.json, {what} (epoch {row.get('epoch')})"
    if isinstance(summary_json.get("test_top1_err"), int | float):
        return float(summary_json["test_top1_err"]), "summary.json test_top1_err"
    for row in reversed(rows):
        v = row.get("test_top1_err")
        if isinstance(v, int | float):
            return float(v), f"metrics.csv, epoch {row.get('epoch')}"
    return None, "no test error recorded"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v)
    return "-" if v is None else str(v)


def _kv_table(d: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out += _kv_table(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _columns(rows: list[list[Any]], n: int) -> str:
    """Field/value rows as up to ``n`` tables side by side, so a long configuration stays short."""
    per = max(1, -(-len(rows) // n))
    tables = [_table(["field", "value"], rows[i:i + per]) for i in range(0, len(rows), per)]
    return '<div class="cols">' + "".join(tables) + "</div>"


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


# FC-DenseNet103's CamVid test mean IoU in the Tiramisu paper (its Table 1), in %.
TIRAMISU_CAMVID_MIOU = 66.9


def _our_miou(rows: list[dict[str, Any]]) -> tuple[float | None, str]:
    """A segmentation run's last test (else validation) mean IoU (%), and where it came from."""
    for key in ("test_miou", "val_miou"):
        for row in reversed(rows):
            if isinstance(row.get(key), int | float):
                return float(row[key]), f"metrics.csv {key}, epoch {row.get('epoch')}"
    return None, "no mean IoU recorded"


def _metrics_section(summary_json: Mapping, rows: list[dict[str, Any]], model_name: str | None,
                     recipe: str | None) -> str:
    if any("test_miou" in r or "val_miou" in r for r in rows):
        ours, ours_from = _our_miou(rows)
        camvid = (recipe or "").startswith("camvid") and model_name == "fcdensenet103"
        ref, ref_from = ((TIRAMISU_CAMVID_MIOU, "FC-DenseNet103 on CamVid's test set") if camvid
                         else (None, "the paper reports no figure for this recipe"))
        lines = [["this run: mean IoU (%)", ours, ours_from],
                 ["the paper: mean IoU (%)", ref, ref_from]]
    else:
        ours, ours_from = _our_error(summary_json, rows, recipe)
        ref, ref_from = paper_figure(model_name, recipe)
        lines = [["this run: top-1 test error (%)", ours, ours_from],
                 ["the paper: top-1 test error (%)", ref, ref_from]]
    if ours is not None and ref is not None:
        lines.append(["difference (points)", ours - ref, "this run minus the paper"])
    body = _table(["", "value", "source"], lines, "compare")
    finals = [[k, v] for k, v in _kv_table(summary_json) if not isinstance(v, list | dict)]
    if finals:
        body += "<h3>summary.json</h3>" + _columns(finals, 3)
    elif rows:
        body += "<h3>last epoch</h3>" + _table(["field", "value"], list(map(list,
                                                                          rows[-1].items())))
    return body


def _summary_section(model: DenseNet, input_size: tuple[int, ...], name: str) -> str:
    s = summary(model, (1, *input_size), name=name)
    rows = [["\u2003" * r.depth + r.name, r.kind, "×".join(map(str, r.output_shape[1:])),
             f"{r.params:,}", human(r.macs), "" if r.connections is None else r.connections]
            for r in s.rows]
    sides = input_size[1:]
    what = {1: "signal", 2: "image", 3: "volume"}[len(sides)]
    note = (f"<p>{s.total_params:,} parameters, {human(s.total_macs)} multiply-adds per "
            f"{'×'.join(map(str, sides))} {what} (conv and linear layers; ×2 for FLOPs).</p>")
    axes = {1: "C×L", 2: "C×H×W", 3: "C×D×H×W"}[len(sides)]
    header = ["layer", "kind", f"output ({axes})", "params", "MACs", "connections"]
    top = [row for row, r in zip(rows, s.rows, strict=True) if r.depth == 0]
    return (note + _table(header, top, "summary") +
            f"<details><summary>every dense layer ({len(rows)} rows)</summary>"
            f"{_table(header, rows, 'summary')}</details>")


def _reuse_section(model) -> str:
    from . import reuse

    try:
        blocks = reuse.feature_reuse(model)
    except ValueError as e:  # a family whose weights are not laid out as DenseNet's
        return f"<p>No feature-reuse map: {html.escape(str(e))}</p>"
    heat = _png(reuse.plot(blocks))
    scores = _table(["dense block", "layers", "structure (mean z², about 1 = chance)"],
                    [[b.block, b.num_layers, b.structure] for b in blocks], "structure")
    return _img(heat, "feature reuse heatmap") + _REUSE_NOTE + scores


def build_report(run_dir: str | Path) -> str:
    """The HTML page for the run in ``run_dir`` (config.json, metrics.csv, best.pt or last.pt,
    optionally curves.png and summary.json)."""
    from ..weights.files import load
    from ..weights.pretrained import native_input_size
    from . import diagram

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"no run directory at {run}")
    ckpt_path = next((run / n for n in ("best.pt", "last.pt") if (run / n).is_file()), None)
    if ckpt_path is None:
        raise FileNotFoundError(f"{run} has no best.pt or last.pt; is it a training run "
                                "directory (densenets train --out DIR)?")
    config = _read_json(run / "config.json")
    summary_json = _read_json(run / "summary.json")
    rows = read_metrics(run / "metrics.csv")
    # The shared loader: any DenseNet weights file, never unpickling objects.
    model = load(ckpt_path, memory_efficient=False).eval()
    meta = model.weights_meta
    model_name = meta.get("model_name") or config.get("model")
    recipe = meta.get("recipe") or config.get("recipe")
    input_size = native_input_size(model)

    parts = []
    cfg_rows = [[k, v] for k, v in _kv_table(config)] or [["(no config.json)", None]]
    parts.append(_section("configuration", "Configuration", _columns(cfg_rows, 3)))
    curves = (run / "curves.png").read_bytes() if (run / "curves.png").is_file() \
        else draw_curves(rows)
    parts.append(_section("curves", "Training curves",
                          _img(curves, "training curves") if curves else
                          "<p>No curves.png and no metrics.csv in this run.</p>"))
    parts.append(_section("metrics", "Final metrics and the paper",
                          _metrics_section(summary_json, rows, model_name, recipe)))
    parts.append(_section("summary", "Model summary",
                          _summary_section(model, input_size, str(model_name or "DenseNet"))))
    try:
        fig, info = diagram.draw(model, 1, input_size)
        drawing = (_img(_png(fig), "network diagram") +
                   f"<p>Dense block 1: {info['connections']} connections.</p>")
    except ValueError as e:  # a family the drawing does not cover
        drawing = f"<p>No diagram: {html.escape(str(e))}</p>"
    parts.append(_section("architecture", "Architecture", drawing))
    parts.append(_section("reuse", "Feature reuse (the paper's Figure 5)", _reuse_section(model)))
    epoch_rows = [list(r.values()) for r in rows]
    parts.append(_section("epochs", "Every epoch",
                          _table(list(rows[0]), epoch_rows, "epochs") if rows else
                          "<p>No metrics.csv in this run.</p>"))
    title = f"densenets run {run.name}"
    sub = f"{model_name or 'DenseNet'} · recipe {recipe or '?'} · checkpoint {ckpt_path.name}"
    return _PAGE.format(title=html.escape(title), sub=html.escape(sub),
                        nav=" · ".join(f'<a href="#{s}">{s}</a>' for s in SECTIONS),
                        body="\n".join(parts))


def write_report(run_dir: str | Path, out: str | Path) -> Path:
    """Write :func:`build_report` to ``out`` and return its path."""
    out = Path(out)
    text = build_report(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out


_REUSE_NOTE = ("<p>Cell (s, l): mean |w| of layer l's first convolution over the channels that "
               "source s produced (s = in: the block input). The last column is the transition "
               "(or, for the last block, the classifier). Structure compares each cell with a "
               "random choice of as many input channels: about 1 means no source is favoured "
               "beyond chance (as at initialisation; short runs stay there), well above 1 means "
               "the layers learned to prefer some sources.</p>")

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }}
h1 {{ margin-bottom: 0.1em; }} .sub {{ color: #666; margin-top: 0; }}
nav a {{ color: #2a5db0; }} section {{ border-top: 1px solid #ddd; margin-top: 1.5em; }}
table {{ border-collapse: collapse; font-size: 13px; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ddd; padding: 2px 8px; text-align: left; }}
th {{ background: #f3f3f3; }} img {{ max-width: 100%; }}
table.compare td:nth-child(2) {{ font-weight: bold; }}
.cols {{ display: flex; gap: 1.5em; align-items: flex-start; flex-wrap: wrap; }}
</style></head>
<body><h1>{title}</h1><p class="sub">{sub}</p><nav>{nav}</nav>
{body}
</body></html>
"""
