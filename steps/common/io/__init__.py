"""Data in and out, and resume: nothing here loads a model or torch.

- files.py    whole outputs written atomically, and the lock that lets one run write an output
- jsonl.py    JSONL reads that name the line at fault; append-only output that survives a crash
- batches.py  the resumable batch loop of the generating steps (generate, judge, preference)
- shards.py   NPROC processes each writing a shard of one output; process 0 merges them
- splits.py   train/test decided by a record's id alone
"""
