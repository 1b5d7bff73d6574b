"""Data loading for the trainer: the SMS corpus read verbatim, the reference split, CSVs, mail."""

import csv
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import email_bytes, make_email_corpus, make_mail
from trainer.corpus import SMS_SHA256, read_sms_bytes, sha256_of
from trainer.data import (
    DataOptions,
    build_splits,
    deduplicate,
    parse_sms_collection,
    read_labelled_csv,
    read_mail,
    reference_split,
    source_kind,
)
from trainer.errors import DataError


@pytest.fixture(scope="module")
def sms(sms_corpus) -> pd.DataFrame:
    return parse_sms_collection(sms_corpus.read_bytes(), str(sms_corpus))


def test_corpus_is_read_verbatim(sms_corpus, sms):
    assert sha256_of(sms_corpus.read_bytes()) == SMS_SHA256
    assert len(sms) == 5574
    assert (sms["Label"] == 0).sum() == 4827 and (sms["Label"] == 1).sum() == 747
    # Line 5,082 opens an unclosed quote that a default CSV reader would run into the next lines.
    assert sms["Text"][5081].startswith('"')
    assert sms["Text"][5082] == sms_corpus.read_text().splitlines()[5082].split("\t", 1)[1]
    as_pandas = pd.read_csv(
        sms_corpus, sep="\t", header=None, names=["Label", "Text"], quoting=csv.QUOTE_NONE
    )
    assert list(sms["Text"]) == list(as_pandas["Text"])


def test_reference_split_counts_and_order_match_the_reference_code(sms_corpus, sms):
    splits = reference_split(sms, seed=123)
    assert splits.sizes() == {"train": 1045, "validation": 149, "test": 300}
    # The reference's own pandas steps, on the same file read the same way.
    df = pd.read_csv(sms_corpus, sep="\t", header=None, names=["Label", "Text"], quoting=csv.QUOTE_NONE)
    n_spam = (df["Label"] == "spam").sum()
    balanced = pd.concat(
        [df[df["Label"] == "ham"].sample(n_spam, random_state=123), df[df["Label"] == "spam"]]
    )
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    balanced = balanced.sample(frac=1, random_state=123).reset_index(drop=True)
    assert list(splits.train["Text"]) == list(balanced["Text"][:1045])
    assert list(splits.validation["Label"]) == list(balanced["Label"][1045:1194])
    assert list(splits.test["Text"]) == list(balanced["Text"][1194:])


def test_splits_are_deterministic_and_seed_dependent(sms):
    first, again, other = reference_split(sms, 123), reference_split(sms, 123), reference_split(sms, 7)
    assert list(first.test["Text"]) == list(again.test["Text"])
    assert list(first.test["Text"]) != list(other.test["Text"])


def test_no_balance_keeps_everything_stratified(sms_corpus):
    splits, card = build_splits(DataOptions(data=sms_corpus, balance=False))
    assert sum(splits.sizes().values()) == 5574
    for name, frame in splits.items():
        assert frame["Label"].mean() == pytest.approx(747 / 5574, abs=0.01), name
    assert card["sources"][0]["sha256"] == SMS_SHA256


def test_data_may_be_the_uci_zip_or_its_folder(tmp_path, sms_corpus):
    archive = tmp_path / "sms+spam+collection.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("readme", "x")
        handle.writestr("SMSSpamCollection", sms_corpus.read_bytes())
    assert read_sms_bytes(archive) == sms_corpus.read_bytes()
    assert read_sms_bytes(sms_corpus.parent) == sms_corpus.read_bytes()


def test_dedup_drops_repeats_and_conflicts():
    frame = pd.DataFrame({"Label": [0, 0, 1, 0, 1], "Text": ["a", "a", "b", "c", "c"], "Source": ["x"] * 5})
    unique, stats = deduplicate(frame)
    assert list(unique["Text"]) == ["a", "b"]
    assert stats == {"duplicates_dropped": 1, "conflicting_dropped": 2}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"ham\thello\nspma\tcheap pills\n", "line 2: unknown label 'spma'"),
        (b"ham\thello\nspam\t\n", "line 2: empty message text"),
        (b"ham\thello\nspam\tcheap \xff pills\n", "line 2: not UTF-8"),
        (b"ham\thello\tworld\n", "line 1: expected `label<TAB>text`, found 2 TABs"),
        (b"ham\thello\nspam\n", "line 2: expected `label<TAB>text`, found 0 TABs"),
        (b"\n", "no messages"),
    ],
)
def test_bad_corpus_lines_are_named(tmp_path, content, message):
    path = tmp_path / "corpus.tsv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as caught:
        build_splits(DataOptions(data=path))
    assert str(path) in str(caught.value)


def _write_csv(path: Path, rows: list[list[str]], header=("Label", "Text")) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_labelled_csv_accepts_names_and_numbers(tmp_path):
    frame = read_labelled_csv(
        _write_csv(tmp_path / "t.csv", [["ham", "hi"], ["1", "WIN"], ["SPAM", "a,b\nc"]])
    )
    assert list(frame["Label"]) == [0, 1, 1]
    assert frame["Text"][2] == "a,b\nc"


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([["ham", "hi"]], ("Kind", "Text"), "needs a header with columns Label and Text"),
        ([["ham", "hi"], ["maybe", "x"]], ("Label", "Text"), "line 3: unknown label 'maybe'"),
        ([["ham", "hi"], ["spam", "  "]], ("Label", "Text"), "line 3: empty message text"),
        ([["ham", "missing.eml"]], ("Label", "Path"), "line 2: cannot read"),
        ([], ("Label", "Text"), "no rows after the header"),
    ],
)
def test_bad_csv_rows_are_named(tmp_path, rows, header, message):
    path = _write_csv(tmp_path / "bad.csv", rows, header)
    with pytest.raises(DataError, match=message) as caught:
        read_labelled_csv(path)
    assert str(path) in str(caught.value)


def test_test_csv_alone_is_refused(tmp_path):
    path = _write_csv(tmp_path / "test.csv", [["ham", "hi"], ["spam", "win"]])
    with pytest.raises(DataError, match="add --train-csv"):
        build_splits(DataOptions(test_csv=path))


def test_one_class_only_is_refused(tmp_path):
    rows = [["ham", f"message number {i}"] for i in range(40)]
    path = _write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(DataError, match="no spam messages"):
        build_splits(DataOptions(train_csv=path))


def test_mail_folders_go_through_message_to_text_and_are_deduplicated(tmp_path):
    ham, spam = make_mail(tmp_path)
    frame, empty = read_mail([ham], 0)
    assert len(frame) == 13 and empty == 0
    assert "Minutes of meeting" in frame["Text"][0]
    splits, card = build_splits(DataOptions(use_sms=False, ham=[ham], spam=[spam]))
    mail = card["sources"][0]
    assert mail["messages"] == {"ham": 12, "spam": 12} and mail["duplicates_dropped"] == 2
    assert sum(splits.sizes().values()) == 24
    assert set(splits.test["Label"]) == {0, 1}


def test_mail_path_problems_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_mail([tmp_path / "nope"], 0)


def test_csv_paths_are_read_as_messages(tmp_path):
    (tmp_path / "msgs").mkdir()
    rows = []
    for i in range(6):
        for label, subject in (("ham", "Lunch"), ("spam", "Cheap meds")):
            name = f"msgs/{label}{i}.eml"
            (tmp_path / name).write_bytes(email_bytes(f"{subject} {i}", f"body of {label} {i}"))
            rows.append([label, name])
    frame = read_labelled_csv(_write_csv(tmp_path / "paths.csv", rows, ("Label", "Path")))
    assert len(frame) == 12
    assert "Cheap meds 0" in frame["Text"][1]


def test_email_corpus_labels_folders_by_name(tmp_path):
    corpus = make_email_corpus(tmp_path / "corpus")
    splits, card = build_splits(DataOptions(use_sms=False, email_corpus=[corpus]))
    source = card["sources"][0]
    assert source["kind"] == "email-corpus" and source["messages"] == {"ham": 20, "spam": 10}
    assert [Path(path).name for path in source["ham"]] == ["easy_ham", "hard_ham"]
    assert [Path(path).name for path in source["spam"]] == ["spam"]
    assert sum(splits.sizes().values()) == 30
    assert {source_kind(value) for value in splits.train["Source"]} == {"email"}


def test_email_corpus_mixes_with_sms_and_keeps_the_sms_split(tmp_path, sms_corpus):
    corpus = make_email_corpus(tmp_path / "corpus")
    sms_only, _ = build_splits(DataOptions(data=sms_corpus, balance=False))
    mixed, card = build_splits(DataOptions(data=sms_corpus, balance=False, email_corpus=[corpus]))
    assert [source["kind"] for source in card["sources"]] == ["sms", "email-corpus"]
    sms_test = mixed.test[[source_kind(value) == "sms" for value in mixed.test["Source"]]]
    assert list(sms_test["Text"]) == list(sms_only.test["Text"])
    assert len(mixed.test) == len(sms_only.test) + 6


@pytest.mark.parametrize(
    ("folders", "message"),
    [(["easy_ham"], "needs folders named \\*ham\\* .* and spam\\*"), ([], "no folders")],
)
def test_email_corpus_without_both_classes_is_a_data_error(tmp_path, folders, message):
    for folder in folders:
        (tmp_path / folder).mkdir()
    with pytest.raises(DataError, match=message):
        build_splits(DataOptions(use_sms=False, email_corpus=[tmp_path]))
