"""`moe_impl.balancing`, the stable name of `moe_impl.layer.balancing` (the same module object)."""

import sys

from moe_impl.layer import balancing

sys.modules[__name__] = balancing
