"""Training helpers shared by the SFT and DPO steps; never imports the generation engine.

- config.py    the command line for TRL's parser: the tier's YAML over env/lora.yaml, precision flags
- trainers.py  resumable checkpoints, the atomic final adapter, compiling layer by layer, held-out records
- varlen.py    padding-free attention, each sequence to itself: PyTorch's Flash varlen kernel, else SDPA per sequence
- pair_packing.py  DPO pairs in one unpadded row, each prompt computed once for both answers (--pack_pairs)
"""
