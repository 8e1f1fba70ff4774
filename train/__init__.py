"""The command line of adamw_flax: ``python -m train --config=configs/X.py --workdir=DIR``."""
