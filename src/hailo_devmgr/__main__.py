"""`python3 -m hailo_devmgr` runs the daemon."""
from .daemon.main import main

raise SystemExit(main())
