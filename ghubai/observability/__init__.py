"""What operators see of a running daemon: its logs, Prometheus metrics, the live dashboard and the
minutes of history behind it, OpenTelemetry tracing, and what it tells systemd (``sd_notify``)."""
