"""Options that more than one command takes, defined once (`graft train` and `graft inspect`)."""

from __future__ import annotations

import typer

LR = typer.Option(None, help="Learning rate of the head (default: the strategy's).")
TRAIN_STAGES = typer.Option(None, help="partial, lp-ft: how many of the last stages train (default: 1 for partial, all for lp-ft).")
LR_DECAY = typer.Option(0.3, help="Discriminative rates: each earlier stage's lr is this times the next one's.")
THAW_EVERY = typer.Option(1, help="gradual: epochs between two thaws.")
TRAIN_BN = typer.Option(False, "--train-bn", help="Let BatchNorm affine parameters of frozen stages train (statistics stay frozen).")
LORA_RANK = typer.Option(8, help="lora: rank of the adapters.")
BN_STATS = typer.Option("auto", help="BatchNorm statistics in the stages that train: frozen, update, or auto (frozen below 100 images per class).")
POOLING = typer.Option(None, help="How the last feature map becomes the head's input: avg (the backbone's own global average), grid (the mean of each cell of a 3x3 grid: keeps where things are, for aligned objects such as product shots, digits, scans), grid-2 (3x3 grids of the last two stages' outputs: adds the more generic features of the stage before the last) or grid-3 (adds a 5x5 grid of the stage before that, whose map is twice as fine); default: avg (auto measures them all).")
