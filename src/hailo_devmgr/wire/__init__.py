"""The wire format, shared by the daemon and its clients: frames, messages, tensors, shared memory."""
