"""`gradfree experiment`: seed 000's research matrix from one YAML config, one results table.

Thin: read the config (command-line options override the pair, device and dtype), call
:func:`gradfree.experiment.run_experiment`, print where the table is. torch is imported only
when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from gradfree.cli.options import DEVICE_HELP, OVERWRITE, device_option, dtype_option


def experiment(
    config: Path = typer.Option(..., "--config", help="Experiment YAML (see experiments/)."),
    out: Path = typer.Option(..., "--out", help="Output folder (results.md, results.json)."),
    teacher: str | None = typer.Option(None, "--teacher", help="Override the config's teacher."),
    student: str | None = typer.Option(None, "--student", help="Override the config's student."),
    device: str | None = device_option(None, f"{DEVICE_HELP} (overrides the config)"),
    dtype: str | None = dtype_option(None, "Model dtype (overrides the config)."),
    resume: bool = typer.Option(False, "--resume", help="Skip rows already measured in --out."),
    overwrite: bool = OVERWRITE,
    keep_work: bool = typer.Option(False, "--keep-work", help="Keep captures and references."),
) -> None:
    """Build and measure every row of an experiment (gradient-free), write results.md."""
    from gradfree.base.configfile import read_yaml_mapping
    from gradfree.experiment import make_experiment, run_experiment

    data = read_yaml_mapping(config, "experiment file")
    for key, value in (
        ("teacher", teacher),
        ("student", student),
        ("device", device),
        ("dtype", dtype),
    ):
        if value is not None:
            data[key] = value
    cfg = make_experiment(data)
    done = run_experiment(
        cfg,
        out,
        overwrite=overwrite,
        resume=resume,
        keep_work=keep_work,
        say=lambda m: typer.echo(m, err=True),
    )
    typer.echo(str(done / "results.md"))


def register(app: typer.Typer) -> None:
    app.command("experiment")(experiment)
