"""What the report, the comparison, the dataset and the Hub cards show, computed one way for all of them.

- eval_tables.py  reading and tabling the eval step's results
- paired.py       paired differences of two models' per-example eval results
- tag_stats.py    counting the judge's tags
- cards.py        the dataset card and the adapters' model cards
"""
