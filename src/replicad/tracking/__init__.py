"""Change trackers behind one seam (tracker.py: ChangeTracker). ``scan`` (digest maps,
scan_tracker.py) is the first; the producer knows only the seam."""
