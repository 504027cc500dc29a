"""Tools no job needs at run time: the memory estimator and the collective-bytes counter."""
