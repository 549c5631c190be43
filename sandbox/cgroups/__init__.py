"""The cgroup core: finding our cgroups (v1, v2, hybrid), reading and writing them."""
