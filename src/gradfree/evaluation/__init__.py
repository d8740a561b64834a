"""Evaluation: one windowing of documents, one teacher reference kept on disk, one scorer
(perplexity, KL, top-1, bootstrap interval), the place questions and the report writer.
"""
