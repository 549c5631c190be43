"""The backends (cgroup, systemd; rlimit is in fallback/), their protocol, the choice."""
