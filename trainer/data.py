"""Labelled data for training and evaluation: the SMS corpus, CSV files and the user's own mail.

Everything becomes one shape, a DataFrame with `Label` (0 = ham, 1 = spam), `Text` and `Source`,
split into train / validation / test. The default split reproduces the reference exactly (same
pandas calls, same seed), so results can be compared with the published numbers.
"""

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from trainer.corpus import locate_sms_corpus, sha256_of
from trainer.errors import DataError

LABEL_NAMES = ("ham", "spam")
LABEL_VALUES = {"ham": 0, "0": 0, "spam": 1, "1": 1}
COLUMNS = ["Label", "Text", "Source"]
TRAIN_FRAC = 0.7
VAL_FRAC = 0.1
TEST_FRAC = 0.2


@dataclass
class Splits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame

    def items(self) -> list[tuple[str, pd.DataFrame]]:
        return [("train", self.train), ("validation", self.validation), ("test", self.test)]

    def sizes(self) -> dict[str, int]:
        return {name: len(frame) for name, frame in self.items()}

    def class_counts(self) -> dict[str, dict[str, int]]:
        return {name: label_counts(frame) for name, frame in self.items()}


@dataclass
class DataOptions:
    """What the user asked for on the command line; `build_splits` turns it into Splits."""

    data: Path | None = None
    use_sms: bool = True
    balance: bool = True
    dedup: bool = False
    seed: int = 123
    train_csv: Path | None = None
    val_csv: Path | None = None
    test_csv: Path | None = None
    ham: list[Path] = field(default_factory=list)
    spam: list[Path] = field(default_factory=list)
    email_corpus: list[Path] = field(default_factory=list)


def label_counts(frame: pd.DataFrame) -> dict[str, int]:
    return {name: int((frame["Label"] == value).sum()) for value, name in enumerate(LABEL_NAMES)}


def _frame(labels: list[int], texts: list[str], source: str) -> pd.DataFrame:
    return pd.DataFrame({"Label": labels, "Text": texts, "Source": [source] * len(texts)}, columns=COLUMNS)


def _parse_label(value: str, where: str) -> int:
    label = LABEL_VALUES.get(str(value).strip().lower())
    if label is None:
        raise DataError(f"{where}: unknown label {value!r} (expected ham or spam, or 0 or 1)")
    return label


def parse_sms_collection(blob: bytes, origin: str) -> pd.DataFrame:
    """Every line of `label<TAB>text`, verbatim.

    The same rows as pandas' `read_csv(sep="\\t", quoting=csv.QUOTE_NONE)` (the quoting matters:
    some texts start with an unclosed `"`), read by hand so that errors can name their line.
    """
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        number = blob[: exc.start].count(b"\n") + 1
        raise DataError(f"{origin}: line {number}: not UTF-8 text ({exc.reason})") from exc
    labels, texts = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataError(
                f"{origin}: line {number}: expected `label<TAB>text`, found {len(fields) - 1} TABs; "
                f"not the SMS Spam Collection format"
            )
        labels.append(_parse_label(fields[0], f"{origin}: line {number}"))
        if not fields[1].strip():
            raise DataError(f"{origin}: line {number}: empty message text")
        texts.append(fields[1])
    if not texts:
        raise DataError(f"{origin}: no messages in the file")
    return _frame(labels, texts, "sms")


def read_labelled_csv(path: Path) -> pd.DataFrame:
    """A `Label,Text` or `Label,Path` CSV with a header; paths are raw messages, relative to the CSV."""
    path = Path(path)
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: cannot read as CSV ({exc})") from exc
    columns = {name.strip().lower(): name for name in raw.columns}
    content = "text" if "text" in columns else "path" if "path" in columns else None
    if "label" not in columns or content is None:
        raise DataError(
            f"{path}: needs a header with columns Label and Text (or Label and Path); "
            f"found {list(raw.columns)}"
        )
    labels, texts = [], []
    for row, (label, value) in enumerate(zip(raw[columns["label"]], raw[columns[content]], strict=True)):
        where = f"{path}: line {row + 2}"
        labels.append(_parse_label(label, where))
        text = _read_message_file(path.parent / value.strip(), where) if content == "path" else value
        if not text.strip():
            raise DataError(f"{where}: empty message text")
        texts.append(text)
    if not texts:
        raise DataError(f"{path}: no rows after the header")
    return _frame(labels, texts, f"csv:{path.name}")


def _read_message_file(path: Path, where: str) -> str:
    from spamfilterd.message import message_to_text

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{where}: cannot read {path} ({exc.strerror or exc})") from exc
    return message_to_text(raw).text


def read_mail(paths: list[Path], label: int) -> tuple[pd.DataFrame, int]:
    """Messages under maildirs, mbox files or folders, as the daemon sees them; (frame, empties skipped)."""
    from spamfilterd.mailsource import MailSourceError, iter_messages
    from spamfilterd.message import message_to_text

    texts, sources, empty = [], [], 0
    for path in paths:
        try:
            for _name, raw in iter_messages(Path(path)):
                text = message_to_text(raw).text
                if text.strip():
                    texts.append(text)
                    sources.append(f"email:{path}")
                else:
                    empty += 1
        except MailSourceError as exc:
            raise DataError(str(exc)) from exc
        except OSError as exc:
            raise DataError(f"{path}: cannot read mail ({exc.strerror or exc})") from exc
    frame = pd.DataFrame({"Label": [label] * len(texts), "Text": texts, "Source": sources}, columns=COLUMNS)
    return frame, empty


def email_corpus_folders(root: Path) -> tuple[list[Path], list[Path]]:
    """(ham folders, spam folders) of a corpus laid out like SpamAssassin's public corpus.

    Folders whose names contain `ham` are ham (easy_ham, hard_ham, easy_ham_2), folders whose names
    start with `spam` are spam (spam, spam_2); anything else is ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: --email-corpus must be a directory of ham*/spam* folders")
    folders = sorted(entry for entry in root.iterdir() if entry.is_dir())
    ham = [folder for folder in folders if "ham" in folder.name.lower()]
    spam = [folder for folder in folders if folder.name.lower().startswith("spam")]
    if not ham or not spam:
        raise DataError(
            f"{root}: an email corpus needs folders named *ham* (good mail) and spam* (spam); found "
            f"{[folder.name for folder in folders] or 'no folders'}"
        )
    return ham, spam


def deduplicate(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep one copy of each text; drop texts labelled both ham and spam, since they teach nothing."""
    labels_per_text = frame.groupby("Text")["Label"].nunique()
    conflicting = set(labels_per_text[labels_per_text > 1].index)
    kept = frame[~frame["Text"].isin(conflicting)]
    unique = kept.drop_duplicates(subset="Text")
    stats = {"duplicates_dropped": len(kept) - len(unique), "conflicting_dropped": len(frame) - len(kept)}
    return unique.reset_index(drop=True), stats


def _cut(frame: pd.DataFrame, seed: int, train_frac: float, val_frac: float) -> Splits:
    """The reference's shuffle and cut: sample(frac=1) then int() of each fraction."""
    shuffled = frame.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(shuffled) * train_frac)
    val_end = train_end + int(len(shuffled) * val_frac)
    return Splits(shuffled[:train_end], shuffled[train_end:val_end], shuffled[val_end:])


def reference_split(frame: pd.DataFrame, seed: int = 123) -> Splits:
    """Undersample the majority class to the minority's size, shuffle, cut 70/10/20 (the reference)."""
    counts = label_counts(frame)
    minority = min(counts.values())
    ham, spam = frame[frame["Label"] == 0], frame[frame["Label"] == 1]
    if len(ham) > minority:
        ham = ham.sample(minority, random_state=seed)
    else:
        spam = spam.sample(minority, random_state=seed)
    return _cut(pd.concat([ham, spam]), seed, TRAIN_FRAC, VAL_FRAC)


def stratified_split(
    frame: pd.DataFrame, seed: int = 123, val_frac: float = VAL_FRAC, test_frac: float = TEST_FRAC
) -> Splits:
    """Cut each class separately so all three parts keep the corpus's ham/spam ratio."""
    parts = [
        _cut(frame[frame["Label"] == label], seed, 1.0 - val_frac - test_frac, val_frac) for label in (0, 1)
    ]
    joined = [pd.concat([getattr(part, name) for part in parts]) for name in ("train", "validation", "test")]
    return Splits(*(part.sample(frac=1, random_state=seed).reset_index(drop=True) for part in joined))


def concat_splits(first: Splits | None, second: Splits) -> Splits:
    if first is None:
        return second
    return Splits(
        *(
            pd.concat([a, b]).reset_index(drop=True)
            for a, b in zip(
                (first.train, first.validation, first.test),
                (second.train, second.validation, second.test),
                strict=True,
            )
        )
    )


def check_usable(splits: Splits, origin: str) -> None:
    """Fail early with a fixable message instead of training a model that cannot learn or be measured."""
    for name, frame in splits.items():
        if frame.empty:
            raise DataError(f"{origin}: the {name} split is empty; give more messages")
    counts = label_counts(splits.train)
    for name, count in counts.items():
        if count == 0:
            raise DataError(
                f"{origin}: the training data has no {name} messages; training needs both ham and spam"
            )


def _mail_splits(ham_paths: list[Path], spam_paths: list[Path], seed: int) -> tuple[Splits, dict]:
    """Mail folders read as the daemon reads them, deduplicated, split 70/10/20 stratified."""
    ham, ham_empty = read_mail(ham_paths, 0)
    spam, spam_empty = read_mail(spam_paths, 1)
    mail, dedup = deduplicate(pd.concat([ham, spam]))
    source = {
        "ham": [str(path) for path in ham_paths],
        "spam": [str(path) for path in spam_paths],
        "messages": label_counts(mail),
        "empty_skipped": ham_empty + spam_empty,
        **dedup,
    }
    return stratified_split(mail, seed), source


def source_kind(source: str) -> str:
    """`sms`, `email` or `csv`: the kind of message a row is, for metrics per kind."""
    return source.split(":", 1)[0]


def build_splits(options: DataOptions) -> tuple[Splits, dict]:
    """Splits plus the model card's `data` section (sources, counts, how they were prepared)."""
    if (options.val_csv or options.test_csv) and options.train_csv is None:
        raise DataError(
            "--val-csv and --test-csv go with --train-csv (explicit splits); add --train-csv FILE"
        )
    card: dict = {"sources": [], "seed": options.seed, "dedup": options.dedup}
    splits: Splits | None = None
    if options.train_csv is not None:
        train = read_labelled_csv(options.train_csv)
        given = {
            name: read_labelled_csv(path)
            for name, path in (("validation", options.val_csv), ("test", options.test_csv))
            if path
        }
        missing = [name for name in ("validation", "test") if name not in given]
        if missing:
            carved = stratified_split(train, options.seed)
            train = carved.train
            given = {name: given.get(name, getattr(carved, name)) for name in ("validation", "test")}
        splits = Splits(train, given["validation"], given["test"])
        card["preparation"] = "explicit CSV splits" + (
            f" ({', '.join(missing)} cut from --train-csv)" if missing else ""
        )
        card["sources"] += [
            {"kind": "csv", "path": str(path)}
            for path in (options.train_csv, options.val_csv, options.test_csv)
            if path is not None
        ]
    elif options.use_sms:
        blob, origin = locate_sms_corpus(options.data)
        sms = parse_sms_collection(blob, origin)
        source: dict[str, object] = {
            "kind": "sms",
            "name": "SMS Spam Collection v.1",
            "origin": origin,
            "sha256": sha256_of(blob),
        }
        source["messages"] = label_counts(sms)
        if options.dedup:
            sms, source["dedup"] = deduplicate(sms)
        splits = (
            reference_split(sms, options.seed) if options.balance else stratified_split(sms, options.seed)
        )
        card["preparation"] = (
            "reference: balanced by undersampling ham, shuffled, 70/10/20"
            if options.balance
            else "all messages, stratified 70/10/20"
        )
        card["sources"].append(source)
    for corpus in options.email_corpus:
        ham_folders, spam_folders = email_corpus_folders(corpus)
        mail_splits, source = _mail_splits(ham_folders, spam_folders, options.seed)
        card["sources"].append({"kind": "email-corpus", "path": str(corpus), **source})
        splits = concat_splits(splits, mail_splits)
    if options.ham or options.spam:
        mail_splits, source = _mail_splits(options.ham, options.spam, options.seed)
        card["sources"].append({"kind": "mail", **source})
        splits = concat_splits(splits, mail_splits)
    if splits is None:
        raise DataError("no training data: use the SMS corpus (default), --train-csv, or --ham/--spam")
    check_usable(splits, "training data")
    card["split_sizes"] = splits.sizes()
    card["class_counts"] = splits.class_counts()
    return splits, card
