"""What operators see of a running part: metrics, the relay's status page."""
