"""``lvsa doctor``: diagnose a run from its log, or the live environment.

* :mod:`.logparse` reads a log into records with line numbers;
* :mod:`.findings` holds one small rule per failure mode (id, symptom, evidence, cause, fix);
* :mod:`.fit` is the geometry arithmetic behind ``reason=geometry_detect``;
* :mod:`.envcheck` checks ``LVSA_*`` variables, backends (as ``lvsa info``) and torch_npu.

>>> from lvsa.doctor import diagnose_text
>>> d = diagnose_text("[LVSA] engaged (wan): T_lat=25 P=16 seq_len=400 kfi=2 W=3 |G|=13 -> SPARSE\\n")
>>> d.healthy
True
"""
from .findings import RULES, Diagnosis, Finding, diagnose
from .logparse import LogRecord, ParsedLog, UnreadableInput, parse_log


def diagnose_text(text, source: str = "-") -> Diagnosis:
    """Parse and diagnose a log given as ``str`` or ``bytes``."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return diagnose(parse_log(data, source))


def check_environment(*args, **kwargs) -> Diagnosis:
    from .envcheck import check_environment as check
    return check(*args, **kwargs)


__all__ = ["RULES", "Diagnosis", "Finding", "LogRecord", "ParsedLog", "UnreadableInput", "check_environment",
           "diagnose", "diagnose_text", "parse_log"]
