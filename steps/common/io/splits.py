"""Train/test splits decided by a record's id alone, so every step (the dataset writer, SFT, DPO) agrees on which
records are held out, and a rerun, a resumed run or a different record order puts each id on the same side."""

import hashlib

DEFAULT_TEST_FRACTION = 0.05


def split_of(record_id, test_fraction=DEFAULT_TEST_FRACTION):
    """"test" for about `test_fraction` of ids (a hash of the id, not its position), else "train"."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test fraction must be in [0, 1), got {test_fraction}")
    digest = hashlib.sha256(str(record_id).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def split_records(records, test_fraction=DEFAULT_TEST_FRACTION):
    """(train, test): the records on each side, in their order."""
    train, test = [], []
    for record in records:
        (test if split_of(record["id"], test_fraction) == "test" else train).append(record)
    return train, test
