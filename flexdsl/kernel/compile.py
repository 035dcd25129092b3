"""Rendered kernels, compiled once per spec structure.

A kernel module is keyed on the normalised spec and the backend's flavour (interpreter or
GPU, fast tanh or not). Triton needs real source files to compile from, so the rendered text
is written to a cache directory (``$FLEXDSL_CACHE_DIR``, else the user's cache) and imported.
``FLEXDSL_DEBUG=1`` prints the source whenever a kernel is rendered.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .. import ir
from ..analysis.bounds import banded
from ..analysis.derivatives import ScoreDerivatives
from ..analysis.diagonal import diagonal_terms
from ..analysis.plan import MaskAnalysis
from ..check import CheckedSpec
from ..lower import KernelSource, render


@dataclass(frozen=True)
class KernelTraits:
    """What kind of work a spec's kernels do: it picks their default tiles (launch.py)."""
    banded: bool = False           # every row keeps a window that slides with it
    documents: bool = False        # key ranges come from run tensors: short, uneven loops
    divides: bool = False          # the mask divides positions (// or %)
    divides_pairs: bool = False    # ... an expression of both q and kv: per tile element
    nonlinear_score: bool = False  # dS needs d score_expr / d score: one more tile live
    diagonal: bool = False         # the score has terms read per diagonal: a gather a tile

    @classmethod
    def of(cls, spec: CheckedSpec, analysis: MaskAnalysis,
           derivatives: ScoreDerivatives) -> "KernelTraits":
        mask = spec.spec.mask
        divisions = [n for n in ir.walk(mask) if isinstance(n, ir.Binary)
                     and n.op in ("//", "%")] if mask is not None else []
        return cls(banded=banded(analysis.by_query, spec), documents=analysis.has_documents,
                   divides=bool(divisions),
                   divides_pairs=any({"q", "kv"} <= ir.names(n.left) for n in divisions),
                   nonlinear_score=not derivatives.identity,
                   diagonal=bool(diagonal_terms(spec, mask=False)))


@dataclass(frozen=True)
class CompiledSpec:
    """The kernels of one spec and what their arguments mean."""
    source: KernelSource
    module: ModuleType
    traits: KernelTraits = KernelTraits()


_modules: dict[tuple, CompiledSpec] = {}
renders = 0  # how many kernel modules were rendered (tests count recompilations with it)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cache_dir() -> Path:
    configured = os.environ.get("FLEXDSL_CACHE_DIR")
    if configured:
        path = Path(configured)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "flexdsl"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(tempfile.gettempdir()) / f"flexdsl-{os.getuid()}"
        path.mkdir(parents=True, exist_ok=True)
    return path


def compiled(spec: CheckedSpec, analysis: MaskAnalysis, derivatives: ScoreDerivatives, *,
             fast_tanh: bool) -> CompiledSpec:
    key = (str(spec), fast_tanh, interpreting())
    hit = _modules.get(key)
    if hit is not None:
        return hit
    global renders
    renders += 1
    source = render(spec, analysis, derivatives, fast_tanh=fast_tanh)
    if os.environ.get("FLEXDSL_DEBUG", "0") not in ("", "0"):
        print(source.text, file=sys.stderr)
    digest = hashlib.sha256(source.text.encode()).hexdigest()[:20]
    name = f"flexdsl_kernel_{digest}"
    path = cache_dir() / f"{name}.py"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source.text)
        os.replace(tmp, path)   # atomic: concurrent processes never see a half-written file
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    result = CompiledSpec(source, module, KernelTraits.of(spec, analysis, derivatives))
    _modules[key] = result
    return result
