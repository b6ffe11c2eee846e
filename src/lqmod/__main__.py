import sys

from lqmod.cli import main

sys.exit(main())
