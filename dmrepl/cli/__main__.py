import sys

from dmrepl.cli import main

sys.exit(main())
