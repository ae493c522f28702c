"""The verifier: run a third-party attention implementation on golden cases and judge it
(spec/verify.md, spec/tolerance.md).

    from refattn import verify
    impl = verify.load_impl("mypkg.attn:forward")            # or verify.Impl(fn, backward)
    for v in verify.verify(impl, dtype="bfloat16"):          # the default suite (golden.locate)
        print(v.case_id, v.status)

Modules: `impl` (the implementation: loading, calling, `Unsupported`), `frame` (the
suite's arrays in the form, layout and framework the implementation takes), `verdict` (the
tolerance rule per tensor), `runner` (a case, a suite), `adapters` (refattn's backends and
PyTorch in the calling convention) and `testing` (pytest helpers). The top-level
`refattn.adapters` and `refattn.testing` are these two, under their public names.
"""

from .frame import FRAMEWORKS, LAYOUTS
from .impl import MASK_FORMS, Impl, Unsupported, load_function, load_impl
from .runner import DTYPES, plan, verify, verify_case
from .verdict import CaseVerdict, TensorVerdict

__all__ = ["DTYPES", "FRAMEWORKS", "LAYOUTS", "MASK_FORMS", "CaseVerdict", "Impl", "TensorVerdict", "Unsupported",
           "load_function", "load_impl", "plan", "verify", "verify_case"]
