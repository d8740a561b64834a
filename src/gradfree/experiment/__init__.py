"""``gradfree experiment``: seed 000's research matrix as one command and one results table.

A YAML config (:mod:`.config`) names a teacher/student pair, the texts, a base compression recipe
and the rows to build (the student, the teacher, compression recipes, optionally with a distilled
head); studies (an α sweep per layer, data efficiency, task transfer, composability of bases)
expand into more rows. :func:`run_experiment` (:mod:`.run`) builds and measures each row against
teacher references computed once (:mod:`.scoring`) and writes results.json / results.md / plots
(:mod:`.report`) after every row.
"""

from gradfree.experiment.config import (
    ExperimentConfig,
    expand_rows,
    load_experiment,
    make_experiment,
)
from gradfree.experiment.run import run_experiment

__all__ = [
    "ExperimentConfig",
    "expand_rows",
    "load_experiment",
    "make_experiment",
    "run_experiment",
]
