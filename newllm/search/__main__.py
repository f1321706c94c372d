"""``python -m newllm.search``: the command line of ``newllm.search.cli``."""

import sys

from newllm.search.cli import main

sys.exit(main())
