"""The unprivileged HTTP side of the device manager, a process of its own.

The device-owning daemon speaks only AF_UNIX; this process (``hailo-devmgr-http``,
``python3 -m hailo_devmgr.http``) is one of its clients and serves:

- ``GET /v1/device/status``: the daemon's ``device_status`` answer as JSON, as
  the earlier daemon served it on 127.0.0.1:5099 (web portals and status tools
  read it);
- ``GET /metrics``: Prometheus metrics built from ``status``, ``device_status``
  and ``metrics`` (prometheus_client writes the text format).
- on the socket named ``ollama`` (``--listen-ollama``, 127.0.0.1:11434): the
  Ollama API and the OpenAI chat API for generative models of the catalog
  (gateway.py and the modules it uses; docs/ollama-openai.md).

It holds no device and no privilege: a member of group ``hailo`` like any
service (see systemd/hailo-devmgr-http.service).
"""
