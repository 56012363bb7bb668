"""Optimizer library: SophiaG, SophiaH, Lion, MuonAdamW and SOAP, Hessian estimators, telemetry.

Depends on torch only, so the folder can be copied into another project. Where things are:
`sophia.py` the Sophia update (SophiaG and SophiaH specialise it in `sophiag.py`, `sophiah.py`),
`lion.py`, `muon.py`, `soap.py`, `hessian.py` the Hessian estimators; the leading-underscore
modules are plumbing (argument checks, path choice, the compiled fused step).
"""
from ._fused import clear_fused_cache, fused_cache_size
from .lion import Lion
from .muon import MuonAdamW
from .soap import SOAP
from .sophiag import SophiaG, code_to_paper_lr, paper_to_code_lr
from .sophiah import SophiaH

__all__ = [
    "SophiaG",
    "SophiaH",
    "Lion",
    "MuonAdamW",
    "SOAP",
    "paper_to_code_lr",
    "code_to_paper_lr",
    "clear_fused_cache",
    "fused_cache_size",
]
