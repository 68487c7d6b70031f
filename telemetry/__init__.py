"""What vxnet counts about itself: every Prometheus metric is declared in telemetry/metrics.py."""
