"""lvsa-ascend: the ``ascend`` backend of lvsa for Huawei Ascend NPUs.

Installing this distribution registers the backend through the ``lvsa`` entry-point
group (``ascend = "lvsa_ascend.backend"``); ``torch_npu`` is imported only when the
backend runs, so importing this package never needs CANN.
"""
__version__ = "0.1.0"

from .backend import AscendBackend  # noqa: E402

__all__ = ["AscendBackend", "__version__"]
