import sys

from moe_impl.cli import main

sys.exit(main())
