"""Verbs that draw: reuse (the paper's Figure 5), diagram (the network and one dense block),
report (one HTML page for a training run)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .flags import add_model_source, is_file_spec, model_from_args, model_of, verb
from .inspect_cmds import add_input_size, input_size


def register(sub: argparse._SubParsersAction) -> None:
    p = verb(sub, "reuse", cmd_reuse, "the paper's feature-reuse heatmap (Figure 5) of a model",
             json="also print the matrix as JSON")
    add_model_source(p, "a weights file (.pt/.pth/.safetensors: ours, torchvision's, timm's), a "
                        "run directory (its best.pt), or a zoo name (random weights)",
                     "CHECKPOINT_OR_MODEL")
    p.add_argument("-o", "--output", default="reuse.png", help="image file, .png or .svg "
                   "(default reuse.png); the matrix goes to the same name with .json and .csv")
    p.add_argument("--scale", choices=("mean", "target", "z"), default="mean",
                   help="cell colour: mean |w| (the paper, default), mean |w| scaled to each "
                        "target's maximum, or z-score against shuffled input channels")

    p = verb(sub, "diagram", cmd_diagram, "draw the network and one dense block's connections",
             json="print what was drawn as JSON")
    add_model_source(p, "a zoo name, a variant with --depth, a weights file or a run directory")
    p.add_argument("-o", "--output", default="model.svg", help=".svg or .png (default model.svg)")
    p.add_argument("--block", type=int, default=1, help="which dense block to draw (default 1)")
    add_input_size(p, "for the sizes shown; default: the size its weights expect, else its "
                      "native size")

    p = verb(sub, "report", cmd_report, "one self-contained HTML page for a training run")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by densenets train")
    p.add_argument("-o", "--output", help="HTML file (default RUN_DIR/report.html)")


def _output_path(out: str, suffixes: tuple[str, ...]) -> Path:
    path = Path(out)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"-o must end in {' or '.join(suffixes)}, got {out!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def cmd_reuse(args: argparse.Namespace) -> int:
    """For each dense block, how strongly each layer (and the transition or classifier after
    it) uses the maps of every earlier layer: mean |w| over the input channels each source
    produced. Writes the heatmap to -o and the matrix beside it as .json and .csv."""
    from ..analysis import reuse

    out = _output_path(args.output, (".png", ".svg"))
    if is_file_spec(args.model):
        from ..weights.files import read_checkpoint

        # Any DenseNet weights: our checkpoints, torchvision's (current or legacy keys), timm's,
        # DataParallel prefixes, safetensors; the matrix needs only the state dict.
        ckpt = read_checkpoint(args.model)
        state, name = ckpt.state_dict, f"{ckpt.model_name or 'DenseNet'} ({args.model})"
    else:
        name, model = model_from_args(args)
        state = model.state_dict()
    blocks = reuse.feature_reuse(state)
    reuse.plot(blocks, out, title=f"Feature reuse of {name}", scale=args.scale)
    reuse.write_json(blocks, out.with_suffix(".json"))
    reuse.write_csv(blocks, out.with_suffix(".csv"))
    if args.json:
        print(json.dumps(reuse.to_json(blocks), indent=2))
    else:
        print(f"wrote {out}, {out.with_suffix('.json')}, {out.with_suffix('.csv')}")
        for b in blocks:
            print(f"dense block {b.block}: {b.num_layers} layers, structure {b.structure:.2f} "
                  "(mean z^2 of the cells; about 1 = no source favoured beyond chance)")
    return 0


def cmd_diagram(args: argparse.Namespace) -> int:
    """The network (stem, blocks, transitions, head with channels and spatial sizes) and one
    dense block wired as in the paper's Figure 1, drawn from the model itself."""
    from ..analysis.diagram import diagram

    out = _output_path(args.output, (".svg", ".png"))
    name, model = model_of(args)
    cfg = model.config
    # a model the diagram cannot draw (no chain of blocks) is refused by diagram() itself
    title = f"{name}: {cfg.block_config} layers per block, k={cfg.growth_rate}, " \
        f"{sum(p.numel() for p in model.parameters()):,} parameters" \
        if hasattr(cfg, "block_config") else None
    info = diagram(model, out, block=args.block, input_size=input_size(args, model),
                   title=title)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"wrote {out}: {len(model.config.block_config)} dense blocks; block {args.block} has "
              f"{info['num_layers']} layers and {info['connections']} connections "
              f"(L(L+1)/2), plus {info['exit_connections']} into the "
              f"{'transition' if args.block < len(model.config.block_config) else 'classifier'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Configuration, curves, final metrics against the paper, model summary, architecture
    and feature-reuse heatmap of a run directory, in one HTML file that needs no network."""
    from ..analysis.report import write_report

    out = Path(args.output) if args.output else Path(args.run_dir) / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"-o must end in .html, got {str(out)!r}")
    path = write_report(args.run_dir, out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained)")
    return 0
