"""Older mail trains, newer mail tests: the email rows of a split re-cut by arrival time.

A random split puts messages of one spam run, one newsletter and one thread on both sides, so
it rewards memorising them; the default model is judged on mail newer than anything it learnt.
`by_arrival` keeps the SMS rows as they were and re-cuts the email rows the way time cuts them:
in each folder of the corpus (easy ham, hard ham, spam) the latest `test_frac` by arrival go to
test, and validation is drawn at random from the earlier rest. Arrival is the time the corpus
owner's server stamped on the message (the first `Received:` header), else its `Date:`; mail
with neither counts as the oldest. In the 2002 corpus that puts the test set after 4 October
(easy ham), 4 September (hard ham) and 21 September (spam).
"""

import email.utils
from email.parser import BytesHeaderParser
from email.policy import compat32

import numpy as np
import pandas as pd

from trainer.data import TEST_FRAC, VAL_FRAC, Splits, source_kind

OLDEST = 0.0


def arrival_time(raw: bytes) -> float:
    """POSIX seconds when the message reached its owner's server; OLDEST when no header says."""
    header = BytesHeaderParser(policy=compat32).parsebytes(raw)
    received = header.get_all("Received") or []
    stamps = [received[0].rsplit(";", 1)[-1]] if received and ";" in received[0] else []
    stamps += header.get_all("Date") or []
    for stamp in stamps:
        try:
            return email.utils.parsedate_to_datetime(stamp.strip()).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            continue
    return OLDEST


def by_arrival(
    splits: Splits,
    raws: dict[str, bytes],
    seed: int,
    test_frac: float = TEST_FRAC,
    val_frac: float = VAL_FRAC,
) -> Splits:
    """`splits` with its email rows re-cut by arrival per source folder (see the module's doc)."""
    frames = [frame for _name, frame in splits.items()]
    is_email = [frame["Source"].map(source_kind) == "email" for frame in frames]
    kept = [frame[~email] for frame, email in zip(frames, is_email, strict=True)]
    all_mail = pd.concat([frame[email] for frame, email in zip(frames, is_email, strict=True)])
    rng = np.random.default_rng(seed)
    cut: dict[str, list[pd.DataFrame]] = {"train": [], "validation": [], "test": []}
    for _folder, mail in all_mail.groupby("Source", sort=True):
        times = np.array([arrival_time(raws[text]) for text in mail["Text"]])
        ordered = mail.iloc[np.argsort(times, kind="stable")]
        test_start = len(ordered) - round(len(ordered) * test_frac)
        earlier, later = ordered.iloc[:test_start], ordered.iloc[test_start:]
        shuffled = earlier.iloc[rng.permutation(len(earlier))]
        val_count = round(len(mail) * val_frac)
        cut["validation"].append(shuffled.iloc[:val_count])
        cut["train"].append(shuffled.iloc[val_count:])
        cut["test"].append(later)
    return Splits(
        *(
            pd.concat([base, *cut[name]]).sample(frac=1, random_state=seed).reset_index(drop=True)
            for base, name in zip(kept, ("train", "validation", "test"), strict=True)
        )
    )
