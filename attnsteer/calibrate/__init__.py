"""Calibration: search a recipe's parameters on a model and labelled (or unlabelled) data, and
write the result as a shareable recipe whose ``source`` records how it was found.

One module per method: :mod:`.act` (ACT's head filtering by accuracy), :mod:`.var` (VAR's
hidden sink dimensions), :mod:`.vhr` (a fixed VHR head set), :mod:`.seka` (SEKA's key
projections). Each has a typed config dataclass (``ActCalibrationConfig``, ...; its fields are the
flags of ``attnsteer calibrate <method>``) and ``calibrate(config, *, loaded=None, progress=None)``,
which writes the recipe and returns what it found. Nothing here parses arguments or prints: the
command line (:mod:`attnsteer.cli.calibrate`) maps its flags to the config and prints the result.
"""
