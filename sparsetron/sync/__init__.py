"""Weight-sync transports: ship opaque byte payloads from a trainer to rollout workers."""
