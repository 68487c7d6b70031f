import sys

from plugin.main import main

sys.exit(main())
