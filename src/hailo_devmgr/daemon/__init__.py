"""The daemon: the only process that opens the device."""
