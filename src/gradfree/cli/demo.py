"""`gradfree demo`: the main job on the embedded default (real small models, real text)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from gradfree.cli.options import DEVICE, DTYPE, OVERWRITE


def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder."),
    teacher: str = typer.Option("qwen2.5-coder-1.5b-instruct", "--teacher", help="Teacher model."),
    student: str = typer.Option("qwen2.5-coder-0.5b-instruct", "--student", help="Student model."),
    calibration_limit: int = typer.Option(
        32, "--calibration-limit", min=1, help="Calibration documents to capture."
    ),
    public_limit: int = typer.Option(8, "--public-limit", min=1, help="Public-text documents."),
    max_length: int = typer.Option(256, "--max-length", min=8, help="Window length in tokens."),
    questions: bool = typer.Option(True, "--questions/--no-questions", help="Place questions."),
    ablation: bool = typer.Option(
        True, "--ablation/--no-ablation", help="Seed 001's alignment ablation on the same pair."
    ),
    experiment: bool = typer.Option(
        True, "--experiment/--no-experiment", help="Issue 4's compression rows on the same pair."
    ),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Fetch the default pair and texts, capture, analyse spectra, evaluate, write report.md."""
    from gradfree.base.configfile import make_strict
    from gradfree.experiment.demo import DemoConfig, run_demo

    extra: dict[str, Any] = {} if ablation else {"ablation": None}
    if not experiment:
        extra["experiment"] = None
    options = {
        "teacher": teacher,
        "student": student,
        "calibration_limit": calibration_limit,
        "public_limit": public_limit,
        "max_length": max_length,
        "questions": questions,
        "device": device,
        "dtype": dtype,
    }
    cfg = make_strict(DemoConfig, extra, options, noun="demo", invalid="demo options")
    path = run_demo(cfg, out, overwrite=overwrite, say=lambda m: typer.echo(m, err=True))
    typer.echo(str(path / "report.md"))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("demo")(demo_command)
