import sys

from textgen.launcher.main import main

sys.exit(main())
