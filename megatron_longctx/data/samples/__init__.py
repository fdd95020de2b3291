"""What training reads: packed ``--seq-length`` samples with document boundaries, single-document
windows under position transforms (PoSE, LongRecipe), recorded samples, and the blend of
``--data-path`` sources cut by ``--split``."""
