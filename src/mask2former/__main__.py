import sys

from mask2former.cli import main

sys.exit(main())
