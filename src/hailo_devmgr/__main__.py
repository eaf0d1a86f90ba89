"""`python3 -m hailo_devmgr` runs the daemon."""
from .daemon import main

raise SystemExit(main())
