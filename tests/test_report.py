"""The HTML run report: every section, self-contained, the paper's figure for the recipe, and
rendered by a real headless Chromium (screenshot size and content checked)."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from densenets import DenseNet
from densenets.analysis.paper import paper_error
from densenets.analysis.report import (
    SECTIONS,
    build_report,
    draw_curves,
    read_metrics,
    write_report,
)
from densenets.cli import main

# The columns `densenets train` writes (val_* only when the recipe holds out a validation set).
COLUMNS = ["epoch", "lr", "train_loss", "train_top1_err", "val_loss", "val_top1_err",
           "val_top5_err", "test_loss", "test_top1_err", "test_top5_err", "seconds",
           "images_per_s"]
HEADINGS = {"configuration": "Configuration", "curves": "Training curves",
            "metrics": "Final metrics and the paper", "summary": "Model summary",
            "architecture": "Architecture", "reuse": "Feature reuse (the paper&#x27;s Figure 5)",
            "epochs": "Every epoch"}


def make_run(run: Path, recipe: str = "digits", model_name: str = "densenet-bc-40-k12",
             curves: bytes | None = None, test_err: float = 2.5) -> DenseNet:
    """A run directory as `densenets train` writes it, with a tiny model."""
    run.mkdir(parents=True)
    model = DenseNet(growth_rate=4, block_config=(2, 3, 2), num_init_features=8, num_classes=10,
                     stem="cifar", in_channels=1)
    torch.save({"format": "densenets.checkpoint", "version": 1, "model": model.state_dict(),
                "model_config": model.config.to_dict(), "model_name": model_name,
                "meta": {"class_names": [str(i) for i in range(10)],
                         "preprocessing": {"resize": None, "crop": 8, "mean": [0.5],
                                           "std": [0.5], "interpolation": "bilinear"},
                         "recipe": recipe},
                "epoch": 3}, run / "best.pt")
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        rows = [[e, 0.1, 2.0 / e, 60.0 / e, 2.1 / e, 55.0 / e + 1, 9.0, 2.2 / e, 50.0 / e,
                 9.0 / e, 1.5, 900] for e in range(1, 4)]
        rows[-1][8] = test_err
        w.writerows(rows)
    final = dict(zip(COLUMNS, rows[-1], strict=True))
    at_best = dict(zip(COLUMNS, rows[1], strict=True))  # the best validation epoch
    (run / "config.json").write_text(json.dumps(
        {"recipe": recipe, "model": model_name, "epochs": 3, "seed": 0,
         "optimizer": {"name": "sgd", "lr": 0.1, "nesterov": True}}))
    (run / "summary.json").write_text(json.dumps(
        {"recipe": recipe, "model": model_name, "epochs_completed": 3, "epochs": 3,
         "final": final, "best": {"epoch": 2, "split": "val", "top1_err": at_best["val_top1_err"]},
         "at_best": at_best}))
    if curves is not None:
        (run / "curves.png").write_bytes(curves)
    return model


def test_every_section_self_contained(tmp_path):
    make_run(tmp_path / "run")
    page = build_report(tmp_path / "run")
    for sid in SECTIONS:
        assert f'<section id="{sid}"><h2>{HEADINGS[sid]}</h2>' in page
    # Nothing to fetch: every image is inline, every link an anchor in the page.
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "http" not in text and "//" not in text and "@import" not in text
    assert page.count("<img ") == 3  # curves (drawn from metrics.csv), architecture, reuse
    assert "sgd" in page and "optimizer.nesterov" in page  # the configuration, flattened


def test_curves_png_of_the_run_is_embedded(tmp_path):
    png = draw_curves(read_metrics(Path(_write_metrics(tmp_path))))
    make_run(tmp_path / "run", curves=png)
    page = build_report(tmp_path / "run")
    assert base64.b64encode(png).decode() in page


def _write_metrics(tmp_path: Path) -> Path:
    p = tmp_path / "m.csv"
    p.write_text("epoch,train_loss,test_top1_err,test_top5_err\n1,2.0,50,10\n2,1.0,,5\n")
    rows = read_metrics(p)
    assert rows[1]["test_top1_err"] is None and rows[0]["train_loss"] == 2.0
    return p


def test_final_metrics_against_the_paper(tmp_path):
    make_run(tmp_path / "c10", recipe="cifar10+", model_name="densenet-bc-100-k12",
             test_err=5.0)
    page = build_report(tmp_path / "c10")
    section = page.split('<section id="metrics">')[1].split("</section>")[0]
    ref = paper_error("densenet-bc-100-k12", "C10+")
    assert f"<td>{ref:.4g}</td>" in section and "Table 2" in section
    assert f"<td>{5.0 - ref:.4g}</td>" in section  # this run minus the paper
    assert "the last epoch (epoch 3)" in section

    # SVHN: the paper quotes the test error at the epoch of lowest validation error.
    make_run(tmp_path / "svhn", recipe="svhn", model_name="densenet-bc-100-k12")
    section = build_report(tmp_path / "svhn").split('<section id="metrics">')[1]
    assert "the best-validation epoch (epoch 2)" in section
    assert f"<td>{paper_error('densenet-bc-100-k12', 'SVHN'):.4g}</td>" in section

    make_run(tmp_path / "digits")
    section = build_report(tmp_path / "digits").split('<section id="metrics">')[1]
    assert "reports no figure for the &#x27;digits&#x27; recipe" in section


def test_model_summary_counts_the_checkpoint_model(tmp_path):
    model = make_run(tmp_path / "run")
    page = build_report(tmp_path / "run")
    total = sum(p.numel() for p in model.parameters())
    assert f"{total:,} parameters" in page
    assert "8×8 image" in page  # the checkpoint's own crop, not a default size


def test_report_verb_and_errors(tmp_path, capsys):
    make_run(tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.html").is_file()
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.html")]) == 2
    assert "no best.pt or last.pt" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no run directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "r.pdf")]) == 2
    assert "must end in .html" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "best.pt").write_bytes(b"\x00garbage")
    assert main(["report", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "best.pt is not a PyTorch checkpoint" in err and err.count("\n") == 1


def chromium() -> str:
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                       else None)
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: `make test` installs Debian's chromium package")
        pytest.skip("chromium not installed (make test installs it)")
    return exe


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.browser
def test_renders_in_headless_chromium(tmp_path):
    from PIL import Image, ImageStat

    make_run(tmp_path / "run")
    page = write_report(tmp_path / "run", tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000",
                 page.resolve().as_uri())
    assert shot.is_file(), "chromium wrote no screenshot"
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 2000)
    assert shot.stat().st_size > 20_000
    dark = sum(img.histogram()[:200]) / (1200 * 2000)
    assert dark > 0.02 and ImageStat.Stat(img).stddev[0] > 10  # text and figures, not blank

    # The browser's own DOM: every section there, and every embedded image decoded.
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace(
        "</body>", '<script>window.addEventListener("load", () => document.body.setAttribute('
                   '"data-images", Array.from(document.images).map(i => i.naturalWidth)'
                   '.join(",")));</script></body>'))
    dom = run_chromium(tmp_path, "--dump-dom", probe.resolve().as_uri()).stdout
    for sid in SECTIONS:
        assert f'<section id="{sid}"><h2>' in dom
    widths = re.search(r'data-images="([^"]*)"', dom).group(1).split(",")
    assert len(widths) == 3 and all(int(w) > 100 for w in widths)
