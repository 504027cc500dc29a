"""What autograd keeps for backward, measured (shared by the activation-memory tests)."""

import warnings

import torch


def saved_bytes(fn, ignore=()) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs (storages of `ignore` left out).

    Example: `saved_bytes(lambda: block(x, e, ctx, None, rope), ignore=[*block.parameters(), *rope])`.
    """
    skip = {t.untyped_storage().data_ptr() for t in ignore}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rms_norm's "mismatch dtype" notice under autocast
        fn()
    return sum(seen.values())
