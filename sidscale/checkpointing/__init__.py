"""Checkpoints: the files on disk (``files``), the collective save / verify / choose / resume over a
registry of stateful pieces (``manager``), and elastic resharding (``elastic``)."""
