"""``python -m gppq_dist.train --config CFG`` (what torchrun runs on every rank): ``gppq
train``'s flags, parsed by :mod:`gppq_dist.commands`."""

from gppq_dist.commands import torchrun_main

torchrun_main("train")
