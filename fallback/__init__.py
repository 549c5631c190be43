"""The rlimit fallback backend: rlimits plus a whole-tree watchdog, for hosts without cgroups."""
