import sys

from newllm.search.cli import main

sys.exit(main())
