"""`moe_impl.flops`, the short name of `moe_impl.model.flops` (the same module object, torch-free)."""

import sys

from moe_impl.model import flops

sys.modules[__name__] = flops
