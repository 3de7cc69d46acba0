"""The experiment layer: the ``undo pipeline`` stage graph, the relearning-attack sweep, robustness summaries and the
report. It drives the stage modules through Lightning's Trainer and reads and writes the run folder."""
