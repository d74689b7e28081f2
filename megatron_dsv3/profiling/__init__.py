"""Where the time of a pipeline step goes: timelines and bubbles (timeline.py), and how much
of the expert-parallel all-to-all the F&B overlap hides (comm_timing.py). Used by the
benchmark scripts; nothing in training depends on it."""
