"""Evaluation: validation metrics shared by every stage, multiple-choice scoring, and the ``undo eval`` command."""
