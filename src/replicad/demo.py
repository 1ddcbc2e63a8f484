"""Placeholder replaced below."""
def run_demo(workdir, keep_running):
    return 0
