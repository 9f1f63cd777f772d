"""``python -m gppq_dist.train --config CFG`` (what torchrun runs on every rank)."""

from gppq_dist.train.trainer import main

main()
