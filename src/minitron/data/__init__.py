"""Corpora and token stores: sources (where a corpus is, reading its documents), store (tokenized once per corpus
and tokenizer), blocks (packed blocks, train/validation splits), blends (weighted corpora), fingerprint (identities of
corpora and models, stage records), corpus (load_splits and the blocks each stage reads). Layer: imports minitron.arch
only.

`from minitron.data import load_splits, DataError, ...`: corpus's names are this package's.
"""

from minitron.data.corpus import *  # noqa: F403
