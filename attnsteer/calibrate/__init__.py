"""Calibration: search a recipe's parameters on a model and labelled (or unlabelled) data, and
write the result as a shareable recipe whose ``source`` records how it was found.

One module per method: :mod:`.act` (ACT's head filtering by accuracy), :mod:`.var` (VAR's
hidden sink dimensions), :mod:`.vhr` (a fixed VHR head set). Each has ``add_arguments(parser)``
and ``run(args) -> int`` for ``attnsteer calibrate <method>``.
"""
