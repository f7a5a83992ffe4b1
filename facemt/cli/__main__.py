import sys

from facemt.cli import main

sys.exit(main())
