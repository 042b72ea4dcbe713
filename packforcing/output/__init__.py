"""Writing what a run produced: video, report and memory plot."""
