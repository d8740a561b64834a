"""Task vectors (seed 003, ``gradfree taskvec``): PEFT LoRA adapters expanded to ΔW = scaling·B·A,
magnitude masks stored as sorted indices, compressed task vectors, merges through the merge
toolkit's methods, and unmerging a merged model into the tasks it was made of.

    lora.py      read PEFT adapters, expand ΔW
    vector.py    task vectors as lazy ΔW sources over a base checkpoint
    mask.py      magnitude masks (max / mean / sum over tasks; per module or global top-k)
    compress.py  a task vector's values at a mask, one safetensors file
    merge.py     task arithmetic / TIES / DARE of task vectors into a plain checkpoint + record
    solve.py     the maths of recovery: NNLS, OMP, LASSO, ridge, sign-aware TIES (numpy only)
    unmerge.py   dictionary and target from checkpoints, solvers, scores against the record
    adapters.py  ``make-adapters``: the project's own LoRA adapters, trained with peft

Importing this package imports neither torch nor transformers.
"""
