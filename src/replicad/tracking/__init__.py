"""Change trackers. ``scan`` (digest map) is the default and only one so far."""
