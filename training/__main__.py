import sys

from omnivox.training.cli import main

sys.exit(main())
