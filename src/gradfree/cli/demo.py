"""`gradfree demo`: the main job on the embedded default (real small models, real text)."""

from __future__ import annotations

from pathlib import Path

import typer

from gradfree.cli.options import DEVICE, DTYPE, OVERWRITE


def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder."),
    teacher: str = typer.Option("qwen2.5-coder-1.5b-instruct", "--teacher", help="Teacher model."),
    student: str = typer.Option("qwen2.5-coder-0.5b-instruct", "--student", help="Student model."),
    calibration_limit: int = typer.Option(
        32, "--calibration-limit", min=1, help="Calibration documents the head is fitted on."
    ),
    validation_limit: int = typer.Option(
        12, "--validation-limit", min=1, help="The next calibration documents: they choose it."
    ),
    heldout_limit: int = typer.Option(12, "--heldout-limit", min=1, help="Held-out documents."),
    public_limit: int = typer.Option(6, "--public-limit", min=1, help="Out-of-task documents."),
    max_length: int = typer.Option(256, "--max-length", min=8, help="Window length in tokens."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    overwrite: bool = OVERWRITE,
) -> None:
    """Capture, distil the student's LM head, write it as a checkpoint, evaluate, spectra."""
    from gradfree.base.configfile import make_strict
    from gradfree.experiment.demo import DemoConfig, run_demo

    options = {
        "teacher": teacher,
        "student": student,
        "calibration_limit": calibration_limit,
        "validation_limit": validation_limit,
        "heldout_limit": heldout_limit,
        "public_limit": public_limit,
        "max_length": max_length,
        "device": device,
        "dtype": dtype,
    }
    cfg = make_strict(DemoConfig, None, options, noun="demo", invalid="demo options")
    path = run_demo(cfg, out, overwrite=overwrite, say=lambda m: typer.echo(m, err=True))
    student_dir = path / "student"
    typer.echo(f"report: {path / 'report.md'}")
    typer.echo(
        f'student checkpoint: {student_dir}; load it with: python -c "from transformers import '
        f"AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('{student_dir}')\""
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("demo")(demo_command)
