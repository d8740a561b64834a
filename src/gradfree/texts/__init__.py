"""Texts: the built-in tour-guide task, public corpora fetched at set-up time, the place
questions, and the documents a command reads (``load_corpus``).
"""
