"""Evaluation: scoring a model, alone or against a teacher.

- ``run``: :func:`~gradfree.evaluation.run.evaluate` (``gradfree eval``) and ``write_eval``.
- ``perplexity``: the paired sliding-window pass (perplexity, KL, top-1, per-layer cosine/CKA).
- ``questions``: the place questions: prompts, greedy answers, abstention/hallucination scores.
- ``reference``: one ``TeacherReference`` (the teacher's outputs computed once, on disk or in
  memory), one ``score()`` against it, and ``bootstrap_delta``.
- ``metrics``: the pure tensor maths (KL, NLL, agreement, cosine, CKA, answer matching).
- ``report``: the ``eval.md`` page.

The windows of every document come from :mod:`gradfree.texts.windows`.
"""
