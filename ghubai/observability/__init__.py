"""What operators see of a running daemon: logs (and later metrics and sd_notify)."""
