"""Training helpers shared by the SFT and DPO steps; never imports the generation engine.

- config.py    the command line for TRL's parser: the tier's YAML over env/lora.yaml, precision flags
- trainers.py  resumable checkpoints, the atomic final adapter, compiling layer by layer, held-out records
- varlen.py    padding-free attention: PyTorch's Flash varlen kernel behind transformers' attention interface
"""
