"""Concept directions (seed 004, ``gradfree directions``): one vector per concept, what predicts
it, how it steers a model, and how it moves between model sizes.

    concepts.py  installed word lists (wordfreq, english-words), prompt templates, concept splits
    store.py     the on-disk format (safetensors + manifest) and the model check
    extract.py   directions = concept mean − mean over concepts, after chosen blocks
    predict.py   closed-form ridge from the frozen input embeddings; the seed's torch baselines;
                 the inverse map
    steer.py     the steering hook (a context manager) and its measured effect and cost
    transfer.py  linear maps between two models' residual streams (ridge, Procrustes)

Importing this package imports neither torch nor transformers.
"""
