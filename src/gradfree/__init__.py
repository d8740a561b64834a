"""gradfree: compress, align and merge transformer LMs without gradient descent.

Everything here works from activation statistics and closed-form linear algebra (PCA/SVD,
orthogonal Procrustes, ridge regression, assignment problems). Importing the package touches no
accelerator: torch is imported lazily by the modules that need it.
"""

__version__ = "0.1.0"
