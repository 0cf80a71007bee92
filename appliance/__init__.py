"""Fine-grained failover by TCP connection migration: the appliance's control plane."""

__version__ = "0.1.0"
