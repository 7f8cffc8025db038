"""python -m dmrepl.daemon secondary --config PATH"""

import sys

from dmrepl.daemon.supervisor import main

sys.exit(main())
