"""One run from fork to report: supervisor, guardian, output relay, retries, presets."""
