"""Operations: Prometheus metrics, logs, systemd notifications."""
