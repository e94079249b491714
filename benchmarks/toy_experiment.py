"""The small world's memory experiment (see :mod:`storymem.toy.experiment` for the conditions and metrics):
held-out toy stories rendered without memory, with M2V memory and with its ablations, judged by the toy world's
ground-truth identity detector. Prints the table and writes OUT/results.json, OUT/results.md and
OUT/contact_sheets/.

    python benchmarks/toy_experiment.py --base runs/toy-base/base --adapter runs/m2v/adapter \\
        [--contiguous-adapter runs/m2v-contiguous/adapter] --stories runs/toy-stories --out runs/experiment \\
        [--device cuda] [--steps 8] [--guidance 3.5] [--area 4096] [--frames 17] [--conditions m2v,independent] \\
        [--limit-stories 5]

Rerun the same command to resume an interrupted run: finished story renders are kept.
"""

import sys

from storymem.toy.experiment import main

if __name__ == "__main__":
    sys.exit(main())
